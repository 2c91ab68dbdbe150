"""Real image data for the studies, read offline: scikit-learn's digits and Fashion-MNIST.

**Digits** (:class:`Digits`): 1,797 grayscale 8x8 images of the digits 0-9 (UCI "Optical Recognition
of Handwritten Digits", bundled with scikit-learn as ``sklearn.datasets.load_digits``; scikit-learn is
the ``[demo]`` extra). The split is fixed and stratified: 20 % test, then 20 % (of the whole)
validation, the remaining 60 % train (1,077 / 360 / 360 images with ``split_seed=0``), from
scikit-learn's ``train_test_split`` with ``random_state=split_seed``. ``train_fraction`` keeps a
stratified subset of the training split (for low-data regimes); validation and test are never
subsampled. Pixels (0..16) are scaled to [0, 1] and, by default, normalised with the mean and standard
deviation of the *training split* (computed, not hard-coded, so every split uses the same numbers).

**Fashion-MNIST** (:class:`FashionMNIST`): 70,000 grayscale 28x28 images of 10 kinds of clothing
(Zalando, MIT licence), read from the four standard idx files (gzipped or not). By default from the
folder of Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``), or
``$OPDF_FASHION_MNIST_ROOT``, or any ``root`` (e.g. torchvision's ``<root>/FashionMNIST/raw``). A fixed
stratified validation split (default 5,000 images, 500 per class) is carved from the 60,000 training
images; 'test' is the 10,000 ``t10k`` images. The splits and subsamples are chosen by a seeded integer
hash of each image's index (no torch or numpy RNG), so they are the same on every machine and version.

**A held-out part of any labelled dataset** (:class:`HeldOut`, e.g. of ImageNet's training set in
``configs/ilsvrc2012/study/``): ``per_class`` items of every class, chosen by the same seeded hash of
their indices, are the ``holdout`` part (selection on validation), the rest the ``fit`` part (training).
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ['Digits', 'digits_split_indices', 'FashionMNIST', 'fashion_split_indices', 'read_idx',
           'FASHION_MNIST_ROOT', 'FASHION_MNIST_FILES', 'FASHION_MNIST_CLASSES', 'IdxFormatError', 'HeldOut',
           'held_out_indices']

SPLITS = ('train', 'val', 'test')
_SKLEARN_HINT = 'pip install "opdf-torchdistill[demo]"'


def _sklearn(module: str):
    """scikit-learn is an optional extra (only the digits data needs it): import it with a clear hint."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f'the digits data needs scikit-learn ({exc}); install it with {_SKLEARN_HINT}') from exc


@functools.lru_cache(maxsize=None)
def _load() -> tuple[np.ndarray, np.ndarray]:
    bunch = _sklearn('sklearn.datasets').load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=None)
def digits_split_indices(split_seed: int = 0, test_size: float = 0.2, val_size: float = 0.2,
                         train_fraction: float = 1.0) -> dict[str, np.ndarray]:
    """Disjoint, stratified index arrays ``{'train', 'val', 'test'}`` into the 1,797 images."""
    if not 0 < test_size < 1 or not 0 < val_size < 1 or test_size + val_size >= 1:
        raise ValueError(f'test_size ({test_size}) and val_size ({val_size}) must be in (0, 1) with a sum below 1')
    if not 0 < train_fraction <= 1:
        raise ValueError(f'train_fraction must be in (0, 1], got {train_fraction}')
    train_test_split = _sklearn('sklearn.model_selection').train_test_split
    _, labels = _load()
    every = np.arange(len(labels))
    rest, test = train_test_split(every, test_size=test_size, stratify=labels, random_state=split_seed)
    train, val = train_test_split(rest, test_size=val_size / (1 - test_size), stratify=labels[rest],
                                  random_state=split_seed)
    if train_fraction < 1:
        train, _ = train_test_split(train, train_size=train_fraction, stratify=labels[train], random_state=split_seed)
    return {'train': np.sort(train), 'val': np.sort(val), 'test': np.sort(test)}


class _ImageDataset(Dataset):
    """``(image tensor, int label)`` pairs from preloaded tensors, with optional transforms."""

    images: torch.Tensor
    targets: torch.Tensor
    transform: Callable | None = None
    target_transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image, target = self.images[index], int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


class Digits(_ImageDataset):
    """scikit-learn's digits as a torch dataset of ``(image (1, H, W) float32, label int)``.

    Args:
        split: ``'train'``, ``'val'`` or ``'test'``.
        split_seed: seed of the stratified split (keep it fixed across runs you compare).
        train_fraction: stratified fraction of the training split to keep.
        image_size: resize the 8x8 images (bilinear) to this size; ``None`` keeps 8x8.
        normalize: normalise with the training split's mean/std (default) or only scale to [0, 1].
        transform, target_transform: optional callables applied to the image tensor / label.
    """

    def __init__(self, split: str = 'train', split_seed: int = 0, train_fraction: float = 1.0,
                 image_size: int | None = None, normalize: bool = True, transform: Callable | None = None,
                 target_transform: Callable | None = None, test_size: float = 0.2, val_size: float = 0.2):
        if split not in SPLITS:
            raise ValueError(f'split must be one of {list(SPLITS)}, got {split!r}')
        images, labels = _load()
        indices = digits_split_indices(split_seed, test_size, val_size, train_fraction)
        self.split, self.indices = split, indices[split]
        x = torch.from_numpy(images[self.indices]).unsqueeze(1)
        if image_size is not None and image_size != 8:
            x = F.interpolate(x, size=(image_size, image_size), mode='bilinear', align_corners=False)
        if normalize:
            train = torch.from_numpy(images[indices['train']])
            x = (x - train.mean()) / train.std()
        self.images, self.targets = x.contiguous(), torch.from_numpy(labels[self.indices])
        self.transform, self.target_transform = transform, target_transform
        self.classes = list(range(10))

    def __repr__(self) -> str:
        return f'Digits(split={self.split!r}, images={len(self)}, shape={tuple(self.images.shape[1:])})'


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------
FASHION_MNIST_ROOT = '/usr/share/datasets/fashion-mnist'  # Debian/Ubuntu package dataset-fashion-mnist
FASHION_MNIST_ENV = 'OPDF_FASHION_MNIST_ROOT'
FASHION_MNIST_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                       'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned bytes; the low byte is the number of dimensions


class IdxFormatError(ValueError):
    """An idx file that is not what its name says (wrong magic number, size or contents)."""


def _idx_path(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f'{name}.gz'):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """An unsigned-byte idx file (gzipped when its name ends in ``.gz``) as a uint8 array of ``ndim`` dims.

    Raises:
        IdxFormatError: wrong magic number (not an unsigned-byte idx file of ``ndim`` dimensions, or a
            gzipped file without ``.gz``), truncated or over-long data; the message names the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # e.g. a truncated gzip stream or a non-gzip file named .gz
        raise IdxFormatError(f'{path}: cannot read ({type(exc).__name__}: {exc})') from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f'{path}: {len(raw)} bytes, shorter than an idx header of {header} bytes')
    magic = int.from_bytes(raw[:4], 'big')
    if magic != _IDX_MAGIC[ndim]:
        hint = ' (a gzipped file: name it *.gz)' if raw[:2] == b'\x1f\x8b' else ''
        raise IdxFormatError(f'{path}: magic number 0x{magic:08x}, expected 0x{_IDX_MAGIC[ndim]:08x} (unsigned-byte '
                             f'idx file with {ndim} dimension(s)){hint}')
    dims = tuple(int.from_bytes(raw[4 + 4 * k:8 + 4 * k], 'big') for k in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise IdxFormatError(f'{path}: header says {"x".join(map(str, dims))} = {expected} bytes of data, '
                             f'found {len(raw) - header}')
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _missing_message(root: Path, missing: Sequence[str]) -> str:
    return (f'Fashion-MNIST: {root} lacks {", ".join(missing)} (each may be gzipped, *.gz). Get the four files '
            f'either from the Debian/Ubuntu package (as root: apt-get install dataset-fashion-mnist; it installs '
            f'them into {FASHION_MNIST_ROOT}, the default root), or on a machine with internet with torchvision: '
            f"torchvision.datasets.FashionMNIST('DIR', download=True) and pass root: 'DIR/FashionMNIST/raw' "
            f'(or set ${FASHION_MNIST_ENV})')


def _resolve_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        root = os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_ROOT
    return Path(os.path.expanduser(str(root)))


def _fashion_files(root: Path) -> dict[str, tuple[Path, Path]]:
    found, missing = {}, []
    for part, names in FASHION_MNIST_FILES.items():
        paths = [_idx_path(root, name) for name in names]
        missing += [name for name, path in zip(names, paths) if path is None]
        found[part] = tuple(paths)
    if missing:
        raise FileNotFoundError(_missing_message(root, missing))
    return found


@functools.lru_cache(maxsize=4)
def _read_part(images_path: Path, labels_path: Path, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one part; ``stamp`` (sizes, mtimes) keys the cache."""
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[1:] != (28, 28):
        raise IdxFormatError(f'{images_path}: images are {images.shape[1]}x{images.shape[2]}, Fashion-MNIST\'s are 28x28')
    if len(images) != len(labels):
        raise IdxFormatError(f'{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels')
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise IdxFormatError(f'{labels_path}: label {int(labels.max())} out of range 0..{len(FASHION_MNIST_CLASSES) - 1}')
    return images, labels.astype(np.int64)


def _part_key(root: Path, part: str) -> tuple[Path, Path, tuple]:
    """Resolved (images, labels) paths of one part and their (size, mtime) stamp, the cache key."""
    images_path, labels_path = _fashion_files(root)[part]
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (images_path, labels_path))
    return images_path.resolve(), labels_path.resolve(), stamp


def _hash_order(indices: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """A fixed pseudo-random key per index (splitmix64 of seed, salt and index): machine- and version-independent."""
    with np.errstate(over='ignore'):
        x = indices.astype(np.uint64) + np.uint64((seed * 0x9E3779B1 + salt * 0x85EBCA77) % 2 ** 64)
        x = x * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _stratified_take(indices: np.ndarray, labels: np.ndarray, size: int, seed: int, salt: int) -> np.ndarray:
    """``size`` of ``indices``, every class in proportion (largest remainders), lowest hash keys first."""
    classes, counts = np.unique(labels[indices], return_counts=True)
    exact = counts * (size / len(indices))
    take = np.floor(exact).astype(np.int64)
    order = sorted(range(len(classes)), key=lambda k: (-(exact[k] - take[k]), classes[k]))
    for k in order[:size - int(take.sum())]:
        take[k] += 1
    chosen = []
    for cls, n in zip(classes, take):
        members = indices[labels[indices] == cls]
        keys = _hash_order(members, seed, salt)
        chosen.append(members[np.lexsort((members, keys))[:n]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def fashion_split_indices(labels: np.ndarray, val_size: int = 5000, split_seed: int = 0,
                          train_size: int | None = None) -> dict[str, np.ndarray]:
    """Disjoint sorted index arrays ``{'train', 'val'}`` into the training part, both stratified.

    ``val`` is fixed by ``(val_size, split_seed)``; ``train`` is the rest, or its stratified subsample of
    ``train_size`` images (smaller subsamples are subsets of larger ones with the same seed).
    """
    n = len(labels)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or not 0 < val_size < n:
        raise ValueError(f'val_size must be an integer in 1..{n - 1} (images of the {n} training images), '
                         f'got {val_size!r}')
    every = np.arange(n, dtype=np.int64)
    val = _stratified_take(every, labels, int(val_size), split_seed, salt=1)
    train = np.setdiff1d(every, val, assume_unique=True)
    if train_size is not None and train_size != len(train):
        if isinstance(train_size, bool) or not isinstance(train_size, (int, np.integer)) or not 0 < train_size <= len(train):
            raise ValueError(f'train_size must be an integer in 1..{len(train)} (the training split after '
                             f'validation), got {train_size!r}')
        train = _stratified_take(train, labels, int(train_size), split_seed, salt=2)
    return {'train': train, 'val': val}


@functools.lru_cache(maxsize=8)
def _train_stats(images_path: Path, labels_path: Path, stamp: tuple, val_size: int, split_seed: int) -> tuple[float, float]:
    """Mean and standard deviation (pixels scaled to [0, 1]) of the whole training split, from exact integer sums."""
    images, labels = _read_part(images_path, labels_path, stamp)
    train = fashion_split_indices(labels, val_size, split_seed)['train']
    histogram = np.bincount(images[train].reshape(-1), minlength=256).astype(np.int64)
    levels = np.arange(256, dtype=np.int64)
    count, total, squares = int(histogram.sum()), int(histogram @ levels), int(histogram @ levels ** 2)
    mean = total / count
    var = (squares - total * mean) / max(count - 1, 1)
    return mean / 255.0, float(np.sqrt(max(var, 0.0))) / 255.0


class FashionMNIST(_ImageDataset):
    """Fashion-MNIST as a torch dataset of ``(image (1, 28, 28) float32, label int)``.

    Args:
        split: ``'train'``, ``'val'`` (a fixed stratified part of the 60,000 training images) or
            ``'test'`` (the 10,000 ``t10k`` images).
        root: folder of ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
            and ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``). Default ``$OPDF_FASHION_MNIST_ROOT`` or
            the Debian package's ``/usr/share/datasets/fashion-mnist``.
        val_size: validation images carved from the training part (stratified). Default 5,000.
        split_seed: seed of the validation split and the subsample (keep it fixed across runs you compare).
        train_size, train_fraction: stratified subsample of the training split (images, or a fraction
            in (0, 1]); at most one of them. Validation and test are never subsampled.
        normalize: ``True`` (default): standardise with the mean/std of the whole training split
            (after removing validation, before subsampling, so every split and subsample uses the same
            numbers); ``False``: only scale to [0, 1]; or an explicit ``[mean, std]``.
        transform, target_transform: optional callables applied to the image tensor / label.
    """

    def __init__(self, split: str = 'train', root: str | os.PathLike | None = None, val_size: int = 5000,
                 split_seed: int = 0, train_size: int | None = None, train_fraction: float | None = None,
                 normalize: bool | Sequence[float] = True, transform: Callable | None = None,
                 target_transform: Callable | None = None):
        if split not in SPLITS:
            raise ValueError(f'FashionMNIST: split must be one of {list(SPLITS)}, got {split!r}')
        if train_size is not None and train_fraction is not None:
            raise ValueError('FashionMNIST: give train_size or train_fraction, not both')
        self.root = _resolve_root(root)
        if not self.root.is_dir():
            raise FileNotFoundError(_missing_message(self.root, [n for names in FASHION_MNIST_FILES.values()
                                                                 for n in names]) + f' ({self.root} is not a folder)')
        train_key = _part_key(self.root, 'train')
        train_images, train_labels = _read_part(*train_key)
        parts = fashion_split_indices(train_labels, val_size, split_seed)  # validates val_size
        if train_fraction is not None:
            if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) \
                    or not 0 < train_fraction <= 1:
                raise ValueError(f'FashionMNIST: train_fraction must be in (0, 1], got {train_fraction!r}')
            train_size = max(1, round(train_fraction * len(parts['train'])))
        if train_size is not None:
            parts = fashion_split_indices(train_labels, val_size, split_seed, train_size)
        if split == 'test':
            images, labels = _read_part(*_part_key(self.root, 'test'))
            self.indices = np.arange(len(labels), dtype=np.int64)
        else:
            images, labels = train_images, train_labels
            self.indices = parts[split]
        self.split = split
        x = torch.from_numpy(images[self.indices].astype(np.float32) / 255.0).unsqueeze(1)
        if normalize is True:
            mean, std = _train_stats(*train_key, val_size, split_seed)
        elif normalize is False or normalize is None:
            mean, std = 0.0, 1.0
        elif isinstance(normalize, (list, tuple)) and len(normalize) == 2 and float(normalize[1]) > 0:
            mean, std = float(normalize[0]), float(normalize[1])
        else:
            raise ValueError(f'FashionMNIST: normalize must be true, false or [mean, std > 0], got {normalize!r}')
        self.mean, self.std = mean, std
        self.images = ((x - mean) / std).contiguous()
        self.targets = torch.from_numpy(labels[self.indices])
        self.transform, self.target_transform = transform, target_transform
        self.classes = list(FASHION_MNIST_CLASSES)

    def __repr__(self) -> str:
        return f'FashionMNIST(split={self.split!r}, images={len(self)}, root={str(self.root)!r})'


def held_out_indices(targets: Sequence[int] | np.ndarray, per_class: int = 50, split_seed: int = 0) -> np.ndarray:
    """Sorted indices of the held-out part: ``per_class`` items of every class, the lowest seeded hash
    keys of their indices (the same on every machine; a larger ``per_class`` holds a smaller one's)."""
    labels = np.asarray(targets)
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f'HeldOut: per_class must be a positive integer, got {per_class!r}')
    every = np.arange(len(labels), dtype=np.int64)
    chosen = []
    for cls in np.unique(labels):
        members = every[labels == cls]
        if len(members) <= per_class:
            raise ValueError(f'HeldOut: class {cls} has {len(members)} items; holding out {per_class} would leave '
                             f'none to train on')
        keys = _hash_order(members, split_seed, salt=3)
        chosen.append(members[np.lexsort((members, keys))[:per_class]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


class HeldOut(Dataset):
    """The ``'holdout'`` part of a labelled dataset (``per_class`` items of every class, fixed by
    ``split_seed``; :func:`held_out_indices`) or the ``'fit'`` part (all the others).

    ``dataset`` needs ``targets`` (torchvision's ``ImageFolder`` has them: its files are sorted, so the
    parts depend only on the folder's contents). The parts are disjoint and together the whole dataset.
    ``targets`` and ``classes`` are the part's (torchdistill's CRD wrapper reads them). In a config::

        ilsvrc2012/holdout: !import_call
          key: 'opdf_torchdistill.data.HeldOut'
          init:
            kwargs:
              part: 'holdout'
              per_class: 50
              dataset: !import_call {key: 'torchvision.datasets.ImageFolder', init: {kwargs: {root: ...}}}
    """

    def __init__(self, dataset: Dataset, part: str, per_class: int = 50, split_seed: int = 0):
        if part not in ('fit', 'holdout'):
            raise ValueError(f"HeldOut: part must be 'fit' or 'holdout', got {part!r}")
        if not hasattr(dataset, 'targets'):
            raise ValueError(f'HeldOut: {type(dataset).__name__} has no targets (labels) to stratify by')
        targets = np.asarray(dataset.targets)
        holdout = held_out_indices(targets, per_class, split_seed)
        self.indices = holdout if part == 'holdout' else np.setdiff1d(np.arange(len(targets)), holdout,
                                                                       assume_unique=True)
        self.dataset, self.part = dataset, part
        self.targets = targets[self.indices].tolist()
        self.classes = list(getattr(dataset, 'classes', sorted(set(targets.tolist()))))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[index])]

    def __repr__(self) -> str:
        return f'HeldOut(part={self.part!r}, items={len(self)}, of {type(self.dataset).__name__})'
