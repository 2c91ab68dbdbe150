"""The MPO math: exactness, the gauge, the cost model, and an independent oracle (tensorly)."""
import math

import pytest
import tensorly as tl
import torch
from tensorly.tt_matrix import tt_matrix_to_tensor

from opdf_torchdistill import mpo
from opdf_torchdistill.mpo import MPOError, bond_dims, core_shapes, decompose, reconstruct
from conftest import rel

FACTORIZATIONS = [
    ((64, 48), (8, 8), (6, 8)),                  # two cores: the paper's "+SVD" variant
    ((64, 48), (8, 1, 8), (6, 1, 8)),            # one dummy factor (default)
    ((64, 48), (8, 1, 1, 1, 8), (6, 1, 1, 1, 8)),  # three dummies
    ((60, 42), (3, 4, 5), (2, 3, 7)),            # three real factors, odd sizes
    ((12, 20), (2, 3, 1, 2), (2, 5, 1, 2)),      # dummy next to the central real factor
    ((1, 36), (1, 1), (6, 6)),                   # a 1xN matrix
    ((36, 1), (6, 1, 6), (1, 1, 1)),             # an Nx1 matrix
    ((7, 11), (7, 1), (1, 11)),                  # primes
    ((6, 6), (1, 2, 3), (2, 1, 3)),              # a trivial first row factor
]


def _random(shape, dtype, kind):
    if kind == 'random':
        return torch.randn(*shape, dtype=dtype)
    if kind == 'rank_deficient':
        r = max(1, min(shape) // 3)
        return (torch.randn(shape[0], r, dtype=torch.float64) @ torch.randn(r, shape[1], dtype=torch.float64)).to(dtype)
    if kind == 'zero':
        return torch.zeros(*shape, dtype=dtype)
    if kind == 'huge_range':
        u, _, v = torch.linalg.svd(torch.randn(*shape, dtype=torch.float64), full_matrices=False)
        s = torch.logspace(0, -14, u.shape[1], dtype=torch.float64)
        return ((u * s) @ v).to(dtype)
    raise ValueError(kind)


@pytest.mark.parametrize('shape,rows,cols', FACTORIZATIONS)
@pytest.mark.parametrize('kind', ['random', 'rank_deficient', 'zero', 'huge_range'])
def test_reconstruction_is_exact(shape, rows, cols, kind):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        w = _random(shape, dtype, kind)
        cores = decompose(w, rows, cols)
        assert all(c.dtype == dtype for c in cores)
        assert [tuple(c.shape) for c in cores] == list(core_shapes(rows, cols))
        assert rel(reconstruct(cores), w) <= tol, (dtype, kind)


@pytest.mark.parametrize('shape,rows,cols', FACTORIZATIONS)
def test_tensorly_oracle_agrees(shape, rows, cols):
    tl.set_backend('pytorch')
    try:
        w = torch.randn(*shape, dtype=torch.float64)
        cores = decompose(w, rows, cols)
        theirs = tt_matrix_to_tensor(cores).reshape(shape)
        assert rel(reconstruct(cores), theirs) <= 1e-13
    finally:
        tl.set_backend('numpy')


def test_bond_dims_follow_the_formula():
    for rows, cols in [((8, 1, 8), (6, 1, 8)), ((3, 4, 5), (2, 3, 7)), ((2, 2, 2, 2), (3, 1, 3, 1))]:
        x = [i * j for i, j in zip(rows, cols)]
        expected = [1] + [min(math.prod(x[:k]), math.prod(x[k:])) for k in range(1, len(x))] + [1]
        assert list(bond_dims(rows, cols)) == expected
        assert mpo.num_params(rows, cols) == sum(math.prod(s) for s in core_shapes(rows, cols))
    # With two real factors and L dummies: IJ + (L + 1) r^2 parameters.
    for L in range(4):
        rows, cols = (8,) + (1,) * L + (8,), (6,) + (1,) * L + (8,)
        r = min(48, 64)
        assert mpo.num_params(rows, cols) == 64 * 48 + (L + 1) * r * r


def test_dummy_cores_are_identity_and_gauge_is_symmetric():
    w = torch.randn(64, 48, dtype=torch.float64)
    a, d1, d2, b = decompose(w, (8, 1, 1, 8), (6, 1, 1, 8))
    eye = torch.eye(d1.shape[0], dtype=torch.float64)
    assert torch.equal(d1.reshape(eye.shape), eye) and torch.equal(d2.reshape(eye.shape), eye)
    # Symmetric split: left part = U S^1/2 and right part = S^1/2 V^T, so A^T A = B B^T = S (diagonal).
    left, right = a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)
    s = torch.linalg.svdvals(mpo._interleaved(w, (8, 8), (6, 8)).reshape(48, 64))
    torch.testing.assert_close(left.T @ left, torch.diag(s), atol=1e-10, rtol=0)
    torch.testing.assert_close(right @ right.T, torch.diag(s), atol=1e-10, rtol=0)
    # Sign rule: the largest-magnitude entry of every left singular vector is positive.
    idx = left.abs().argmax(dim=0)
    assert bool((left[idx, torch.arange(left.shape[1])] > 0).all())


def test_gauge_is_deterministic_across_calls_threads_and_layouts():
    w = torch.randn(96, 80, dtype=torch.float32)
    rows, cols = (8, 1, 12), (10, 1, 8)
    ref = decompose(w, rows, cols)
    perm = torch.randperm(96)
    restored = w[perm][torch.argsort(perm)]
    transposed_copy = w.t().contiguous().t()  # same values, column-major strides
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for variant in (w, restored, transposed_copy):
                assert all(torch.equal(x, y) for x, y in zip(ref, decompose(variant, rows, cols)))
    finally:
        torch.set_num_threads(previous)
    assert torch.get_num_threads() == previous


def test_sign_flips_of_lapack_do_not_leak():
    # Negating the matrix negates the product; with the sign rule the gauge moves the sign into
    # a single place instead of scattering LAPACK's arbitrary choices.
    w = torch.randn(32, 24, dtype=torch.float64)
    c1 = decompose(w, (4, 8), (4, 6))
    c2 = decompose(-w, (4, 8), (4, 6))
    torch.testing.assert_close(c1[0], c2[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(c1[1], -c2[1], rtol=0, atol=1e-12)


def test_decompose_many_matches_decompose_bitwise():
    jobs = [(torch.randn(64, 72), (8, 1, 8), (8, 1, 9)), (torch.randn(32, 32), (4, 8), (8, 4)),
            (torch.randn(48, 20), (6, 8), (5, 4))]
    batched = mpo.decompose_many(jobs, workers=2)
    for job, cores in zip(jobs, batched):
        assert all(torch.equal(a, b) for a, b in zip(decompose(*job), cores))


def test_gradcheck_through_reconstruct():
    cores = [c.detach().requires_grad_() for c in decompose(torch.randn(6, 8, dtype=torch.float64), (2, 1, 3), (2, 1, 4))]
    assert torch.autograd.gradcheck(lambda *cs: reconstruct(cs), cores)
    cores = [c.detach().requires_grad_() for c in decompose(torch.randn(12, 10, dtype=torch.float64), (2, 3, 2), (5, 1, 2))]
    assert torch.autograd.gradcheck(lambda *cs: reconstruct(cs), cores)


def _brute_force_cost(shapes):
    x = [s[1] * s[2] for s in shapes]
    d = [shapes[0][0]] + [s[3] for s in shapes]

    def best(a, b):
        if a == b:
            return 0
        return min(best(a, m) + best(m + 1, b) + d[a] * math.prod(x[a:m + 1]) * d[m + 1] * math.prod(x[m + 1:b + 1]) * d[b + 1]
                   for m in range(a, b))
    return best(0, len(shapes) - 1)


def test_contraction_order_is_optimal():
    for rows, cols in [((8, 1, 8), (6, 1, 8)), ((4, 2, 1, 1, 8), (4, 1, 1, 3, 2)), ((3, 4, 5), (2, 3, 7)),
                       ((2,) * 6, (2,) * 6)]:
        shapes = core_shapes(rows, cols)
        assert mpo.contraction_order(shapes)[1] == _brute_force_cost(shapes)
    # Dummies are multiplied together before touching the big end cores.
    shapes = core_shapes((32, 1, 1, 16), (64, 1, 1, 72))
    tree, cost = mpo.contraction_order(shapes)
    r, p, q = 1152, 32 * 64, 16 * 72
    assert cost < 2 * p * r * r + p * r * q


def test_truncated_bond_is_an_approximation_with_the_right_shapes():
    w = torch.randn(64, 48, dtype=torch.float64)
    cores = decompose(w, (8, 1, 8), (6, 1, 8), max_bond=16)
    assert [tuple(c.shape) for c in cores] == [(1, 8, 6, 16), (16, 1, 1, 16), (16, 8, 8, 1)]
    err = rel(reconstruct(cores), w)
    assert 0 < err < 1
    # It is the best rank-16 approximation of the unfolding (Eckart-Young).
    s = torch.linalg.svdvals(mpo._interleaved(w, (8, 8), (6, 8)).reshape(48, 64))
    assert err == pytest.approx((s[16:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-9)


@pytest.mark.parametrize('bad,message', [
    (dict(matrix=torch.randn(6, 8), rows=(2, 2), cols=(2, 4)), 'do not multiply'),
    (dict(matrix=torch.randn(6, 8), rows=(2, 3), cols=(8,)), 'equal length'),
    (dict(matrix=torch.randn(6, 8), rows=(0, 6), cols=(2, 4)), 'positive integers'),
    (dict(matrix=torch.randn(6, 8), rows=(2.0, 3), cols=(2, 4)), 'positive integers'),
    (dict(matrix=torch.full((6, 8), float('nan')), rows=(2, 3), cols=(2, 4)), 'NaN or Inf'),
    (dict(matrix=torch.randn(2, 6, 8), rows=(2, 3), cols=(2, 4)), '2-D'),
    (dict(matrix=torch.ones(6, 8, dtype=torch.int64), rows=(2, 3), cols=(2, 4)), 'floating-point'),
])
def test_bad_input_is_refused_clearly(bad, message):
    with pytest.raises(MPOError, match=message):
        decompose(bad['matrix'], bad['rows'], bad['cols'])


def test_reconstruct_refuses_broken_chains():
    with pytest.raises(MPOError, match='chain'):
        reconstruct([torch.randn(1, 2, 2, 3), torch.randn(4, 2, 2, 1)])


def test_both_decomposition_paths_give_the_same_gauge():
    # Wide unfoldings use the eigendecomposition of M M^T; an explicit rtol forces the SVD path.
    w = torch.randn(48, 80, dtype=torch.float64)
    rows, cols = (6, 1, 8), (8, 1, 10)
    fast, svd = decompose(w, rows, cols), decompose(w, rows, cols, rtol=1e-14)
    for a, b in zip(fast, svd):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    # A null direction is floored, never divided by: every core stays bounded.
    low = (torch.randn(48, 3, dtype=torch.float64) @ torch.randn(3, 80, dtype=torch.float64))
    cores = decompose(low, rows, cols)
    assert all(c.abs().max() < 1e3 * low.abs().max() for c in cores)
    assert rel(reconstruct(cores), low) <= 1e-12
