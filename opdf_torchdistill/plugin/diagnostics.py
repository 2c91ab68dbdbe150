"""How strongly each loss term pulls on the cores OPDF aligns: gradient norms at one training step.

A term whose gradient on the auxiliary cores is orders of magnitude below the others' is inert
whatever its weight looks like in the YAML (the paper-literal alignment mean is: see
:mod:`opdf_torchdistill.alignment`). :class:`LossTermGradients` measures it on a torchdistill
training or distillation box: it records each weighted sub-term of the box's criterion during one
``forward_process`` and differentiates each one separately with respect to the aligned auxiliary
cores (all auxiliary cores when no alignment term is configured), before the box's own backward.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from ..tables import format_table
from ..surgery import mpo_cores, mpo_modules
from .losses import AuxTensorAlignmentLoss

__all__ = ['LossTermGradients']

logger = logging.getLogger(__name__)


class LossTermGradients:
    """Record the box criterion's weighted sub-terms for one step, then measure their gradient norms.

    Usage (``tools/train.py`` does this at the first training step)::

        probe = LossTermGradients(box)
        loss = box.forward_process(images, targets, supp_dict)
        result = probe.measure(student)   # before box.post_forward_process(loss=loss)
    """

    def __init__(self, box):
        self.box = box
        self.values: dict[str, torch.Tensor] = {}
        self.alignment_terms: list[AuxTensorAlignmentLoss] = []
        self._handles = []
        for name, (criterion, factor) in getattr(box.criterion, 'term_dict', {}).items():
            if isinstance(criterion, AuxTensorAlignmentLoss):
                self.alignment_terms.append(criterion)
            if isinstance(criterion, nn.Module):
                self._handles.append(criterion.register_forward_hook(self._recorder(name, factor)))

    def _recorder(self, name: str, factor):
        def hook(_module, _args, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                self.values[name] = factor * output
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _cores(self, student: nn.Module) -> tuple[list[torch.Tensor], str]:
        report = getattr(getattr(student, 'opdf', None), 'entries', None)
        for term in self.alignment_terms:
            if term.aligner.pairs and report is not None:
                cores = [report[p.student].tensors[k] for p in term.aligner.pairs if p.student in report
                         for k in p.cores]
                return [c for c in cores if c.requires_grad], 'aligned auxiliary cores'
        cores = []
        for _, module, tensor_name, p in mpo_modules(student):
            every = mpo_cores(module, tensor_name)
            cores += [every[k] for k in p.plan.auxiliary]
        return [c for c in cores if isinstance(c, nn.Parameter) and c.requires_grad], 'auxiliary cores'

    def _weight_decay(self, cores: list[torch.Tensor]) -> float | None:
        """The norm of ``wd * core`` over the cores: the gradient coupled weight decay adds (SGD, Adam)."""
        optimizer = getattr(self.box, 'optimizer', None)
        if optimizer is None or not cores:
            return None
        ids = {id(c) for c in cores}
        squared = 0.0
        for group in optimizer.param_groups:
            wd = group.get('weight_decay', 0.0) or 0.0
            squared += sum(float(wd * p.detach().norm()) ** 2 for p in group['params'] if id(p) in ids)
        return math.sqrt(squared)

    def measure(self, student: nn.Module) -> dict[str, Any]:
        """``{'grad_norms': {term: float}, 'cores': what was measured, 'num_cores': n}``; logs a table."""
        self.close()
        cores, what = self._cores(student)
        norms: dict[str, float] = {}
        if cores:
            for name, value in self.values.items():
                grads = torch.autograd.grad(value, cores, retain_graph=True, allow_unused=True)
                norms[name] = math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None))
            wd = self._weight_decay(cores)
            if wd is not None:
                # AdamW's decay is not a gradient (it bypasses the adaptive scaling): labelled apart.
                decoupled = isinstance(self.box.optimizer, torch.optim.AdamW) or any(
                    g.get('decoupled_weight_decay') for g in self.box.optimizer.param_groups)
                norms['weight_decay_decoupled' if decoupled else 'weight_decay'] = wd
        result = {'grad_norms': norms, 'cores': what, 'num_cores': len(cores),
                  'core_params': sum(c.numel() for c in cores)}
        coverages = [t.aligner.coverage for t in self.alignment_terms if t.aligner.coverage is not None]
        if coverages:
            result['alignment'] = coverages[0].to_dict()
        if norms:
            rows = [[name, f'{value:.3e}'] for name, value in norms.items()]
            logger.info('gradient norm of each weighted loss term on the %s (%d cores, %d parameters) at the first '
                        'step:\n%s', what, len(cores), result['core_params'], format_table(['term', 'grad norm'], rows))
        else:
            logger.info('gradient norms at the first step: nothing to measure (%s)',
                        'no trainable MPO cores' if not cores else 'no differentiable loss term recorded')
        return result
