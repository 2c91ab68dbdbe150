"""Matrix product operators (MPO, a.k.a. tensor-train matrices): exact decomposition and contraction.

Pure tensor functions, no ``nn.Module``. This file is the only place that knows the MPO math.

Conventions
-----------
A matrix ``W`` of shape ``(I, J)`` gets row factors ``(i_1..i_n)`` and column factors ``(j_1..j_n)``
with ``prod(i) = I`` and ``prod(j) = J``. Core ``k`` has shape ``(d_{k-1}, i_k, j_k, d_k)`` with
``d_0 = d_n = 1`` and::

    W[(i_1..i_n), (j_1..j_n)] = T_1[:, i_1, j_1, :] @ T_2[:, i_2, j_2, :] @ ... @ T_n[:, i_n, j_n, :]

where row and column multi-indices are row-major (the last factor varies fastest). Write
``x_k = i_k * j_k`` and ``P_k = x_1 ... x_k``. The *unfolding* at bond ``k`` is ``W`` permuted to
``(i_1 j_1, ..., i_n j_n)`` and reshaped to ``(P_k, IJ / P_k)``. The *full* bond dimension is
``d_k = min(P_k, IJ / P_k)``, which makes the decomposition exact (Oseledets 2011, TT-SVD).

Gauge
-----
Any invertible matrix inserted at a bond gives the same product, so the cores are only defined up to
a gauge. We fix it completely (needed to compare a student's cores with a teacher's):

* symmetric split of the Schmidt values (Vidal 2003; the OPDF authors' "bi-canonical" form): with the
  SVD of the unfolding ``M_k = U_k S_k V_k^T``, the contraction of cores ``1..k`` equals
  ``L_k = U_k S_k^{1/2}`` and the contraction of cores ``k+1..n`` equals ``S_k^{1/2} V_k^T``;
* sign rule: each singular pair is flipped so that the entry of largest magnitude of ``u`` is
  positive (as scikit-learn's ``svd_flip``), so LAPACK's arbitrary signs do not leak into the cores.

The cores follow as ``T_k = S_{k-1}^{-1} L_{k-1}^T L_k`` (``L_k`` viewed as ``(P_{k-1}, x_k d_k)``),
``T_1 = L_1`` and ``T_n = S_{n-1}^{-1} L_{n-1}^T W``. Two ways to get ``L_k``, both guarded so that
zero or tiny Schmidt values never blow up (the authors compute ``Lambda^{-1/2}`` unguarded):

* every unfolding wide (``P_k <= IJ / P_k``; the planner orders factors so) and full bonds: the
  eigendecomposition of ``M M^T`` gives a square orthogonal ``U``, so ``L S^{-1} L^T = I`` exactly and
  the product telescopes to ``W`` with no direction dropped; values at round-off level are floored
  at ``eps * s_max``;
* otherwise (tall unfoldings, capped bonds): the SVD; Schmidt values below a relative tolerance are
  set to zero instead of being divided by, and because every ``L_k`` lies in the column space of
  ``L_{k-1}`` the product telescopes to ``W`` up to the dropped (sub-tolerance) values.

A "dummy" factor pair ``(i_k, j_k) = (1, 1)`` between two internal bonds leaves the unfolding
unchanged, so its core is exactly the identity of size ``d_k`` (OPDF's over-parameterization: a deep
linear chain initialised at ``W``).

SVDs run in float64 on the matrix's device; cores are returned in the input dtype. Results are
bit-reproducible for a given machine: decompositions run with one intra-op thread (see
:func:`single_threaded`); :func:`decompose_many` recovers the parallelism across matrices.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    'MPOError', 'check_factors', 'bond_dims', 'core_shapes', 'num_params', 'central_index',
    'decompose', 'decompose_many', 'reconstruct', 'contraction_order', 'contraction_flops',
    'relative_error', 'single_threaded',
]


class MPOError(ValueError):
    """Invalid MPO input (factors, shapes, values)."""


# ----------------------------------------------------------------------------------------------
# Shapes and counts
# ----------------------------------------------------------------------------------------------
def check_factors(shape: Sequence[int], row_factors: Sequence[int], col_factors: Sequence[int]) -> None:
    """Raise :class:`MPOError` unless the factors are positive integers that multiply to ``shape``."""
    rows, cols = tuple(row_factors), tuple(col_factors)
    if len(rows) != len(cols) or len(rows) == 0:
        raise MPOError(f'row_factors {list(rows)} and col_factors {list(cols)} must be non-empty and of equal '
                       f'length (one (i_k, j_k) pair per core)')
    for name, fac in (('row_factors', rows), ('col_factors', cols)):
        if any(not isinstance(f, int) or isinstance(f, bool) or f < 1 for f in fac):
            raise MPOError(f'{name} {list(fac)} must be positive integers')
    if len(shape) != 2:
        raise MPOError(f'expected a matrix, got shape {tuple(shape)}')
    if math.prod(rows) != shape[0] or math.prod(cols) != shape[1]:
        raise MPOError(f'factors do not multiply to the matrix shape {tuple(shape)}: prod{list(rows)} = '
                       f'{math.prod(rows)}, prod{list(cols)} = {math.prod(cols)}')


def bond_dims(row_factors: Sequence[int], col_factors: Sequence[int], max_bond: int | None = None) -> tuple[int, ...]:
    """Bond dimensions ``(d_0, ..., d_n)``: ``d_k = min(P_k, IJ / P_k)``, capped at ``max_bond``."""
    x = [i * j for i, j in zip(row_factors, col_factors)]
    total = math.prod(x)
    dims, left = [1], 1
    for xk in x[:-1]:
        left *= xk
        d = min(left, total // left)
        dims.append(d if max_bond is None else min(d, max_bond))
    dims.append(1)
    return tuple(dims)


def core_shapes(row_factors: Sequence[int], col_factors: Sequence[int],
                max_bond: int | None = None) -> tuple[tuple[int, int, int, int], ...]:
    """Shapes ``(d_{k-1}, i_k, j_k, d_k)`` of the cores."""
    d = bond_dims(row_factors, col_factors, max_bond)
    return tuple((d[k], i, j, d[k + 1]) for k, (i, j) in enumerate(zip(row_factors, col_factors)))


def num_params(row_factors: Sequence[int], col_factors: Sequence[int], max_bond: int | None = None) -> int:
    """Total number of elements of all cores."""
    return sum(math.prod(s) for s in core_shapes(row_factors, col_factors, max_bond))


def central_index(num_cores: int) -> int:
    """Index of the central tensor, ``(n - 1) // 2``; every other core is auxiliary."""
    if num_cores < 1:
        raise MPOError(f'num_cores must be >= 1, got {num_cores}')
    return (num_cores - 1) // 2


# ----------------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------------
_THREAD_LOCK = threading.Lock()
_FORCE_SVD = False  # set only through svd_only()


@contextlib.contextmanager
def svd_only():
    """Inside this block every decomposition uses SVDs, also where the eigendecomposition path applies
    (benchmarks compare the two; the results agree to round-off)."""
    global _FORCE_SVD
    previous, _FORCE_SVD = _FORCE_SVD, True
    try:
        yield
    finally:
        _FORCE_SVD = previous


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch ops with one intra-op thread, then restore the previous count.

    LAPACK/BLAS results depend on the thread count in their last bits, so fixing it makes a
    decomposition bit-identical whatever ``torch.get_num_threads()`` the caller uses.
    """
    with _THREAD_LOCK:
        previous = torch.get_num_threads()
        if previous != 1:
            torch.set_num_threads(1)
    try:
        yield
    finally:
        with _THREAD_LOCK:
            if previous != 1:
                torch.set_num_threads(previous)


def _interleaved(matrix: Tensor, rows: Sequence[int], cols: Sequence[int]) -> Tensor:
    """View ``(I, J)`` as ``(i_1, j_1, ..., i_n, j_n)`` flattened pairwise to ``(x_1, ..., x_n)``."""
    n = len(rows)
    t = matrix.reshape(*rows, *cols)
    perm = [p for k in range(n) for p in (k, n + k)]
    return t.permute(perm).reshape([i * j for i, j in zip(rows, cols)])


def _robust_svd(m: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors and values of a float64 matrix, with a fallback if LAPACK fails."""
    try:
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
    except RuntimeError:
        # gesdd (divide and conquer) occasionally fails to converge on pathological inputs; the
        # eigendecomposition of the smaller Gram matrix is slower to lose precision than to fail.
        try:
            import scipy.linalg
            u_np, s_np, _ = scipy.linalg.svd(m.cpu().numpy(), full_matrices=False, lapack_driver='gesvd')
            u, s = torch.from_numpy(u_np).to(m.device), torch.from_numpy(s_np).to(m.device)
        except Exception as exc:  # pragma: no cover - both LAPACK drivers failing is exotic
            raise MPOError(f'SVD did not converge for a {tuple(m.shape)} unfolding ({exc})') from exc
    return _sign_rule(u), s


def _sign_rule(u: Tensor) -> Tensor:
    """Flip columns so the largest-magnitude entry of each is positive (LAPACK's signs are arbitrary)."""
    idx = u.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(u.gather(0, idx))
    signs[signs == 0] = 1
    return u * signs


def _left_part(unfolding: Tensor, rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """``L = U S^{1/2}`` (dropped directions zeroed), the Schmidt values ``S`` and the keep mask."""
    u, s = _robust_svd(unfolding)
    tol = rtol * (s[0] if s.numel() else 0.0)
    keep = s > tol
    root = torch.where(keep, s.clamp_min(0).sqrt(), torch.zeros_like(s))
    return u * root, s, keep


def _left_part_gram(unfolding: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The same for a wide unfolding (``P <= Q``) from the eigendecomposition of ``M M^T``.

    ``U`` is then square and orthogonal to machine precision, so ``L S^{-1} L^T = U U^T = I`` exactly
    whatever the accuracy of small Schmidt values: the chain telescopes to ``W`` without dropping any
    direction. Values at or below round-off are floored at ``eps * s_max`` instead of dropped, which
    keeps every core bounded (a null direction gets ``sqrt(floor)`` on one side and round-off on the
    other). About 3-5x faster than the SVD it replaces.
    """
    lam, vec = torch.linalg.eigh(unfolding @ unfolding.T)
    lam, vec = lam.flip(0), vec.flip(1)
    s = lam.clamp_min(0).sqrt()
    if s.numel() == 0 or s[0] == 0:  # the zero matrix: all cores zero
        keep = torch.zeros_like(s, dtype=torch.bool)
        return torch.zeros_like(vec), s, keep
    s = s.clamp_min(torch.finfo(s.dtype).eps * s[0])
    return _sign_rule(vec) * s.sqrt(), s, torch.ones_like(s, dtype=torch.bool)


def _guarded_inv(s: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))


def decompose(matrix: Tensor, row_factors: Sequence[int], col_factors: Sequence[int],
              max_bond: int | None = None, rtol: float | None = None, _svd_only: bool = False) -> list[Tensor]:
    """Decompose ``matrix`` into MPO cores in the deterministic symmetric gauge (see module docstring).

    Args:
        matrix: a 2-D tensor ``(I, J)``; must be finite.
        row_factors, col_factors: factors of ``I`` and ``J``, one pair per core. A ``(1, 1)`` pair
            between two internal bonds becomes an identity core (a "dummy" factor).
        max_bond: cap on the bond dimensions. ``None`` (default) keeps full bonds, which is exact;
            a cap gives an approximation that keeps the largest Schmidt values at every bond.
        rtol: Schmidt values below ``rtol * s_max`` at a bond count as zero (no division by them).
            Default ``max(P, Q) * eps(float64)``, the usual numerical-rank tolerance.

    Returns:
        ``n`` cores of shape ``(d_{k-1}, i_k, j_k, d_k)`` in ``matrix.dtype``.
    """
    if not isinstance(matrix, Tensor) or matrix.dim() != 2:
        raise MPOError(f'decompose expects a 2-D tensor, got {type(matrix).__name__} '
                       f'{tuple(getattr(matrix, "shape", ()))}')
    rows, cols = tuple(row_factors), tuple(col_factors)
    check_factors(tuple(matrix.shape), rows, cols)
    if max_bond is not None and (not isinstance(max_bond, int) or max_bond < 1):
        raise MPOError(f'max_bond must be a positive integer or None, got {max_bond!r}')
    if not matrix.is_floating_point():
        raise MPOError(f'decompose expects a floating-point matrix, got {matrix.dtype}')
    if not bool(torch.isfinite(matrix).all()):
        raise MPOError('matrix contains NaN or Inf values')

    n = len(rows)
    out_dtype = matrix.dtype
    w = matrix.detach().to(torch.float64)
    if n == 1:
        return [w.reshape(1, rows[0], cols[0], 1).to(out_dtype)]

    x = [i * j for i, j in zip(rows, cols)]
    total = math.prod(x)
    dims = bond_dims(rows, cols, max_bond)
    t = _interleaved(w, rows, cols).reshape(-1)

    # Wide unfoldings everywhere and full bonds: the eigendecomposition path; otherwise SVDs.
    prefixes = [math.prod(x[:k]) for k in range(1, n)]
    use_gram = not (_svd_only or _FORCE_SVD) and max_bond is None and rtol is None and all(p * p <= total for p in prefixes)
    with single_threaded():
        # L_k, S_k, keep_k for every internal bond k = 1..n-1; a dummy pair reuses the previous bond.
        lefts: list[tuple[Tensor, Tensor, Tensor]] = [None] * (n + 1)  # type: ignore[list-item]
        prefix = 1
        for k in range(1, n):
            prefix *= x[k - 1]
            if x[k - 1] == 1 and k >= 2:
                lefts[k] = lefts[k - 1]
                continue
            unfolding = t.reshape(prefix, total // prefix)
            if use_gram:
                try:
                    left, s, keep = _left_part_gram(unfolding)
                except RuntimeError:  # eigh did not converge: redo the whole matrix with SVDs
                    return decompose(matrix, rows, cols, max_bond, rtol, _svd_only=True)
            else:
                eps_rtol = rtol if rtol is not None else max(unfolding.shape) * torch.finfo(torch.float64).eps
                left, s, keep = _left_part(unfolding, eps_rtol)
            if dims[k] < left.shape[1]:  # truncated bond: keep the largest Schmidt values
                left, s, keep = left[:, :dims[k]], s[:dims[k]], keep[:dims[k]]
            lefts[k] = (left, s, keep)

        cores: list[Tensor] = []
        prefix = 1
        for k in range(1, n + 1):
            d_prev, d_next = dims[k - 1], dims[k]
            if 2 <= k <= n - 1 and x[k - 1] == 1:
                core = torch.eye(d_prev, dtype=torch.float64, device=w.device)
            elif k == 1:
                core = lefts[1][0]
            else:
                prev_left, prev_s, prev_keep = lefts[k - 1]
                nxt = lefts[k][0] if k < n else t.reshape(-1, 1)
                nxt = nxt.reshape(prefix, x[k - 1] * d_next)
                core = _guarded_inv(prev_s, prev_keep)[:, None] * (prev_left.T @ nxt)
            cores.append(core.reshape(d_prev, rows[k - 1], cols[k - 1], d_next).to(out_dtype))
            prefix *= x[k - 1]
    return cores


def decompose_many(jobs: Sequence[tuple], workers: int | None = None) -> list[list[Tensor]]:
    """Run :func:`decompose` on many ``(matrix, row_factors, col_factors[, max_bond])`` jobs.

    Each worker thread runs single-threaded LAPACK (so results are bit-identical to
    :func:`decompose`), and ``workers`` (default: ``torch.get_num_threads()``) matrices are decomposed
    concurrently, which recovers the cores that single-threading leaves idle.
    """
    previous = torch.get_num_threads()
    workers = previous if workers is None else max(1, int(workers))
    if workers == 1 or len(jobs) <= 1 or any(job[0].is_cuda for job in jobs):
        return [decompose(*job) for job in jobs]
    # Largest first: the pool's makespan is bounded by the biggest SVD.
    order = sorted(range(len(jobs)), key=lambda k: -jobs[k][0].numel())
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            results = dict(zip(order, pool.map(lambda k: decompose(*jobs[k]), order)))
    finally:
        torch.set_num_threads(previous)  # worker initialisers change the process-wide setting
    return [results[k] for k in range(len(jobs))]


# ----------------------------------------------------------------------------------------------
# Contraction
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def contraction_order(shapes: tuple[tuple[int, int, int, int], ...]) -> tuple[object, int]:
    """Cheapest pairwise contraction order of a chain of cores, by dynamic programming.

    Cost model: an interval of cores ``a..b`` contracts to a block ``(d_{a-1}, X_ab, d_b)`` with
    ``X_ab = x_a ... x_b``. Merging ``a..m`` with ``m+1..b`` is one matrix product
    ``(d_{a-1} X_am, d_m) @ (d_m, X_{m+1,b} d_b)`` costing ``d_{a-1} X_am d_m X_{m+1,b} d_b``
    multiply-adds. The optimum over all binary trees is found in ``O(n^3)`` (matrix-chain order).
    For ``A, D_1..D_L, B`` with big ``A``/``B`` this multiplies the small ``r x r`` dummies together
    first, and the unavoidable final ``(P, r) @ (r, Q)`` product dominates: about ``IJ * r``.

    Returns:
        ``(tree, multiply_adds)`` where ``tree`` is an int (a core index) or a pair of subtrees.
    """
    n = len(shapes)
    x = [s[1] * s[2] for s in shapes]
    d = [shapes[0][0]] + [s[3] for s in shapes]
    cost = [[0] * n for _ in range(n)]
    split = [[-1] * n for _ in range(n)]
    for length in range(2, n + 1):
        for a in range(n - length + 1):
            b = a + length - 1
            best, best_m = None, -1
            for m in range(a, b):
                c = cost[a][m] + cost[m + 1][b] + d[a] * math.prod(x[a:m + 1]) * d[m + 1] * math.prod(x[m + 1:b + 1]) * d[b + 1]
                if best is None or c < best:
                    best, best_m = c, m
            cost[a][b], split[a][b] = best, best_m

    def tree(a: int, b: int) -> object:
        return a if a == b else (tree(a, split[a][b]), tree(split[a][b] + 1, b))

    return tree(0, n - 1), cost[0][n - 1]


def contraction_flops(shapes: Sequence[Sequence[int]]) -> int:
    """Floating-point operations (2 per multiply-add) of one :func:`reconstruct` forward pass."""
    return 2 * contraction_order(tuple(tuple(int(v) for v in s) for s in shapes))[1]


def _contract(tree: object, cores: Sequence[Tensor]) -> Tensor:
    if isinstance(tree, int):
        c = cores[tree]
        return c.reshape(c.shape[0], c.shape[1] * c.shape[2], c.shape[3])
    left, right = _contract(tree[0], cores), _contract(tree[1], cores)
    a, x1, m = left.shape
    _, x2, b = right.shape
    return (left.reshape(a * x1, m) @ right.reshape(m, x2 * b)).reshape(a, x1 * x2, b)


def reconstruct(cores: Sequence[Tensor]) -> Tensor:
    """Contract MPO cores back to the matrix ``(I, J)``; differentiable, cheapest order.

    The order comes from :func:`contraction_order` (cached per shape tuple), so the hot path is a
    handful of matmuls and one final permutation copy of ``I * J`` elements.
    """
    if len(cores) == 0:
        raise MPOError('reconstruct needs at least one core')
    shapes = tuple(tuple(c.shape) for c in cores)
    if any(len(s) != 4 for s in shapes) or shapes[0][0] != 1 or shapes[-1][3] != 1 or \
            any(shapes[k][3] != shapes[k + 1][0] for k in range(len(shapes) - 1)):
        raise MPOError(f'cores do not form an MPO chain (d_0 = d_n = 1, matching bonds): {list(shapes)}')
    tree, _ = contraction_order(shapes)
    flat = _contract(tree, cores)
    rows = [s[1] for s in shapes]
    cols = [s[2] for s in shapes]
    n = len(cores)
    if n == 1:
        return flat.reshape(rows[0], cols[0])
    t = flat.reshape([v for pair in zip(rows, cols) for v in pair])
    perm = list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))
    return t.permute(perm).reshape(math.prod(rows), math.prod(cols))


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """``||approx - exact||_F / ||exact||_F`` in float64 (absolute error when ``exact`` is zero)."""
    diff = (approx.detach().double() - exact.detach().double()).norm().item()
    ref = exact.detach().double().norm().item()
    return diff / ref if ref > 0 else diff
