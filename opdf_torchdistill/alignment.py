"""OPDF's auxiliary-tensor alignment: pair student MPO layers with teacher layers, decompose the
teacher's weights with the same factor shapes in the same gauge (frozen, cached targets), and measure
the distance of the student's live auxiliary cores to them.

Independent of torchdistill: :class:`ProbeEntry` is what a probe reports for one layer (see
``plugin/probe.py``), :func:`pair_layers` decides which layers align (also without any tensor, for
``opdf-inspect``), and :class:`CoreAligner` turns two reports into a differentiable loss.

Reductions (the weight lambda is the caller's), over the aligned cores ``k`` of matched layers ``l``:

* ``'relative'`` (default): ``sum_{l,k} ||S_{l,k} - T_{l,k}||^2 / ||T_{l,k}||^2``. Scale-free: every
  core contributes the same O(1) amount at the start whatever its size, and the gradient on a core,
  ``2 (S - T) / ||T||^2``, depends neither on the core's number of elements nor on how many other
  cores are aligned (a mean over cores would shrink it by their number: 42 on ResNet-18). At weight
  1 its gradient norm on the aligned cores is of the order of a KD term's (measured: the alignment page's
  gradient-norm table); one SGD step closes ``2 lr lambda / ||T||^2`` of each core's distance.
* ``'paper'``: the paper's Eq. 5 taken literally, ``mean_{l,k} mean((S_{l,k} - T_{l,k})^2)``. Its
  gradient per element is ``2 (S - T) / (numel N)``: on ResNet-18 <- ResNet-34 about 1e-6 of the KD
  term's, so at any usual lambda it moves nothing. Kept for reproductions and ablations.

By default the aligned cores are all but the central one (the paper; the authors' code also aligned
the central one). The student side is the live core Parameters, so the gradient reaches them (the
authors read ``state_dict()``, which is detached, so their term never trained anything).

``targets='random'`` is a control: each teacher weight is replaced by a seeded Gaussian matrix of the
same shape and Frobenius norm, decomposed the same way, to tell teacher information from the mere
regularisation of pulling cores toward some fixed tensors.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import mpo, planning
from .weight_sites import to_matrix
from .matching import (LayerInfo, MatchError, auto_match, check_map_form, describe_pairing, is_index_map,
                       resolve_match)
from .planning import MPOPlan
from .tables import format_table

__all__ = ['ProbeEntry', 'AlignedPair', 'AlignmentCoverage', 'CoreAligner', 'pair_layers', 'CORE_CHOICES',
           'REDUCTIONS', 'TARGET_CHOICES', 'MatchError']

logger = logging.getLogger(__name__)

CORE_CHOICES = ('auxiliary', 'all', 'central')
REDUCTIONS = ('relative', 'paper')
TARGET_CHOICES = ('teacher', 'random')
NOT_REPORTED = 'never called in this pass (a stage that does not run it, or a weight read without calling its module)'


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


@dataclass
class AlignmentCoverage:
    """How much of the over-parameterized student the alignment reaches."""
    mpo_weights: int
    aligned_weights: int
    mpo_params: int          # all core parameters of the student's MPO weights
    aligned_mpo_params: int  # core parameters of the weights that have an aligned partner
    aligned_core_params: int  # parameters of the aligned cores themselves (auxiliary by default)
    unaligned: list[tuple[str, str]] = field(default_factory=list)

    @property
    def aligned_param_share(self) -> float:
        return self.aligned_mpo_params / self.mpo_params if self.mpo_params else 0.0

    def summary(self) -> str:
        return (f'OPDF alignment coverage: {self.aligned_weights}/{self.mpo_weights} MPO weights aligned '
                f'({100.0 * self.aligned_param_share:.1f} % of the MPO parameters; '
                f'{self.aligned_core_params} parameters in aligned cores)')

    def to_dict(self) -> dict[str, Any]:
        return {'mpo_weights': self.mpo_weights, 'aligned_weights': self.aligned_weights,
                'mpo_params': self.mpo_params, 'aligned_mpo_params': self.aligned_mpo_params,
                'aligned_param_share': self.aligned_param_share, 'aligned_core_params': self.aligned_core_params,
                'unaligned': {name: why for name, why in self.unaligned}}


def _as_info(entry) -> LayerInfo:
    return LayerInfo(entry.name, entry.kind, tuple(entry.matrix_shape))


def pair_layers(student: Sequence[ProbeEntry], teacher: Sequence[LayerInfo], cores='auxiliary',
                layer_map=None, expected: Sequence[str] = ()) -> tuple[list[AlignedPair], AlignmentCoverage]:
    """Decide which student MPO layers align with which teacher layers, and on which cores.

    Args:
        student: the student's layers; those with a ``plan`` are MPO weights (tensors are not read).
        teacher: the teacher's layers (names, kinds, matrix shapes).
        cores, layer_map: see :class:`CoreAligner`.
        expected: names of every MPO weight of the student; those missing from ``student`` are
            reported as unaligned (never called in this pass).

    Returns ``(pairs, coverage)``; raises :class:`MatchError` when no layer aligns.
    """
    mpo_layers = [e for e in student if e.plan is not None]
    if not mpo_layers:
        raise MatchError('the student reports no MPO layers: build it with the opdf_student model key '
                         '(or call overparameterize) before using the alignment loss')
    teacher_by_name = {t.name: t for t in teacher}
    s_info = [_as_info(e) for e in mpo_layers]
    if layer_map is not None:
        # layers not reported in this pass still count for a stack's depth ('uniform' needs it)
        unseen = [LayerInfo(n, '', (0, 0)) for n in expected if n not in {e.name for e in mpo_layers}] \
            if is_index_map(layer_map) else []
        mapping = resolve_match(layer_map, s_info + unseen, list(teacher), key='alignment layer_map')
    elif any(e.partner for e in mpo_layers):
        mapping = {e.name: e.partner for e in mpo_layers if e.partner in teacher_by_name}
        rest = [i for i, e in zip(s_info, mpo_layers) if e.partner is None]
        if rest:  # planned against a teacher: the others had no partner there; try the teacher at hand
            mapping.update(auto_match(rest, list(teacher)))
    else:
        mapping = auto_match(s_info, list(teacher))
    pairs, unaligned = [], []
    aligned_mpo, aligned_cores = 0, 0
    for entry in mpo_layers:
        t_name = mapping.get(entry.name)
        if t_name is None:
            unaligned.append((entry.name, 'no teacher layer of the same role'))
            continue
        t_layer = teacher_by_name[t_name]
        t_plan = planning.teacher_plan(entry.plan, t_layer.shape)
        if t_plan is None:
            unaligned.append((entry.name, f'{t_name} is {t_layer.shape[0]}x{t_layer.shape[1]}: not divisible by '
                                          f'the non-central factors of {entry.plan.describe()} (plan the student with '
                                          f'mpo.align_to the teacher)'))
            continue
        idx = _select_cores(cores, entry.plan.num_cores, entry.plan.central)
        s_shapes, t_shapes = entry.plan.core_shapes, t_plan.core_shapes
        bad = [k for k in idx if s_shapes[k] != t_shapes[k]]
        if bad or not idx:
            unaligned.append((entry.name, f'{t_name}: core shapes differ at {bad} ({[s_shapes[k] for k in bad]} vs '
                                          f'{[t_shapes[k] for k in bad]}); plan the student with mpo.align_to the '
                                          f'teacher' if bad else 'no core selected'))
            continue
        pairs.append(AlignedPair(entry.name, t_name, t_plan, idx))
        aligned_mpo += entry.plan.num_params
        aligned_cores += sum(math.prod(s_shapes[k]) for k in idx)
    reported = {e.name for e in mpo_layers}
    unaligned += [(name, NOT_REPORTED) for name in expected if name not in reported]
    coverage = AlignmentCoverage(len(mpo_layers) + sum(1 for n in expected if n not in reported), len(pairs),
                                 sum(e.plan.num_params for e in mpo_layers), aligned_mpo, aligned_cores, unaligned)
    if not pairs:
        shown = '; '.join(f'{s}: {why}' for s, why in unaligned[:5])
        more = f' (and {len(unaligned) - 5} more)' if len(unaligned) > 5 else ''
        names = [t.name for t in teacher]
        listed = ', '.join(names[:20]) + (f', ... ({len(names)} in all)' if len(names) > 20 else '')
        raise MatchError(f'no student MPO layer can be aligned with a teacher layer: {shown}{more}. Teacher layers: '
                         f'{listed}. Give layer_map, or plan the student with mpo.align_to so widths line up')
    return pairs, coverage


def pairing_table(pairs: Sequence[AlignedPair], coverage: AlignmentCoverage) -> str:
    rows = [[p.student, p.teacher, p.teacher_plan.describe(), ','.join(map(str, p.cores))] for p in pairs]
    rows += [[s, '-', why, '-'] for s, why in coverage.unaligned]
    return format_table(['student', 'teacher', 'teacher factors', 'aligned cores'], rows)


def _random_like(matrix: Tensor, name: str, seed: int) -> Tensor:
    """A Gaussian matrix with ``matrix``'s shape and Frobenius norm, seeded by (seed, layer name)."""
    digest = hashlib.sha256(f'{seed}:{name}'.encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], 'little') & ((1 << 63) - 1))
    noise = torch.randn(matrix.shape, generator=gen, dtype=torch.float64)
    return (noise * (matrix.double().norm() / noise.norm())).to(matrix.dtype)


class CoreAligner:
    """Matches layers once, caches teacher targets, and computes :math:`L_{aux}`.

    Args:
        cores: ``'auxiliary'`` (default), ``'all'``, ``'central'`` or a list of core indices.
        layer_map: the *alignment* map, independent of the map the student was initialised with
            (``init_from_teacher.layer_map``, ``fashion_vit_from_teacher``'s ``layer_map``): a
            layer-index map, ``'uniform'`` (student layer ``i`` <- teacher layer ``2i + 1`` for 6 <- 12,
            the paper's), ``'first'`` (``i`` <- ``i``), ``[j0, j1, ...]`` or ``{i: j}``, applied to every
            stack of numbered layers (``encoder.layer.#``, ``blocks.#``); or explicit ``{student: teacher}``
            names or ``[[regex, replacement], ...]`` rules (see :mod:`opdf_torchdistill.matching`).
            Default (``None``): the partners planned with ``mpo.align_to`` if any, else automatic
            matching (same role, relative depth: ``i`` <- ``2i + 1`` for 6 <- 12, as ``'uniform'``).
            It is never derived from the initialisation map: a student initialised from the very
            layers it is aligned to starts at distance 0 (see ``LossTermGradients``' warning).
        reduction: ``'relative'`` (default) or ``'paper'`` (see the module docstring).
        targets: ``'teacher'`` (default) or ``'random'`` (control), with ``targets_seed``.
    """

    def __init__(self, cores='auxiliary', layer_map=None, reduction='relative', targets='teacher', targets_seed=0):
        if not (cores in CORE_CHOICES or (isinstance(cores, (list, tuple)) and cores and
                                          all(isinstance(k, int) and not isinstance(k, bool) for k in cores))):
            raise ValueError(f'cores must be one of {list(CORE_CHOICES)} or a non-empty list of core indices, got {cores!r}')
        check_map_form(layer_map, 'AuxTensorAlignmentLoss layer_map')
        if reduction not in REDUCTIONS:
            raise ValueError(f'reduction must be one of {list(REDUCTIONS)}, got {reduction!r}')
        if targets not in TARGET_CHOICES:
            raise ValueError(f'targets must be one of {list(TARGET_CHOICES)}, got {targets!r}')
        if isinstance(targets_seed, bool) or not isinstance(targets_seed, int):
            raise ValueError(f'targets_seed must be an integer, got {targets_seed!r}')
        self.cores = cores
        self.layer_map = layer_map
        self.reduction = reduction
        self.target_source = targets
        self.targets_seed = targets_seed
        self._pairs_key = None
        self.pairs: list[AlignedPair] = []
        self.coverage: AlignmentCoverage | None = None
        self._targets: dict[str, tuple[tuple, tuple[Tensor, ...]]] = {}

    @property
    def unmatched(self) -> list[tuple[str, str]]:
        return [] if self.coverage is None else self.coverage.unaligned

    # -- matching -------------------------------------------------------------------------------
    def match(self, student: Mapping[str, ProbeEntry], teacher: Mapping[str, ProbeEntry]) -> list[AlignedPair]:
        expected = tuple(getattr(student, 'expected', ()))
        key = (tuple(student), tuple(teacher), expected)
        if key == self._pairs_key:
            return self.pairs
        pairs, coverage = pair_layers(list(student.values()), [_as_info(e) for e in teacher.values()],
                                      self.cores, self.layer_map, expected)
        self.pairs, self.coverage, self._pairs_key = pairs, coverage, key
        logger.info('%s (cores=%s, reduction=%s, targets=%s):\n%s', coverage.summary(), self.cores, self.reduction,
                    self.target_source, self.table())
        logger.info('OPDF alignment layer map: %s -> %s', self.describe_map(),
                    describe_pairing({p.student: p.teacher for p in pairs}))
        for name, why in coverage.unaligned:
            logger.warning('OPDF: student weight %s is over-parameterized but not aligned: %s', name, why)
        return pairs

    def describe_map(self) -> str:
        """Which alignment map is in use, in words (for logs and run records)."""
        if self.layer_map is None:
            return ('automatic (layer_map not given: partners planned with mpo.align_to, else same role at the same '
                    'relative depth; independent of the initialisation map)')
        return f'layer_map {self.layer_map!r}'

    def table(self) -> str:
        return pairing_table(self.pairs, self.coverage) if self.coverage is not None else ''

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
            matrices = [t_entry.matrix().detach() for _, t_entry, _ in stale]
            if self.target_source == 'random':
                matrices = [_random_like(m, pair.teacher, self.targets_seed) for m, (pair, _, _) in zip(matrices, stale)]
            jobs = [(m, pair.teacher_plan.row_factors, pair.teacher_plan.col_factors, pair.teacher_plan.max_bond)
                    for m, (pair, _, _) in zip(matrices, stale)]
        for (pair, _, key), cores in zip(stale, mpo.decompose_many(jobs)):
            # The teacher cores' squared norms (the relative reduction's denominators) are constants:
            # computed once here, not at every step; clamped so an all-zero core cannot divide by 0.
            norms = tuple(c.detach().pow(2).sum().clamp_min(torch.finfo(c.dtype).tiny) for c in cores)
            self._targets[pair.student] = (key, tuple(cores), norms)

    def targets(self, pair: AlignedPair) -> tuple[Tensor, ...]:
        """The target cores for a pair (all of them, in the teacher's dtype/device)."""
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
                if self.reduction == 'paper':
                    terms.append(F.mse_loss(s_cores[k], target))
                else:
                    scale = self._targets[pair.student][2][k].to(device=target.device, dtype=target.dtype)
                    terms.append((s_cores[k] - target).pow(2).sum() / scale)
        for report in (student, teacher):
            consume = getattr(report, 'consume', None)
            if consume is not None:
                consume()
        stacked = torch.stack(terms)
        return stacked.mean() if self.reduction == 'paper' else stacked.sum()
