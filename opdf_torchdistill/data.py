"""Real image data that ships inside a package: scikit-learn's handwritten digits (no network, ever).

1,797 grayscale 8x8 images of the digits 0-9 (UCI "Optical Recognition of Handwritten Digits",
bundled with scikit-learn as ``sklearn.datasets.load_digits``).

The split is fixed and stratified: 20 % test, then 20 % (of the whole) validation, the remaining
60 % train (1,077 / 360 / 360 images with ``split_seed=0``), from scikit-learn's
``train_test_split`` with ``random_state=split_seed``. ``train_fraction`` keeps a stratified subset of
the training split (for low-data regimes); validation and test are never subsampled.

Pixels (0..16) are scaled to [0, 1] and, by default, normalised with the mean and standard deviation
of the *training split* (computed, not hard-coded, so every split uses the same numbers).
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ['Digits', 'digits_split_indices']

SPLITS = ('train', 'val', 'test')


@functools.lru_cache(maxsize=None)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=None)
def digits_split_indices(split_seed: int = 0, test_size: float = 0.2, val_size: float = 0.2,
                         train_fraction: float = 1.0) -> dict[str, np.ndarray]:
    """Disjoint, stratified index arrays ``{'train', 'val', 'test'}`` into the 1,797 images."""
    from sklearn.model_selection import train_test_split
    if not 0 < test_size < 1 or not 0 < val_size < 1 or test_size + val_size >= 1:
        raise ValueError(f'test_size ({test_size}) and val_size ({val_size}) must be in (0, 1) with a sum below 1')
    if not 0 < train_fraction <= 1:
        raise ValueError(f'train_fraction must be in (0, 1], got {train_fraction}')
    _, labels = _load()
    every = np.arange(len(labels))
    rest, test = train_test_split(every, test_size=test_size, stratify=labels, random_state=split_seed)
    train, val = train_test_split(rest, test_size=val_size / (1 - test_size), stratify=labels[rest],
                                  random_state=split_seed)
    if train_fraction < 1:
        train, _ = train_test_split(train, train_size=train_fraction, stratify=labels[train], random_state=split_seed)
    return {'train': np.sort(train), 'val': np.sort(val), 'test': np.sort(test)}


class Digits(Dataset):
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

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, target = self.images[index], int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self) -> str:
        return f'Digits(split={self.split!r}, images={len(self)}, shape={tuple(self.images.shape[1:])})'
