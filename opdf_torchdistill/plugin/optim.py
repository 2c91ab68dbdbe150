"""torchdistill optimizer component: ``OPDFOptimizer``, any torch optimizer with the MPO cores in their
own parameter group at a scaled learning rate.

Why: a chain of cores trained by SGD moves the contracted weight faster than the weight itself would
move (every core's step is multiplied by the others), so an over-parameterized student wants a smaller
learning rate than its baseline (the paper's Fig. 2b; on digits the best uniform rate with one dummy
factor was 1/4 of KD's). A per-core rate keeps BatchNorm, biases and other plain parameters at the
baseline's rate.

.. code-block:: yaml

    optimizer:
      key: 'OPDFOptimizer'
      kwargs: {base: 'SGD', core_lr_scale: 'auto', lr: 0.1, momentum: 0.9, weight_decay: 0.0001}

**The optimizer control** (``as_if_mpo``). A comparison of an MPO student with its dense baseline
changes two things at once: the over-parameterization, and the per-group learning rates. To separate
them, the dense student can train with exactly the MPO arm's rates: ``as_if_mpo`` takes the MPO
arm's ``mpo:`` options, plans (without decomposing anything) which dense weights OPDF would
over-parameterize, and trains those weights at the rate their cores would get; everything else
trains at ``lr``. It needs the module, so the optimizer block sets ``filters_params: False``.

.. code-block:: yaml

    optimizer:
      key: 'OPDFOptimizer'
      filters_params: False
      kwargs: {base: 'SGD', core_lr_scale: 'auto', as_if_mpo: {num_dummy: 1}, lr: 0.1, momentum: 0.9}
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

from torch import nn
from torchdistill.optim.registry import OPTIM_DICT, register_optimizer

from ..options import OptionError
from ..surgery import CORE_TAG, mpo_modules

__all__ = ['opdf_optimizer', 'core_lr_factor']

logger = logging.getLogger(__name__)

def core_lr_factor(param, core_lr_scale) -> float | None:
    """The learning-rate factor of a core (``None`` for a plain parameter).

    Cores are recognised by a tag ``overparameterize`` sets; ``copy.deepcopy`` of a Parameter drops
    it, so optimise a deep-copied model with ``filters_params: False`` (the module is then searched).
    """
    tag = getattr(param, CORE_TAG, None)
    if tag is None:
        return None
    return _factor(tag[1], core_lr_scale)


def _factor(num_dummy: int, core_lr_scale) -> float:
    if core_lr_scale == 'auto':
        return 1.0 / (2 * (num_dummy + 1))  # measured on digits: lr / 2(L + 1) for L dummy factors
    return float(core_lr_scale)


def _as_if_mpo_factors(module: nn.Module, as_if_mpo: Mapping[str, Any], core_lr_scale) -> dict[int, float]:
    """``{id(dense weight): factor}`` for the weights ``overparameterize(module, **as_if_mpo)`` would turn
    into cores, each at the factor its cores would get (planning only: nothing is decomposed)."""
    from ..surgery import is_overparameterized, plan, weight_sites
    if not isinstance(as_if_mpo, Mapping):
        raise OptionError(f'OPDFOptimizer: as_if_mpo must be a mapping of mpo: options (e.g. {{num_dummy: 1}}), '
                          f'got {type(as_if_mpo).__name__}')
    if 'align_to' in as_if_mpo:
        raise OptionError('OPDFOptimizer: as_if_mpo takes the MPO arm\'s mpo: options without align_to (teacher-aware '
                          'planning changes factor shapes, not which weights are selected or their rates)')
    if is_overparameterized(module):
        raise OptionError('OPDFOptimizer: as_if_mpo is for a dense student (the optimizer control); this student '
                          'already has MPO cores, which get their rates without it')
    report = plan(module, dict(as_if_mpo))
    weights = {site.name: getattr(owner, site.tensor_name) for owner, site in weight_sites(module)[0]}
    factors = {id(weights[row.name]): _factor(row.plan.num_dummy, core_lr_scale) for row in report.layers}
    logger.info('OPDFOptimizer as_if_mpo %s: %d dense weights train at the rates their cores would get (%s), the '
                'rest at lr', dict(as_if_mpo), len(factors),
                ', '.join(sorted({f'lr x {f:g}' for f in factors.values()})) or 'none')
    return factors


@register_optimizer(key='OPDFOptimizer')
def opdf_optimizer(params: Iterable, base: str = 'SGD', core_lr_scale: Any = 'auto',
                   as_if_mpo: Mapping[str, Any] | None = None, **kwargs: Any):
    """Build ``base`` (a ``torch.optim`` class name or registered key) with the cores' groups at
    ``lr * core_lr_scale`` (``'auto'``: ``1 / 2(L + 1)`` per weight with L dummy factors).

    ``as_if_mpo``: the optimizer control for a dense student (see the module docstring)."""
    if base not in OPTIM_DICT or base == 'OPDFOptimizer':
        raise OptionError(f'OPDFOptimizer: unknown base optimizer {base!r}; e.g. SGD, Adam, AdamW')
    if not (core_lr_scale == 'auto' or (isinstance(core_lr_scale, (int, float)) and not isinstance(core_lr_scale, bool)
                                        and core_lr_scale > 0)):
        raise OptionError(f"OPDFOptimizer: core_lr_scale must be 'auto' or a positive number, got {core_lr_scale!r}")
    if 'lr' not in kwargs:
        raise OptionError('OPDFOptimizer: give lr (the rate of the plain parameters)')
    dense_factors: dict[int, float] = {}
    if as_if_mpo is not None and not isinstance(params, nn.Module):
        raise OptionError('OPDFOptimizer: as_if_mpo needs the model: set filters_params: False in the optimizer '
                          'block (torchdistill then passes the module instead of its parameters)')
    if isinstance(params, nn.Module):  # torchdistill passes the module with filters_params: False
        if as_if_mpo is not None:
            dense_factors = _as_if_mpo_factors(params, as_if_mpo, core_lr_scale)
        for _, module, tensor_name, mpo in mpo_modules(params):
            for core in module.parametrizations[tensor_name].parameters():
                setattr(core, CORE_TAG, (mpo.plan.num_cores, mpo.plan.num_dummy))  # e.g. after a deepcopy
        params = [p for p in params.parameters() if p.requires_grad]
    groups: dict[float | None, list] = {}
    for p in params:
        groups.setdefault(dense_factors.get(id(p), core_lr_factor(p, core_lr_scale)), []).append(p)
    param_groups = [{'params': ps, **({} if f is None else {'lr': kwargs['lr'] * f})} for f, ps in groups.items()]
    return OPTIM_DICT[base](param_groups, **kwargs)
