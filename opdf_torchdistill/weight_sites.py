"""Which weights of which modules can become MPOs, and how a weight is viewed as a matrix.

Matricization: every supported weight is viewed as ``(shape[0], prod(shape[1:]))``.

* ``nn.Linear``: ``(out, in)``, the OPDF authors' convention.
* ``nn.Conv1d/2d/3d``: ``(out, in / groups * prod(kernel))``. The output channel is the row, as for
  Linear, so a conv teacher and a conv student align by the same roles. Grouped and depthwise
  convolutions need nothing special: their weight tensor already stores only the ``in / groups``
  channels each filter sees, so we decompose that compact tensor rather than the block-diagonal
  ``(out, in * k)`` matrix, which would be mostly zeros, bigger, and not exactly representable
  by a full-bond MPO of the same size. The reshape is a view of the contiguous weight, so going back
  to the weight is free.
* ``nn.MultiheadAttention``: ``in_proj_weight`` ``(3E, E)`` when q/k/v share the embedding size,
  else ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` separately; ``out_proj`` is a Linear.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

__all__ = ['SUPPORTED_TYPES', 'WeightSite', 'classify_module', 'to_matrix']

#: Names accepted by the ``types`` option, mapped to the classes they select (subclasses included).
SUPPORTED_TYPES: dict[str, type] = {
    'Linear': nn.Linear,
    'Conv1d': nn.Conv1d,
    'Conv2d': nn.Conv2d,
    'Conv3d': nn.Conv3d,
    'MultiheadAttention': nn.MultiheadAttention,
}


@dataclass(frozen=True)
class WeightSite:
    """One weight tensor of one module: the unit that becomes an MPO."""
    module_name: str
    tensor_name: str
    module_type: str
    kind: str
    weight_shape: tuple[int, ...]

    @property
    def name(self) -> str:
        """Module path, plus ``.tensor`` when the tensor is not called ``weight`` (attention)."""
        if self.tensor_name == 'weight':
            return self.module_name
        return f'{self.module_name}.{self.tensor_name}' if self.module_name else self.tensor_name

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.weight_shape[0], math.prod(self.weight_shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.weight_shape)


def _kind(module: nn.Module) -> str | None:
    for kind in ('MultiheadAttention', 'Conv3d', 'Conv2d', 'Conv1d', 'Linear'):
        if isinstance(module, SUPPORTED_TYPES[kind]):
            return kind
    return None


def classify_module(module: nn.Module, module_name: str) -> tuple[list[WeightSite], list[tuple[str, str]]]:
    """Split a module's own weights into supported sites and ``(tensor_name, reason)`` skips.

    Only the module's direct tensors are looked at; a module without any weight of two or more
    dimensions (norms, activations, containers) yields nothing.
    """
    kind = _kind(module)
    type_name = parametrize.type_before_parametrizations(module).__name__  # the user's class
    if kind == 'MultiheadAttention':
        names = ['in_proj_weight'] if module._qkv_same_embed_dim else ['q_proj_weight', 'k_proj_weight', 'v_proj_weight']
    elif kind is not None:
        names = ['weight']
    else:
        names = []
    sites, skips = [], []
    for name in names:
        if parametrize.is_parametrized(module, name):
            skips.append((name, 'already parametrized'))
            continue
        tensor = module._parameters.get(name)
        if tensor is None:
            skips.append((name, 'no such parameter (None or not a Parameter)'))
        elif isinstance(tensor, UninitializedParameter):
            skips.append((name, 'lazy module not initialised yet (run a forward pass first)'))
        else:
            sites.append(WeightSite(module_name, name, type_name, kind, tuple(tensor.shape)))
    if kind is None:
        for name, tensor in module._parameters.items():
            # Weight-like tensors only: positional embeddings and class tokens are not projections.
            if tensor is not None and tensor.dim() >= 2 and 'weight' in name and \
                    not parametrize.is_parametrized(module, name):
                skips.append((name, f'{type_name} is not a supported type (supported: {", ".join(SUPPORTED_TYPES)})'))
    return sites, skips


def to_matrix(weight: Tensor) -> Tensor:
    """``(shape[0], prod(shape[1:]))`` view of a weight (see module docstring)."""
    return weight.reshape(weight.shape[0], -1)
