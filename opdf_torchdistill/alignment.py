"""OPDF's auxiliary-tensor alignment: pair student MPO layers with teacher layers, decompose the
teacher's weights with the same factor shapes in the same gauge (frozen, cached targets), and measure
the distance of the student's live auxiliary cores to them.

Independent of torchdistill: :class:`ProbeEntry` is what a probe reports for one layer (see
``plugin/probe.py``), and :class:`CoreAligner` turns two such reports into a differentiable loss.

Loss (lambda-free; the weight is the caller's)::

    L_aux = mean over matched layers l and aligned cores k of  mean((T^s_{l,k} - T^t_{l,k})^2)

i.e. every aligned core counts once, whatever its size. By default the aligned cores are all but the
central one (the paper; the authors' code also aligned the central one). The student side is the
live core Parameters, so the gradient reaches them (the authors read ``state_dict()``, which is
detached, so their term never trained anything).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import mpo, planning
from .layers import to_matrix
from .matching import LayerInfo, MatchError, auto_match, explicit_match
from .planning import MPOPlan
from .report import format_table

__all__ = ['ProbeEntry', 'AlignedPair', 'CoreAligner', 'CORE_CHOICES', 'MatchError']

logger = logging.getLogger(__name__)

CORE_CHOICES = ('auxiliary', 'all', 'central')


@dataclass(frozen=True, eq=False)
class ProbeEntry:
    """One weight of a probed model: its MPO cores (``plan`` set) or its dense weight (``plan`` None).

    Deliberately not a tuple: torchdistill walks tuples in hooked outputs looking for tensors.
    """
    name: str
    kind: str
    matrix_shape: tuple[int, int]
    tensors: tuple[Tensor, ...]
    plan: MPOPlan | None = None
    partner: str | None = None

    def matrix(self) -> Tensor:
        if self.plan is None:
            return to_matrix(self.tensors[0])
        return mpo.reconstruct(self.tensors)


@dataclass(frozen=True)
class AlignedPair:
    student: str
    teacher: str
    teacher_plan: MPOPlan
    cores: tuple[int, ...]


def _select_cores(choice, num_cores: int, central: int) -> tuple[int, ...]:
    if choice == 'auxiliary':
        return tuple(k for k in range(num_cores) if k != central)
    if choice == 'all':
        return tuple(range(num_cores))
    if choice == 'central':
        return (central,)
    return tuple(sorted({k % num_cores for k in choice if -num_cores <= k < num_cores}))


class CoreAligner:
    """Matches layers once, caches teacher targets, and computes :math:`L_{aux}`.

    Args:
        cores: ``'auxiliary'`` (default), ``'all'``, ``'central'`` or a list of core indices.
        layer_map: explicit ``{student: teacher}`` pairs or ``[[regex, replacement], ...]`` rules;
            default: the partners planned with ``align_to`` if any, else automatic matching
            (same role, relative depth, see :mod:`opdf_torchdistill.matching`).
    """

    def __init__(self, cores='auxiliary', layer_map=None):
        if not (cores in CORE_CHOICES or (isinstance(cores, (list, tuple)) and cores and
                                          all(isinstance(k, int) and not isinstance(k, bool) for k in cores))):
            raise ValueError(f'cores must be one of {list(CORE_CHOICES)} or a non-empty list of core indices, got {cores!r}')
        if layer_map is not None and not isinstance(layer_map, (Mapping, list, tuple)):
            raise ValueError(f'layer_map must be a mapping of student -> teacher names or a list of '
                             f'[regex, replacement] rules, got {type(layer_map).__name__}')
        self.cores = cores
        self.layer_map = layer_map
        self._pairs_key = None
        self.pairs: list[AlignedPair] = []
        self.unmatched: list[tuple[str, str]] = []
        self._targets: dict[str, tuple[tuple, tuple[Tensor, ...]]] = {}

    # -- matching -------------------------------------------------------------------------------
    def match(self, student: Mapping[str, ProbeEntry], teacher: Mapping[str, ProbeEntry]) -> list[AlignedPair]:
        key = (tuple(student), tuple(teacher))
        if key == self._pairs_key:
            return self.pairs
        mpo_layers = [e for e in student.values() if e.plan is not None]
        if not mpo_layers:
            raise MatchError('the student reports no MPO layers: build it with the opdf_student model key '
                             '(or call overparameterize) before using the alignment loss')
        s_info = [LayerInfo(e.name, e.kind, e.matrix_shape) for e in mpo_layers]
        t_info = [LayerInfo(e.name, e.kind, e.matrix_shape) for e in teacher.values()]
        if self.layer_map is not None:
            mapping = explicit_match(self.layer_map, s_info, t_info)
        elif any(e.partner for e in mpo_layers):
            mapping = {e.name: e.partner for e in mpo_layers if e.partner in teacher}
        else:
            mapping = auto_match(s_info, t_info)
        pairs, unmatched = [], []
        for entry in mpo_layers:
            t_name = mapping.get(entry.name)
            if t_name is None:
                unmatched.append((entry.name, 'no teacher layer of the same role'))
                continue
            t_entry = teacher[t_name]
            t_plan = planning.teacher_plan(entry.plan, t_entry.matrix_shape)
            if t_plan is None:
                unmatched.append((entry.name, f'{t_name} is {t_entry.matrix_shape[0]}x{t_entry.matrix_shape[1]}: '
                                              f'not divisible by the non-central factors of {entry.plan.describe()}'))
                continue
            idx = _select_cores(self.cores, entry.plan.num_cores, entry.plan.central)
            s_shapes, t_shapes = entry.plan.core_shapes, t_plan.core_shapes
            bad = [k for k in idx if s_shapes[k] != t_shapes[k]]
            if bad or not idx:
                unmatched.append((entry.name, f'{t_name}: core shapes differ at {bad} ({[s_shapes[k] for k in bad]} vs '
                                              f'{[t_shapes[k] for k in bad]})' if bad else 'no core selected'))
                continue
            pairs.append(AlignedPair(entry.name, t_name, t_plan, idx))
        if not pairs:
            raise MatchError(
                'no student MPO layer can be aligned with a teacher layer: '
                + '; '.join(f'{s}: {why}' for s, why in unmatched)
                + f'. Teacher layers: {[e.name for e in teacher.values()]}. Give layer_map, or plan the student '
                  f'with mpo.align_to so widths line up')
        self.pairs, self.unmatched, self._pairs_key = pairs, unmatched, key
        logger.info('OPDF alignment (%d pairs, cores=%s):\n%s', len(pairs), self.cores, self.table())
        return pairs

    def table(self) -> str:
        rows = [[p.student, p.teacher, p.teacher_plan.describe(), ','.join(map(str, p.cores))] for p in self.pairs]
        rows += [[s, '-', why, '-'] for s, why in self.unmatched]
        return format_table(['student', 'teacher', 'teacher factors', 'aligned cores'], rows)

    # -- targets ----------------------------------------------------------------------------------
    def _refresh_targets(self, pairs: Sequence[AlignedPair], teacher: Mapping[str, ProbeEntry]) -> None:
        stale = []
        for pair in pairs:
            t_entry = teacher[pair.teacher]
            key = tuple((t.data_ptr(), t._version, t.dtype) for t in t_entry.tensors) + (pair.teacher_plan,)
            cached = self._targets.get(pair.student)
            if cached is None or cached[0] != key:
                stale.append((pair, t_entry, key))
        if not stale:
            return
        with torch.no_grad():
            jobs = [(t_entry.matrix().detach(), pair.teacher_plan.row_factors, pair.teacher_plan.col_factors,
                     pair.teacher_plan.max_bond) for pair, t_entry, _ in stale]
        for (pair, _, key), cores in zip(stale, mpo.decompose_many(jobs)):
            self._targets[pair.student] = (key, tuple(cores))

    def targets(self, pair: AlignedPair) -> tuple[Tensor, ...]:
        """The teacher's cores for a pair (all of them, in the teacher's dtype/device)."""
        return self._targets[pair.student][1]

    # -- loss ---------------------------------------------------------------------------------------
    def loss(self, student: Mapping[str, ProbeEntry], teacher: Mapping[str, ProbeEntry]) -> Tensor:
        pairs = self.match(student, teacher)
        self._refresh_targets(pairs, teacher)
        terms = []
        for pair in pairs:
            s_cores = student[pair.student].tensors
            t_cores = self.targets(pair)
            for k in pair.cores:
                target = t_cores[k].to(device=s_cores[k].device, dtype=s_cores[k].dtype)
                terms.append(F.mse_loss(s_cores[k], target))
        return torch.stack(terms).mean()
