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
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn
from torchdistill.optim.registry import OPTIM_DICT, register_optimizer

from ..options import OptionError
from ..surgery import CORE_TAG, mpo_modules

__all__ = ['opdf_optimizer', 'core_lr_factor']



def core_lr_factor(param, core_lr_scale) -> float | None:
    """The learning-rate factor of a core (``None`` for a plain parameter).

    Cores are recognised by a tag ``overparameterize`` sets; ``copy.deepcopy`` of a Parameter drops
    it, so optimise a deep-copied model with ``filters_params: False`` (the module is then searched).
    """
    tag = getattr(param, CORE_TAG, None)
    if tag is None:
        return None
    if core_lr_scale == 'auto':
        return 1.0 / (2 * (tag[1] + 1))  # measured on digits: lr / 2(L + 1) for L dummy factors
    return float(core_lr_scale)


@register_optimizer(key='OPDFOptimizer')
def opdf_optimizer(params: Iterable, base: str = 'SGD', core_lr_scale: Any = 'auto', **kwargs: Any):
    """Build ``base`` (a ``torch.optim`` class name or registered key) with the cores' groups at
    ``lr * core_lr_scale`` (``'auto'``: ``1 / 2(L + 1)`` per weight with L dummy factors)."""
    if base not in OPTIM_DICT or base == 'OPDFOptimizer':
        raise OptionError(f'OPDFOptimizer: unknown base optimizer {base!r}; e.g. SGD, Adam, AdamW')
    if not (core_lr_scale == 'auto' or (isinstance(core_lr_scale, (int, float)) and not isinstance(core_lr_scale, bool)
                                        and core_lr_scale > 0)):
        raise OptionError(f"OPDFOptimizer: core_lr_scale must be 'auto' or a positive number, got {core_lr_scale!r}")
    if 'lr' not in kwargs:
        raise OptionError('OPDFOptimizer: give lr (the rate of the plain parameters)')
    if isinstance(params, nn.Module):  # torchdistill passes the module with filters_params: False
        for _, module, tensor_name, mpo in mpo_modules(params):
            for core in module.parametrizations[tensor_name].parameters():
                setattr(core, CORE_TAG, (mpo.plan.num_cores, mpo.plan.num_dummy))  # e.g. after a deepcopy
        params = [p for p in params.parameters() if p.requires_grad]
    groups: dict[float | None, list] = {}
    for p in params:
        groups.setdefault(core_lr_factor(p, core_lr_scale), []).append(p)
    param_groups = [{'params': ps, **({} if f is None else {'lr': kwargs['lr'] * f})} for f, ps in groups.items()]
    return OPTIM_DICT[base](param_groups, **kwargs)
