"""What ``overparameterize`` did: one row per weight, the skipped modules, and whole-model totals."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .planning import MPOPlan
from .tables import format_table

__all__ = ['LayerRow', 'SkippedLayer', 'OverparamReport']


def _count(n: float) -> str:
    for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
        if abs(n) >= scale:
            return f'{n / scale:.2f}{unit}'
    return str(int(n))


@dataclass
class LayerRow:
    name: str
    module_type: str
    weight_shape: tuple[int, ...]
    plan: MPOPlan
    params_before: int
    frozen: tuple[int, ...] = ()
    partner: str | None = None
    error: float | None = None
    kind: str = ''  # the matching kind (Linear, Conv2d, MultiheadAttention, ...)

    @property
    def params_after(self) -> int:
        return self.plan.num_params

    @property
    def trainable_after(self) -> int:
        shapes = self.plan.core_shapes
        return sum(math.prod(s) for k, s in enumerate(shapes) if k not in self.frozen)

    @property
    def ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def flops(self) -> int:
        return self.plan.contraction_flops

    def to_dict(self) -> dict[str, Any]:
        return {
            'name': self.name, 'type': self.module_type, 'weight_shape': list(self.weight_shape),
            'matrix_shape': list(self.plan.shape), 'rows': list(self.plan.row_factors),
            'cols': list(self.plan.col_factors), 'bonds': list(self.plan.bonds), 'central': self.plan.central,
            'params_before': self.params_before, 'params_after': self.params_after,
            'trainable_after': self.trainable_after, 'contraction_flops': self.flops,
            'frozen_cores': list(self.frozen), 'partner': self.partner, 'reconstruction_error': self.error,
        }


@dataclass
class SkippedLayer:
    name: str
    module_type: str
    reason: str


@dataclass
class OverparamReport:
    """Returned by :func:`~opdf_torchdistill.overparameterize` (and :func:`~opdf_torchdistill.plan`).

    ``str(report)`` is the per-layer table; ``ratio`` is the whole-model parameter ratio while training.
    """
    layers: list[LayerRow] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    model_params: int = 0
    model_trainable: int = 0
    applied: bool = True
    seconds: float | None = None

    @property
    def params_training(self) -> int:
        """All parameters (incl. frozen cores) of the model while over-parameterized."""
        return self.model_params + sum(r.params_after - r.params_before for r in self.layers)

    @property
    def trainable_training(self) -> int:
        return self.model_trainable + sum(r.trainable_after - r.params_before for r in self.layers)

    @property
    def ratio(self) -> float:
        """Parameters while training / parameters of the plain model."""
        return self.params_training / self.model_params if self.model_params else 1.0

    @property
    def contraction_flops(self) -> int:
        """FLOPs to contract every MPO once (forward); a training step costs about 3x this."""
        return sum(r.flops for r in self.layers)

    def table(self) -> str:
        headers = ['layer', 'type', 'matrix', 'rows | cols', 'bonds', 'params', 'mpo params', 'ratio', 'MFLOP']
        rows = [[r.name, r.module_type, f'{r.plan.shape[0]}x{r.plan.shape[1]}', r.plan.describe(),
                 'x'.join(map(str, r.plan.bonds[1:-1])), _count(r.params_before), _count(r.params_after),
                 f'{r.ratio:.2f}', f'{r.flops / 1e6:.1f}'] for r in self.layers]
        if any(r.frozen for r in self.layers):
            headers.append('frozen')
            for row, r in zip(rows, self.layers):
                row.append(','.join(map(str, r.frozen)) or '-')
        if any(r.partner for r in self.layers):
            headers.append('teacher')
            for row, r in zip(rows, self.layers):
                row.append(r.partner or '-')
        out = [format_table(headers, rows, 'lllllrrrr' + 'l' * (len(headers) - 9))]
        if self.skipped:
            out.append(f'skipped ({len(self.skipped)}):')
            out.extend(f'  {s.name} ({s.module_type}): {s.reason}' for s in self.skipped)
        verb = 'over-parameterized' if self.applied else 'planned'
        out.append(
            f'{len(self.layers)} weights {verb}; model parameters {_count(self.model_params)} -> '
            f'{_count(self.params_training)} while training (ratio {self.ratio:.3f}, trainable '
            f'{_count(self.trainable_training)}); contraction {self.contraction_flops / 1e9:.3f} GFLOP per forward'
            + (f'; decomposed in {self.seconds:.2f} s' if self.seconds is not None else ''))
        return '\n'.join(out)

    __str__ = table

    def to_dict(self) -> dict[str, Any]:
        return {
            'layers': [r.to_dict() for r in self.layers],
            'skipped': [vars(s) for s in self.skipped],
            'model_params': self.model_params, 'params_training': self.params_training,
            'trainable_training': self.trainable_training, 'ratio': self.ratio,
            'contraction_flops': self.contraction_flops, 'applied': self.applied, 'seconds': self.seconds,
        }

