"""Lanczos: algebraically largest eigenvalues, accuracy, seeding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradmask.curvature import HessianOperator, MatrixOperator, default_lanczos_matvecs, lanczos

from reference import cross_entropy_of, reference_hessian

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp_and_hessian() -> tuple[HessianOperator, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (32,), generator=g)
    h = reference_hessian(model, cross_entropy_of(x, y))
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    return op, h


def test_top_eigenvalues_match_eigvalsh():
    op, h = mlp_and_hessian()
    exact = torch.linalg.eigvalsh(h).flip(0)
    res = lanczos(op, k=3, seed=0, tol=1e-6)
    assert res.converged
    rel = ((res.eigenvalues - exact[:3]).abs() / exact[:3].abs()).max()
    assert rel < 1e-4
    assert res.num_matvecs == op.num_matvecs < op.dim
    assert torch.all(res.eigenvalues[:-1] >= res.eigenvalues[1:])  # descending
    assert res.alphas.numel() == res.num_matvecs and res.betas.numel() == res.num_matvecs - 1


def test_eigenvectors_and_residuals():
    op, h = mlp_and_hessian()
    res = lanczos(op, k=2, seed=0, tol=1e-8, return_eigenvectors=True)
    assert res.eigenvectors is not None and res.eigenvectors.shape == (op.dim, 2)
    for i in range(2):
        v = res.eigenvectors[:, i]
        r = (h @ v - res.eigenvalues[i] * v).norm()
        assert abs(float(v.norm()) - 1) < 1e-8
        assert float(r) <= float(res.residuals[i]) * 1.01 + 1e-10


def test_algebraically_largest_with_dominant_negative_eigenvalue():
    # loss = 0.5 w^T A w with A = Q diag(...) Q^T: the largest-magnitude eigenvalue is -5, the
    # algebraically largest +0.3; power iteration would report -5.
    g = torch.Generator().manual_seed(0)
    n = 40
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.cat(
        [
            torch.tensor([-5.0, 0.3, 0.25, -4.0], dtype=torch.float64),
            torch.linspace(-1, 0.2, n - 4, dtype=torch.float64),
        ]
    )
    a = q @ torch.diag(eig) @ q.T
    a = 0.5 * (a + a.T)
    w = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    op = HessianOperator(lambda: 0.5 * w @ a @ w, {"w": w})
    res = lanczos(op, k=2, seed=3, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([0.3, 0.25], dtype=torch.float64), rtol=1e-8, atol=1e-10)
    assert (res.eigenvalues > 0).all()


def test_seeded_determinism():
    op, _ = mlp_and_hessian()
    a = lanczos(op, k=2, seed=7)
    b = lanczos(op, k=2, seed=7)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.alphas, b.alphas)
    c = lanczos(op, k=2, seed=torch.Generator().manual_seed(7))
    assert torch.equal(a.alphas, c.alphas)  # an int seed and a generator seeded alike agree


def test_low_rank_restart_finds_multiplicity():
    # rank-3 matrix with a double eigenvalue: the Krylov space of one start vector cannot see both
    # copies; the orthogonal restart does.
    g = torch.Generator().manual_seed(1)
    n = 30
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q[:, :3] @ torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)) @ q[:, :3].T
    res = lanczos(MatrixOperator(a), k=3, seed=0, tol=1e-10)
    torch.testing.assert_close(
        res.eigenvalues, torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64), rtol=1e-8, atol=1e-8
    )


def test_exhausting_the_space_is_exact():
    a = torch.diag(torch.tensor([3.0, -7.0, 1.0, 0.5], dtype=torch.float64))
    res = lanczos(MatrixOperator(a), k=4, seed=0, tol=1e-12)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 1.0, 0.5, -7.0], dtype=torch.float64))
    assert res.converged and res.num_matvecs <= 4


def clustered_matrix(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """A spectrum with a tight top cluster (1, 0.99, 0.985, 0.98) above a bulk in [0, 0.9]."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.cat([torch.tensor([1.0, 0.99, 0.985, 0.98], dtype=torch.float64), torch.linspace(0, 0.9, n - 4)])
    a = q @ torch.diag(eig.double()) @ q.T
    return 0.5 * (a + a.T), q


def test_eigenvalue_hidden_in_a_cluster_is_found():
    # The start vector has only 5% of its weight along the eigenvector of 0.985: the other top values
    # meet the tolerance long before 0.985 shows up; stopping then would report 0.98 as the third.
    a, q = clustered_matrix()
    weights = torch.ones(a.shape[0], dtype=torch.float64)
    weights[2] = 0.05
    res = lanczos(MatrixOperator(a), k=3, v0=q @ weights, seed=0)
    assert res.converged and res.stop_reason == "converged"
    torch.testing.assert_close(res.eigenvalues, torch.tensor([1.0, 0.99, 0.985], dtype=torch.float64), rtol=1e-6, atol=0)


def test_budget_running_out_is_reported():
    op, _ = mlp_and_hessian()
    res = lanczos(op, k=3, num_matvecs=5, tol=1e-10, seed=0)
    assert not res.converged and res.stop_reason == "num_matvecs"
    assert res.num_matvecs == op.num_matvecs == 5
    exact = lanczos(MatrixOperator(torch.diag(torch.tensor([3.0, -7.0, 1.0], dtype=torch.float64))), k=2)
    assert exact.converged and exact.stop_reason == "exhausted"


def test_default_budget_is_generous_but_capped_by_dim():
    assert default_lanczos_matvecs(10_000, 1) == 100
    assert default_lanczos_matvecs(10_000, 5) == 190
    assert default_lanczos_matvecs(50, 5) == 50


def test_warm_start_from_previous_eigenvectors():
    op, h = mlp_and_hessian()
    exact = torch.linalg.eigvalsh(h).flip(0)[:2]
    cold = lanczos(op, k=2, tol=1e-8, seed=0, return_eigenvectors=True)
    assert cold.eigenvectors is not None
    warm = lanczos(op, k=2, tol=1e-8, seed=1, init=cold.eigenvectors)
    torch.testing.assert_close(warm.eigenvalues, exact, rtol=1e-6, atol=0)
    assert warm.converged and warm.num_matvecs < cold.num_matvecs
    one = lanczos(op, k=1, tol=1e-8, seed=1, init=cold.eigenvectors[:, 0])  # a (dim,) vector works too
    torch.testing.assert_close(one.eigenvalues, exact[:1], rtol=1e-6, atol=0)


def test_bad_start_arguments_are_rejected():
    op, _ = mlp_and_hessian()
    with pytest.raises(ValueError, match=r"init must have shape"):
        lanczos(op, init=torch.ones(op.dim + 1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="zero or non-finite column"):
        lanczos(op, init=torch.zeros(op.dim, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="either v0"):
        lanczos(op, v0=torch.ones(op.dim), init=torch.ones(op.dim))
    assert op.num_matvecs == 0
