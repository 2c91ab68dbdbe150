"""How strongly each loss term pulls on the cores OPDF aligns: gradient norms at one training step.

A term whose gradient on the auxiliary cores is orders of magnitude below the others' is inert
whatever its weight looks like in the YAML (the paper-literal alignment mean is: see
:mod:`opdf_torchdistill.alignment`). :class:`LossTermGradients` measures it on a torchdistill
training or distillation box: it records each weighted sub-term of the box's criterion during one
``forward_process`` and differentiates each one separately with respect to the aligned auxiliary
cores (all auxiliary cores when no alignment term is configured), before the box's own backward.

It also measures how far the aligned student cores start from their teacher targets. When *every*
aligned (student core, teacher core) pair is equal at the first step (relative Frobenius distance
``||S - T|| / ||T||`` at most :data:`ZERO_DISTANCE_RTOL`, 1e-12, computed in float64; in practice 0:
the student was initialised from the very teacher layers it is aligned to, e.g. BERT students
initialised with ``'uniform'`` (``2i + 1``) and aligned at the default relative depth), the alignment
term and its gradient are zero at the start, and it acts only as a pull-back toward the initial
weights. That is logged once as a WARNING and recorded as ``alignment.alignment_starts_at_zero``.
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

__all__ = ['LossTermGradients', 'ZERO_DISTANCE_RTOL', 'STARTS_AT_ZERO_WARNING', 'initial_alignment_distance']

logger = logging.getLogger(__name__)

#: Largest relative distance ``||S - T|| / ||T||`` of an aligned core pair counted as "equal" at step 1.
ZERO_DISTANCE_RTOL = 1e-12
STARTS_AT_ZERO_WARNING = (
    'OPDF: every aligned student core equals its teacher core at the first step (relative distance %.1e <= %.0e over '
    '%d cores of %d aligned weights): the alignment term and its gradient are 0, so alignment acts only as a '
    'pull-back to the initial weights. The student was initialised from the very teacher layers it is aligned to; '
    'for the term to act from step 1, initialise from other teacher layers than those aligned to (e.g. init '
    "'first' and align 'uniform': init_from_teacher.layer_map / fashion_vit_from_teacher layer_map, and the "
    'AuxTensorAlignmentLoss layer_map).')


def initial_alignment_distance(terms, report) -> dict[str, Any] | None:
    """How far the aligned student cores are from their teacher targets now (float64).

    ``terms``: alignment losses (``AuxTensorAlignmentLoss``) that have run once (pairs matched, targets
    cached); ``report``: the student's probe report (``{layer name: ProbeEntry}``). Returns
    ``{'alignment_starts_at_zero', 'initial_relative_distance' (sqrt(sum ||S - T||^2 / sum ||T||^2)),
    'initial_max_relative_distance' (the largest ||S - T|| / ||T|| of one core), 'distance_cores',
    'distance_weights'}``, or ``None`` when nothing is aligned yet.
    """
    diff2 = norm2 = 0.0
    largest = 0.0
    cores = weights = 0
    with torch.no_grad():
        for term in terms:
            aligner = term.aligner
            for pair in aligner.pairs:
                if report is None or pair.student not in report or pair.student not in aligner._targets:
                    continue
                s_cores, t_cores = report[pair.student].tensors, aligner.targets(pair)
                weights += 1
                for k in pair.cores:
                    s = s_cores[k].detach().double()
                    t = t_cores[k].detach().to(device=s.device, dtype=torch.float64)
                    d2, n2 = float((s - t).pow(2).sum()), float(t.pow(2).sum())
                    diff2, norm2, cores = diff2 + d2, norm2 + n2, cores + 1
                    rel = math.sqrt(d2 / n2) if n2 > 0 else (0.0 if d2 == 0 else math.inf)
                    largest = max(largest, rel)
    if not cores:
        return None
    total = math.sqrt(diff2 / norm2) if norm2 > 0 else (0.0 if diff2 == 0 else math.inf)
    return {'alignment_starts_at_zero': largest <= ZERO_DISTANCE_RTOL, 'initial_relative_distance': total,
            'initial_max_relative_distance': largest, 'distance_cores': cores, 'distance_weights': weights}


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
            result['alignment']['layer_map'] = [t.aligner.describe_map() for t in self.alignment_terms]
            distance = initial_alignment_distance(self.alignment_terms,
                                                  getattr(getattr(student, 'opdf', None), 'entries', None))
            if distance is not None:
                result['alignment'].update(distance)
                if distance['alignment_starts_at_zero']:
                    logger.warning(STARTS_AT_ZERO_WARNING, distance['initial_max_relative_distance'],
                                   ZERO_DISTANCE_RTOL, distance['distance_cores'], distance['distance_weights'])
                else:
                    logger.info('OPDF alignment at the first step: relative distance of the aligned cores to the '
                                "teacher's %.3e (largest core %.3e)", distance['initial_relative_distance'],
                                distance['initial_max_relative_distance'])
        if norms:
            rows = [[name, f'{value:.3e}'] for name, value in norms.items()]
            logger.info('gradient norm of each weighted loss term on the %s (%d cores, %d parameters) at the first '
                        'step:\n%s', what, len(cores), result['core_params'], format_table(['term', 'grad norm'], rows))
        else:
            logger.info('gradient norms at the first step: nothing to measure (%s)',
                        'no trainable MPO cores' if not cores else 'no differentiable loss term recorded')
        return result
