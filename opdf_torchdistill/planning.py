"""Factor planning: how each weight matrix is split into MPO cores, and how big the result is.

Pure integer arithmetic on shapes (no tensors). The planner answers three questions:

* :func:`balanced_plan` - the default: ``num_factors`` balanced real factors per side, rows and
  columns in the same (non-increasing) order as in the paper (768 = 32 x 1^L x 24 on both sides), plus
  ``num_dummy`` size-1 factor pairs in the middle (OPDF's scale ``L``). With two real factors,
  ``W (I x J)`` becomes ``A D_1 .. D_L B`` with ``r x r`` dummies and ``r = min(i_1 j_1, i_2 j_2)``;
  the layer then holds ``IJ + (L + 1) r^2`` parameters (768 x 768: ``r = 576``, ratio
  ``1 + 0.5625 (L + 1)``). ``order='largest_bond'`` permutes factors for the largest bonds instead.
* :func:`plan_target_ratio` - pick ``r`` per layer so the whole model reaches a target parameter ratio.
* :func:`teacher_plan` / :func:`aligned_plans` - for a student/teacher pair of different widths, the
  teacher takes the student's factors except the central pair, which absorbs the width difference.
  The default plan already works whenever the student's non-central factors divide the teacher's
  dimensions (e.g. widths x4); otherwise three real factors ``(a, c, b)`` are chosen so they do.

Dummy factors are placed around the central real factor (odd ``num_factors``) or in the middle gap
(even), so :func:`~opdf_torchdistill.mpo.central_index` ``(n - 1) // 2`` always names the core that
OPDF leaves unaligned.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from . import mpo
from .mpo import MPOError

__all__ = [
    'MPOPlan', 'FACTOR_ORDERS', 'MAX_PLAN_RATIO', 'check_plan_size', 'projected_params', 'divisors', 'balanced_factors', 'insert_dummies', 'balanced_plan', 'bond_options',
    'plan_for_bond', 'plan_target_ratio', 'teacher_plan', 'is_splittable', 'aligned_plans', 'explicit_plan', 'auxiliary_compatible',
]


#: The largest parameter ratio (MPO cores / dense weight) one weight's plan may have. OPDF's useful range
#: is 1.5x to 4x; far beyond it lies a typo (``num_dummy: 1000``) that would allocate gigabytes.
MAX_PLAN_RATIO = 64


def check_plan_size(shape: Sequence[int], params: int, num_dummy: int | None = None) -> None:
    """Refuse a plan of more than :data:`MAX_PLAN_RATIO` times the weight's parameters (before anything
    is allocated)."""
    numel = int(shape[0]) * int(shape[1])
    if params > MAX_PLAN_RATIO * numel:
        extra = f' with num_dummy={num_dummy}' if num_dummy is not None else ''
        raise MPOError(f'a {shape[0]}x{shape[1]} weight{extra} would get {params:,} MPO parameters, '
                       f'{params / numel:,.0f}x its {numel:,} (the limit is {MAX_PLAN_RATIO}x; OPDF\'s useful range is '
                       f'about 1.5x to 4x, i.e. num_dummy 0 to 4)')


def projected_params(rows: Sequence[int], cols: Sequence[int], num_dummy: int, max_bond: int | None = None) -> int:
    """Parameters of :func:`insert_dummies` ``(rows, cols, num_dummy)`` without building it: each dummy is
    an ``r x r`` core, ``r`` the bond where it is inserted (dummy factors change no other bond)."""
    base = mpo.num_params(rows, cols, max_bond)
    if num_dummy == 0:
        return base
    bonds, m = mpo.bond_dims(rows, cols, max_bond), len(rows)
    if m % 2 == 0:
        return base + num_dummy * bonds[m // 2] ** 2
    c = m // 2
    before, after = num_dummy // 2, num_dummy - num_dummy // 2
    return base + before * bonds[c] ** 2 + after * bonds[c + 1] ** 2


@dataclass(frozen=True)
class MPOPlan:
    """The factor shapes of one matrix. Everything else (bonds, cores, cost) follows from them."""
    row_factors: tuple[int, ...]
    col_factors: tuple[int, ...]
    max_bond: int | None = None

    def __post_init__(self):
        object.__setattr__(self, 'row_factors', tuple(int(v) for v in self.row_factors))
        object.__setattr__(self, 'col_factors', tuple(int(v) for v in self.col_factors))
        mpo.check_factors(self.shape, self.row_factors, self.col_factors)
        check_plan_size(self.shape, self.num_params, self.num_dummy)

    @property
    def shape(self) -> tuple[int, int]:
        return math.prod(self.row_factors), math.prod(self.col_factors)

    @property
    def num_cores(self) -> int:
        return len(self.row_factors)

    @property
    def num_dummy(self) -> int:
        return sum(1 for i, j in zip(self.row_factors, self.col_factors) if i == 1 and j == 1)

    @property
    def bonds(self) -> tuple[int, ...]:
        return mpo.bond_dims(self.row_factors, self.col_factors, self.max_bond)

    @property
    def core_shapes(self) -> tuple[tuple[int, int, int, int], ...]:
        return mpo.core_shapes(self.row_factors, self.col_factors, self.max_bond)

    @property
    def num_params(self) -> int:
        return mpo.num_params(self.row_factors, self.col_factors, self.max_bond)

    @property
    def central(self) -> int:
        return mpo.central_index(self.num_cores)

    @property
    def auxiliary(self) -> tuple[int, ...]:
        return tuple(k for k in range(self.num_cores) if k != self.central)

    @property
    def exact(self) -> bool:
        return self.max_bond is None or self.max_bond >= max(mpo.bond_dims(self.row_factors, self.col_factors))

    @property
    def contraction_flops(self) -> int:
        """FLOPs of one contraction (forward); backward costs about twice this."""
        return mpo.contraction_flops(self.core_shapes)

    def describe(self) -> str:
        return f'{"x".join(map(str, self.row_factors))} | {"x".join(map(str, self.col_factors))}'

    def to_dict(self) -> dict:
        return {'rows': list(self.row_factors), 'cols': list(self.col_factors), 'max_bond': self.max_bond}


# ----------------------------------------------------------------------------------------------
# Integer factorisation
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def divisors(n: int) -> tuple[int, ...]:
    if n < 1:
        raise MPOError(f'cannot factor {n}: dimensions must be positive')
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return tuple(sorted(set(small + [n // d for d in small])))


@functools.lru_cache(maxsize=None)
def balanced_factors(n: int, k: int) -> tuple[int, ...]:
    """``k`` factors of ``n`` (non-increasing) as equal as possible.

    Minimises the spread ``log(max / min)``, then the sum of squared logs; primes give ``(n, 1, ..)``.
    """
    if k < 1:
        raise MPOError(f'number of factors must be >= 1, got {k}')

    def splits(m: int, parts: int, cap: int) -> Iterable[tuple[int, ...]]:
        if parts == 1:
            if m <= cap:
                yield (m,)
            return
        for d in reversed(divisors(m)):
            if d <= cap and d ** parts >= m:  # non-increasing order: the first part is the largest
                for rest in splits(m // d, parts - 1, d):
                    yield (d,) + rest

    def score(f: tuple[int, ...]) -> tuple[float, float]:
        return math.log(f[0] / f[-1]), sum(math.log(v) ** 2 for v in f)

    return min(splits(n, k, n), key=score)


def insert_dummies(rows: Sequence[int], cols: Sequence[int], num_dummy: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Insert ``num_dummy`` ``(1, 1)`` factor pairs so the central core index stays meaningful.

    Even number of real factors: all dummies go in the middle gap (``A D.. B``). Odd: they are split
    around the central real factor (``A D C D B``), which then remains the central core.
    """
    rows, cols = list(rows), list(cols)
    m = len(rows)
    if num_dummy == 0:
        return tuple(rows), tuple(cols)
    if m % 2 == 0:
        at = m // 2
        return tuple(rows[:at] + [1] * num_dummy + rows[at:]), tuple(cols[:at] + [1] * num_dummy + cols[at:])
    c = m // 2
    before, after = num_dummy // 2, num_dummy - num_dummy // 2
    new_rows = rows[:c] + [1] * before + [rows[c]] + [1] * after + rows[c + 1:]
    new_cols = cols[:c] + [1] * before + [cols[c]] + [1] * after + cols[c + 1:]
    return tuple(new_rows), tuple(new_cols)


def is_splittable(shape: Sequence[int]) -> bool:
    """Whether ``I * J`` has a split into two factors > 1 (a 1x7 matrix has none)."""
    size = shape[0] * shape[1]
    return size >= 4 and len(divisors(size)) > 2


def _check_splittable(shape: Sequence[int]) -> None:
    size = shape[0] * shape[1]
    if not is_splittable(shape):
        raise MPOError(f'a {shape[0]}x{shape[1]} matrix has no non-trivial MPO split (I*J = {size})')


FACTOR_ORDERS = ('paper', 'largest_bond')

#: With more real factors than this, ``largest_bond`` stops searching permutations (n!^2 of them).
_MAX_PERMUTED_FACTORS = 4


def _trivial_end(rows: Sequence[int], cols: Sequence[int]) -> bool:
    """An end core of size 1 x 1 holds a single scalar: it adds nothing but a redundant scale."""
    return len(rows) >= 2 and (rows[0] * cols[0] == 1 or rows[-1] * cols[-1] == 1)


def _largest_bond_order(row_f: tuple[int, ...], col_f: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    n = len(row_f)
    if n > _MAX_PERMUTED_FACTORS:
        return row_f, tuple(reversed(col_f))  # the usual winner; the full search would take n!^2 steps
    best = None
    for rows in sorted(set(itertools.permutations(row_f)), reverse=True):
        for cols in sorted(set(itertools.permutations(col_f)), reverse=True):
            if _trivial_end(rows, cols):
                continue
            x = [i * j for i, j in zip(rows, cols)]
            bonds = mpo.bond_dims(rows, cols)
            wide = all(p * p <= math.prod(x) for p in itertools.accumulate(x[:-1], lambda a, b: a * b))
            # Largest bonds; then balanced end cores; then wide unfoldings (the faster, exact-by-
            # construction decomposition path, see mpo.decompose).
            key = (sum(math.log(b) for b in bonds), -abs(math.log(x[0] / x[-1])), wide)
            if best is None or key > best[0]:
                best = (key, rows, cols)
    return None if best is None else (best[1], best[2])


def balanced_plan(shape: Sequence[int], num_factors: int = 2, num_dummy: int = 1,
                  max_bond: int | None = None, order: str = 'paper') -> MPOPlan:
    """Balanced real factors per side, then ``num_dummy`` dummy pairs in the middle.

    ``order='paper'`` (default) factors rows and columns the same way, largest factor first on both
    sides, as the paper does (768 = 32 x 1^L x 24 for rows and columns): a 768 x 768 weight gets bond
    576 and ratio ``1 + 0.5625 (L + 1)``. ``order='largest_bond'`` permutes the factors for the largest
    bonds instead (768 x 768: 32 x 24 | 24 x 32, bond 768, ratio ``1 + (L + 1)``): more parameters at the
    same ``L``, and a different model from the paper's.
    """
    if num_factors < 1:
        raise MPOError(f'num_factors must be >= 1, got {num_factors}')
    if num_dummy < 0:
        raise MPOError(f'num_dummy must be >= 0, got {num_dummy}')
    if order not in FACTOR_ORDERS:
        raise MPOError(f'factor order must be one of {list(FACTOR_ORDERS)}, got {order!r}')
    _check_splittable(shape)
    row_f = balanced_factors(int(shape[0]), num_factors)
    col_f = balanced_factors(int(shape[1]), num_factors)
    chosen = None
    if order == 'paper' and not _trivial_end(row_f, col_f):
        chosen = (row_f, col_f)
    if chosen is None:  # largest_bond, or a paper order whose end core would be a 1 x 1 scalar
        chosen = _largest_bond_order(row_f, col_f) or (row_f, col_f)
    check_plan_size(shape, projected_params(chosen[0], chosen[1], num_dummy, max_bond), num_dummy)
    rows, cols = insert_dummies(chosen[0], chosen[1], num_dummy)
    return MPOPlan(rows, cols, max_bond)


@functools.lru_cache(maxsize=None)
def bond_options(shape: tuple[int, int]) -> tuple[tuple[int, tuple[int, int], tuple[int, int]], ...]:
    """All bonds ``r`` reachable with two real factors, each with its most balanced split.

    Returns ``(r, (i_1, i_2), (j_1, j_2))`` sorted by ``r``, where ``i_1 j_1 <= i_2 j_2`` is not
    required: ``r = min(i_1 j_1, i_2 j_2)``. Splits with a trivial end core are excluded.
    """
    rows_total, cols_total = int(shape[0]), int(shape[1])
    best: dict[int, tuple[float, tuple[int, int], tuple[int, int]]] = {}
    for i1 in divisors(rows_total):
        for j1 in divisors(cols_total):
            i2, j2 = rows_total // i1, cols_total // j1
            p, q = i1 * j1, i2 * j2
            if p == 1 or q == 1:
                continue
            r = min(p, q)
            imbalance = abs(math.log(i1 / i2)) + abs(math.log(j1 / j2)) + (0.0 if p <= q else 1e-9)
            if r not in best or imbalance < best[r][0]:
                best[r] = (imbalance, (i1, i2), (j1, j2))
    return tuple((r, v[1], v[2]) for r, v in sorted(best.items()))


def plan_for_bond(shape: Sequence[int], bond: int, num_dummy: int) -> MPOPlan:
    for r, rows, cols in bond_options(tuple(shape)):
        if r == bond:
            new_rows, new_cols = insert_dummies(rows, cols, num_dummy)
            return MPOPlan(new_rows, new_cols)
    raise MPOError(f'bond {bond} is not reachable for a {shape[0]}x{shape[1]} matrix with two real factors')


def plan_target_ratio(shapes: Sequence[Sequence[int]], other_params: int, target_ratio: float,
                      num_dummy: int | None = None, max_num_dummy: int = 8) -> list[MPOPlan]:
    """Choose one two-real-factor plan per matrix so the model's parameter ratio is ``target_ratio``.

    A matrix with bond ``r`` and ``L`` dummies trains ``IJ + (L + 1) r^2`` parameters, so the ratio is
    ``(other + sum_l IJ_l + (L + 1) r_l^2) / (other + sum_l IJ_l)``. Every layer starts at the bond
    closest (in log scale) to an equal relative growth, then a greedy pass moves single layers one
    bond step at a time while that brings the total closer to the target. ``num_dummy=None`` uses
    the smallest ``L`` (from 1, then 0) that can reach the target.

    Raises:
        MPOError: when the target is outside the reachable range; the message gives the range.
    """
    if not isinstance(target_ratio, (int, float)) or isinstance(target_ratio, bool) or not target_ratio > 1.0:
        raise MPOError(f'target_ratio must be a number > 1.0 (trainable / original parameters), got {target_ratio!r}')
    if not shapes:
        raise MPOError('target_ratio needs at least one selected layer')
    for s in shapes:
        _check_splittable(s)
    options = [bond_options(tuple(int(v) for v in s)) for s in shapes]
    for s, opts in zip(shapes, options):
        if not opts:
            raise MPOError(f'a {s[0]}x{s[1]} matrix has no two-factor split')
    base_total = other_params + sum(s[0] * s[1] for s in shapes)
    wanted_extra = (target_ratio - 1.0) * base_total

    def reach(dummies: int) -> tuple[float, float]:
        low = sum((dummies + 1) * o[0][0] ** 2 for o in options)
        high = sum((dummies + 1) * o[-1][0] ** 2 for o in options)
        return 1 + low / base_total, 1 + high / base_total

    if num_dummy is None:
        candidates = [1, 0] + list(range(2, max_num_dummy + 1))
        feasible = [L for L in candidates if reach(L)[0] <= target_ratio <= reach(L)[1]]
        if not feasible:
            spans = ', '.join(f'L={L}: {reach(L)[0]:.3f}..{reach(L)[1]:.3f}' for L in range(max_num_dummy + 1))
            raise MPOError(f'target_ratio {target_ratio} cannot be met by the selected layers; reachable '
                           f'ratios per number of dummy factors: {spans}')
        num_dummy = feasible[0]
    else:
        low, high = reach(num_dummy)
        if not low - 1e-9 <= target_ratio <= high + 1e-9:
            raise MPOError(f'target_ratio {target_ratio} cannot be met with num_dummy={num_dummy}: the selected '
                           f'layers reach {low:.3f}..{high:.3f}; change num_dummy (or leave it unset) or the target')
    growth = wanted_extra / max(1, sum(s[0] * s[1] for s in shapes))
    picks = []
    for s, opts in zip(shapes, options):
        ideal = math.sqrt(max(growth * s[0] * s[1] / (num_dummy + 1), 1.0))
        picks.append(min(range(len(opts)), key=lambda k: abs(math.log(opts[k][0] / ideal))))

    def extra(ps: Sequence[int]) -> float:
        return sum((num_dummy + 1) * options[i][p][0] ** 2 for i, p in enumerate(ps))

    current = abs(extra(picks) - wanted_extra)
    improved = True
    while improved:
        improved = False
        for i in range(len(picks)):
            for step in (-1, 1):
                p = picks[i] + step
                if 0 <= p < len(options[i]):
                    trial = picks[:i] + [p] + picks[i + 1:]
                    err = abs(extra(trial) - wanted_extra)
                    if err < current - 1e-9:
                        picks, current, improved = trial, err, True
    return [plan_for_bond(s, options[i][p][0], num_dummy) for i, (s, p) in enumerate(zip(shapes, picks))]


def explicit_plan(shape: Sequence[int], rows: Sequence[int], cols: Sequence[int],
                  max_bond: int | None = None) -> MPOPlan:
    """A user-given factorisation (dummies included as ``1``s), validated against the shape."""
    try:
        mpo.check_factors(tuple(shape), tuple(rows), tuple(cols))
        return MPOPlan(tuple(rows), tuple(cols), max_bond)
    except MPOError as exc:
        raise MPOError(f'explicit factors rows={list(rows)} cols={list(cols)} do not fit the '
                       f'{shape[0]}x{shape[1]} matrix: {exc}') from None


# ----------------------------------------------------------------------------------------------
# Student/teacher plans
# ----------------------------------------------------------------------------------------------
def teacher_plan(student: MPOPlan, teacher_shape: Sequence[int]) -> MPOPlan | None:
    """The teacher's plan for a student plan: same factors except the central pair, which absorbs
    the difference in width. ``None`` when the teacher's dimensions are not divisible accordingly."""
    teacher_shape = (int(teacher_shape[0]), int(teacher_shape[1]))
    if teacher_shape == student.shape:
        return student
    c = student.central
    rows, cols = list(student.row_factors), list(student.col_factors)
    rest_rows = math.prod(rows) // rows[c]
    rest_cols = math.prod(cols) // cols[c]
    if teacher_shape[0] % rest_rows or teacher_shape[1] % rest_cols:
        return None
    rows[c], cols[c] = teacher_shape[0] // rest_rows, teacher_shape[1] // rest_cols
    return MPOPlan(tuple(rows), tuple(cols), student.max_bond)


def auxiliary_compatible(student: MPOPlan, teacher: MPOPlan | None) -> bool:
    """Whether every auxiliary core of ``student`` has the shape of the teacher's core there."""
    if teacher is None or teacher.num_cores != student.num_cores:
        return False
    s_shapes, t_shapes = student.core_shapes, teacher.core_shapes
    return all(s_shapes[k] == t_shapes[k] for k in student.auxiliary)


def aligned_plans(student_shape: Sequence[int], teacher_shape: Sequence[int],
                  num_dummy: int = 1) -> tuple[MPOPlan, MPOPlan] | None:
    """Three-real-factor plans ``(a, c, b)`` for a student and a teacher of different widths whose
    auxiliary cores (everything but the central ``c`` core) have identical shapes.

    Among all ``a * b`` dividing both dimensions on each side, pick the plan whose parameter count is
    closest to the paper's plan of the same matrix at the same ``L`` (so planning against a teacher
    does not change the scale), then the largest auxiliary bonds ``d_1 d_2``, then the most balanced
    split. A student central pair
    ``(1, 1)`` is already an identity core, so it counts as one of the ``num_dummy`` dummies.
    ``None`` if no such split exists.
    """
    s_rows, s_cols = int(student_shape[0]), int(student_shape[1])
    t_rows, t_cols = int(teacher_shape[0]), int(teacher_shape[1])
    target_params = balanced_plan((s_rows, s_cols), 2, num_dummy).num_params if is_splittable((s_rows, s_cols)) \
        else s_rows * s_cols * 2
    g_rows, g_cols = math.gcd(s_rows, t_rows), math.gcd(s_cols, t_cols)
    row_pairs = [(a, b) for a in divisors(g_rows) for b in divisors(g_rows // a)]
    col_pairs = [(a, b) for a in divisors(g_cols) for b in divisors(g_cols // a)]
    best = None
    for a, b in row_pairs:
        for a2, b2 in col_pairs:
            if a * a2 == 1 or b * b2 == 1:
                continue
            c, c2 = s_rows // (a * b), s_cols // (a2 * b2)
            dummies = max(0, num_dummy - 1) if c * c2 == 1 else num_dummy
            s_plan = MPOPlan(*insert_dummies((a, c, b), (a2, c2, b2), dummies))
            t_plan = teacher_plan(s_plan, (t_rows, t_cols))
            if not auxiliary_compatible(s_plan, t_plan):
                continue
            d = s_plan.bonds
            # Closest (in 10 % steps) to the scale the paper's plan gives this matrix at the same L; then
            # the largest auxiliary bonds (more of the matrix in aligned cores); then the most balanced.
            scale = -round(abs(math.log(s_plan.num_params / target_params)) / 0.1)  # 10 % steps
            key = (scale, d[1] * d[-2], -abs(math.log(a / b)) - abs(math.log(a2 / b2)), a, a2)
            if best is None or key > best[0]:
                best = (key, s_plan, t_plan)
    return None if best is None else (best[1], best[2])
