"""Small classifiers for the embedded studies (registered as torchdistill model keys).

``digits_cnn`` (8x8 digits) is one layout at any width, so a teacher and a student differ only in width and
OPDF's alignment pairs layer ``i`` with layer ``i`` (their auxiliary cores coincide when the
student's widths divide the teacher's; see ``planning.teacher_plan``)::

    features.0  Conv2d(in, w1, 3)   BN ReLU
    features.3  Conv2d(w1, w2, 3)   BN ReLU  MaxPool(2)
    features.7  Conv2d(w2, w3, 3)   BN ReLU  global average pool
    classifier  Linear(w3, classes)

``fashion_cnn`` (28x28 Fashion-MNIST) has the same stage widths at any depth, so a deep teacher and a
shallow student share every layer shape: the stem, the stride-2 ``down.*`` convolutions and the head
exist once in both, and a student stage's block ``i`` pairs with a teacher block of the same stage
(``i <- 2i + 1`` at half the depth, by ``matching.auto_match``)::

    stem        Conv2d(in, w1, 3)                 BN ReLU        28x28
    stages.s.b  Conv2d(ws, ws, 3)  (b < depth[s])  BN ReLU        28, 14, 7
    down.s      Conv2d(ws, ws+1, 3, stride 2)     BN ReLU        between stages
    head        global average pool, Linear(w_last, classes)

``fashion_vit`` is a small pre-norm ViT (patch embedding, class token, learned positions) whose
attention has separate ``query``/``key``/``value``/``out`` Linears (as BERT's), so every attention and
MLP matrix is a plain ``nn.Linear`` that OPDF over-parameterizes and aligns.
``fashion_vit_from_teacher`` builds a shallower one whose block ``i`` is a copy of a teacher block
(``layer_map: 'odd'``, ``2i + 1``; ``'first'``, ``i``: BERT-of-Theseus' initialisation) and whose
embeddings, final norm and head are the teacher's, loaded from the teacher's checkpoint with
``torch.load(..., weights_only=True)``. That ``layer_map`` is the *initialisation* map only; the
alignment pairs are the ``AuxTensorAlignmentLoss``'s ``layer_map`` (or ``mpo.layer_map`` when
planned with ``align_to``; default: relative depth, block ``i`` <- ``2i + 1``). ``'odd'`` with the
default alignment starts every aligned pair at distance 0 (configs/fashion/vit/); ``'first'`` with
``'uniform'`` alignment is the paper's Theseus setting (configs/fashion/vit_theseus/).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .io import load_checkpoint

__all__ = ['DigitsCNN', 'digits_cnn', 'FashionCNN', 'fashion_cnn', 'FashionViT', 'fashion_vit',
           'fashion_vit_from_teacher', 'init_vit_from_teacher', 'vit_layer_map', 'VIT_LAYER_MAPS']


logger = logging.getLogger(__name__)


def _no_extra(name: str, kwargs: dict, valid: str) -> None:
    if kwargs:
        raise TypeError(f'{name}: unexpected arguments {sorted(kwargs)}; valid: {valid}')


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
    """The digits CNN: three 3x3 convolutions (BatchNorm, ReLU) of ``widths`` channels and a linear head
    (teacher ``(32, 64, 64)``, student ``(4, 8, 8)`` in the digits recipes)."""
    _no_extra('digits_cnn', kwargs, 'widths, num_classes, in_channels')
    return DigitsCNN(widths, num_classes, in_channels)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: a same-width CNN pair
# ----------------------------------------------------------------------------------------------
def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class FashionCNN(nn.Module):
    def __init__(self, widths: Sequence[int] = (16, 32, 64), depth: int | Sequence[int] = 1, num_classes: int = 10,
                 in_channels: int = 1):
        super().__init__()
        widths = [int(w) for w in widths]
        depths = [int(depth)] * len(widths) if isinstance(depth, int) else [int(d) for d in depth]
        if not widths or min(widths) < 1:
            raise ValueError(f'fashion_cnn: widths must be positive integers, got {widths}')
        if len(depths) != len(widths) or min(depths) < 1:
            raise ValueError(f'fashion_cnn: depth must be a positive integer or one per stage ({len(widths)}), '
                             f'got {depth!r}')
        self.widths, self.depths = tuple(widths), tuple(depths)
        self.stem = _conv_bn(in_channels, widths[0])
        self.stages = nn.ModuleList(nn.Sequential(*(_conv_bn(w, w) for _ in range(d))) for w, d in zip(widths, depths))
        self.down = nn.ModuleList(_conv_bn(a, b, stride=2) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = self.stem(x)
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if s < len(self.down):
                x = self.down[s](x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def fashion_cnn(widths: Sequence[int] = (16, 32, 64), depth: int | Sequence[int] = 1, num_classes: int = 10,
                in_channels: int = 1, **kwargs) -> FashionCNN:
    """Teacher ``depth: 2``, student ``depth: 1`` at the same ``widths`` (see the module docstring)."""
    _no_extra('fashion_cnn', kwargs, 'widths, depth, num_classes, in_channels')
    return FashionCNN(widths, depth, num_classes, in_channels)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: a ViT pair in the paper's regime (student layers initialised from teacher layers)
# ----------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f'fashion_vit: dim ({dim}) must be divisible by heads ({heads})')
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FashionViT(nn.Module):
    def __init__(self, depth: int = 6, dim: int = 64, heads: int = 4, mlp_dim: int = 128, patch: int = 4,
                 image_size: int = 28, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        if depth < 1 or image_size % patch:
            raise ValueError(f'fashion_vit: depth must be >= 1 and patch ({patch}) must divide image_size '
                             f'({image_size}); got depth {depth}')
        self.depth = depth
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


_VIT_ARGS = 'depth, dim, heads, mlp_dim, patch, image_size, num_classes, in_channels'


def fashion_vit(depth: int = 6, dim: int = 64, heads: int = 4, mlp_dim: int = 128, patch: int = 4,
                image_size: int = 28, num_classes: int = 10, in_channels: int = 1, **kwargs) -> FashionViT:
    """A small ViT for Fashion-MNIST: ``depth`` blocks of width ``dim`` with separate Q/K/V/O Linears
    (teacher 6 blocks, student 3 in the Fashion-MNIST recipes)."""
    _no_extra('fashion_vit', kwargs, _VIT_ARGS)
    return FashionViT(depth, dim, heads, mlp_dim, patch, image_size, num_classes, in_channels)


VIT_LAYER_MAPS = ('odd', 'even', 'first', 'uniform')


def vit_layer_map(layer_map: str | Sequence[int], depth: int, teacher_depth: int) -> list[int]:
    """Teacher block of every student block (the initialisation map): ``'odd'`` ``i <- 2i + 1``,
    ``'even'`` ``i <- 2i``, ``'first'`` ``i <- i`` (Theseus), ``'uniform'`` ``i <- (i + 1) T // S - 1``
    (the last block of each of ``S`` equal shares: ``2i + 1`` at half the depth), or a list."""
    if layer_map == 'odd':
        mapped = [2 * i + 1 for i in range(depth)]
    elif layer_map == 'even':
        mapped = [2 * i for i in range(depth)]
    elif layer_map == 'first':
        mapped = list(range(depth))
    elif layer_map == 'uniform':
        mapped = [(i + 1) * teacher_depth // depth - 1 for i in range(depth)]
    elif isinstance(layer_map, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in layer_map):
        mapped = list(layer_map)
        if len(mapped) != depth:
            raise ValueError(f'layer_map {mapped} has {len(mapped)} entries for a student of depth {depth}')
    else:
        raise ValueError(f"layer_map must be 'odd' (i <- 2i+1), 'even' (i <- 2i), 'first' (i <- i), 'uniform' "
                         f"(i <- (i+1)T//S - 1) or a list of teacher block indices (the initialisation map of "
                         f"fashion_vit_from_teacher), got {layer_map!r}")
    bad = [t for t in mapped if not 0 <= t < teacher_depth]
    if bad:
        raise ValueError(f'layer_map {mapped}: teacher blocks {bad} do not exist (the teacher has blocks '
                         f'0..{teacher_depth - 1})')
    return mapped


_BLOCK_KEY = re.compile(r'^blocks\.(\d+)\.(.+)$')


def init_vit_from_teacher(student: FashionViT, teacher_state: Mapping[str, torch.Tensor],
                          layer_map: str | Sequence[int] = 'odd', source: str = 'teacher') -> list[int]:
    """Copy the teacher's embeddings, final norm and head, and block ``layer_map[i]`` into block ``i``.

    Every student tensor must be set, with the teacher tensor of the same shape (errors name the key
    and ``source``). Returns the teacher block of every student block.
    """
    teacher_blocks = {int(m.group(1)) for m in map(_BLOCK_KEY.match, teacher_state) if m}
    teacher_depth = max(teacher_blocks) + 1 if teacher_blocks else 0
    mapped = vit_layer_map(layer_map, len(student.blocks), teacher_depth)
    new_state = {}
    for key, tensor in student.state_dict().items():
        m = _BLOCK_KEY.match(key)
        source_key = f'blocks.{mapped[int(m.group(1))]}.{m.group(2)}' if m else key
        if source_key not in teacher_state:
            raise KeyError(f'{source}: no {source_key!r} for the student\'s {key!r} (is it a fashion_vit checkpoint?)')
        value = teacher_state[source_key]
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f'{source}: {source_key!r} has shape {tuple(value.shape)}, the student\'s {key!r} '
                             f'{tuple(tensor.shape)}: build the student with the teacher\'s dim/heads/mlp_dim/patch')
        new_state[key] = value
    student.load_state_dict(new_state, strict=True)
    return mapped


def fashion_vit_from_teacher(teacher_ckpt: str, layer_map: str | Sequence[int] = 'odd', depth: int = 3, dim: int = 64,
                             heads: int = 4, mlp_dim: int = 128, patch: int = 4, image_size: int = 28,
                             num_classes: int = 10, in_channels: int = 1, **kwargs: Any) -> FashionViT:
    """A ``fashion_vit`` of ``depth`` blocks initialised from the teacher checkpoint ``teacher_ckpt``
    (a ``tools/train.py`` checkpoint ``{'model': state_dict, ...}`` or a bare state dict)."""
    _no_extra('fashion_vit_from_teacher', kwargs, 'teacher_ckpt, layer_map, ' + _VIT_ARGS)
    path = os.path.expanduser(str(teacher_ckpt))
    if not os.path.isfile(path):
        raise FileNotFoundError(f'fashion_vit_from_teacher: teacher checkpoint {path} does not exist (train the '
                                f'teacher first, e.g. tools/train.py --config configs/fashion/vit_teacher.yaml)')
    ckpt = load_checkpoint(path)  # plain data only, unless --trust_checkpoint names this file
    state = ckpt['model'] if isinstance(ckpt, Mapping) and isinstance(ckpt.get('model'), Mapping) else ckpt
    if not isinstance(state, Mapping):
        raise TypeError(f'fashion_vit_from_teacher: {path} holds {type(state).__name__}, not a state dict')
    student = FashionViT(depth, dim, heads, mlp_dim, patch, image_size, num_classes, in_channels)
    mapped = init_vit_from_teacher(student, state, layer_map, source=path)
    logger.info('fashion_vit_from_teacher: initialisation layer_map %r: student block i <- teacher block %s (the '
                'alignment pairs are the alignment layer_map\'s, not this one)', layer_map, mapped)
    return student
