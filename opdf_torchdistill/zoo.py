"""Small classifiers for the embedded digits data (registered as torchdistill model keys).

``digits_cnn`` is one layout at any width, so a teacher and a student differ only in width and
OPDF's alignment pairs layer ``i`` with layer ``i`` (their auxiliary cores coincide when the
student's widths divide the teacher's; see ``planning.teacher_plan``)::

    features.0  Conv2d(in, w1, 3)   BN ReLU
    features.3  Conv2d(w1, w2, 3)   BN ReLU  MaxPool(2)
    features.7  Conv2d(w2, w3, 3)   BN ReLU  global average pool
    classifier  Linear(w3, classes)
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

__all__ = ['DigitsCNN', 'digits_cnn']


class DigitsCNN(nn.Module):
    def __init__(self, widths: Sequence[int] = (32, 64, 64), num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
            nn.Conv2d(w1, w2, 3, padding=1, bias=False), nn.BatchNorm2d(w2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w2, w3, 3, padding=1, bias=False), nn.BatchNorm2d(w3), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(w3, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def digits_cnn(widths: Sequence[int] = (32, 64, 64), num_classes: int = 10, in_channels: int = 1, **kwargs) -> DigitsCNN:
    if kwargs:
        raise TypeError(f'digits_cnn: unexpected arguments {sorted(kwargs)}; valid: widths, num_classes, in_channels')
    return DigitsCNN(widths, num_classes, in_channels)
