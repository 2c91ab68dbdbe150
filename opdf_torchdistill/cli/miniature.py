"""A recipe in miniature: its datasets swapped for FakeData of the right image size and class count,
tiny batches, one epoch per stage, no pretrained weights. Used to check that a recipe builds and trains
before it gets real data and GPUs (``tests/test_recipes.py``, ``tools/grad_norms.py --miniature``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torchvision
from torchdistill.common import main_util, yaml_util

from .common import load_config

__all__ = ['FakeImages', 'FAKE_DATASETS', 'load_miniature', 'shrink']

# Source image size (the recipe's transforms then crop/resize) and class count per dataset folder.
FAKE_DATASETS = {'ilsvrc2012': ((3, 64, 64), 1000), 'cifar10': ((3, 32, 32), 10), 'cifar100': ((3, 32, 32), 100)}
_DATASET_KEYS = {'torchvision.datasets.ImageFolder', 'torchvision.datasets.CIFAR10', 'torchvision.datasets.CIFAR100'}


class FakeImages(torchvision.datasets.FakeData):
    """FakeData with the ``targets``/``classes`` attributes real datasets have (CRD needs them)."""

    def __init__(self, size, image_size, num_classes, transform, offset):
        super().__init__(size=size, image_size=image_size, num_classes=num_classes, transform=transform,
                         random_offset=offset)
        self.classes = list(range(num_classes))
        self.targets = [int(super(FakeImages, self).__getitem__(i)[1]) for i in range(size)]


@contextlib.contextmanager
def _fake_datasets(image_size, num_classes, size):
    offsets = iter(range(0, 10_000, 1000))
    real = main_util.import_call

    def fake_import_call(key, package=None, init=None, **kwargs):
        if key in _DATASET_KEYS:
            transform = ((init or {}).get('kwargs') or {}).get('transform')
            return FakeImages(size, image_size, num_classes, transform, next(offsets))
        return real(key, package, init, **kwargs)
    yaml_util.import_call = fake_import_call
    try:
        yield
    finally:
        yaml_util.import_call = real


def load_miniature(path: str | Path, size: int = 8, batch_size: int = 4, image_size=None, num_classes=None) -> dict:
    """Load ``path`` with FakeData (``size`` images per split) and :func:`shrink` it.

    ``image_size``/``num_classes`` default by the recipe's folder name (:data:`FAKE_DATASETS`; 3x32x32
    and 10 classes otherwise). Datasets other than ImageFolder/CIFAR stay as the recipe builds them.
    """
    path = Path(path)
    default_size, default_classes = FAKE_DATASETS.get(path.parent.name, ((3, 32, 32), 10))
    with _fake_datasets(image_size or default_size, num_classes or default_classes, size):
        config = load_config(str(path))
    return shrink(config, batch_size, size)


def shrink(node, batch_size: int = 4, size: int = 8, parent_key=None):
    """One epoch per stage, tiny batches, no workers, no pretrained weights, checkpoints or downloads, in place."""
    if isinstance(node, dict):
        for key, value in list(node.items()):
            if key == 'num_epochs':
                node[key] = 1
            elif key == 'batch_size':
                node[key] = batch_size
            elif key == 'num_workers':
                node[key] = 0
            elif key == 'pin_memory':
                node[key] = False
            elif key == 'weights' and parent_key == 'kwargs':
                node[key] = None  # no pretrained downloads
            elif key == 'pretrained':
                node[key] = False
            elif key == 'src_ckpt':
                node[key] = None  # no trained checkpoints in a miniature run
            elif key == 'num_negative_samples':
                node[key] = 4
            elif key == 'output_size' and 'teacher_norm_module_path' in node:
                node[key] = size  # CRD's memory bank: one row per training image
            elif key == 'wrapper' and value in ('DataParallel', 'DistributedDataParallel'):
                node[key] = None
            else:
                shrink(value, batch_size, size, key)
    elif isinstance(node, list):
        for value in node:
            shrink(value, batch_size, size, parent_key)
    return node
