"""Trace estimators: within their reported error, per-parameter split, exactness, seeding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradmask.curvature import HessianOperator, MatrixOperator, estimate_trace, exact_diagonal

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def moderate() -> tuple[HessianOperator, float, dict[str, float]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 30), nn.Tanh(), nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (64,), generator=g)
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    diag = exact_diagonal(op).diagonal  # checked against torch.func.hessian in test_curvature_diagonal
    per = {n: float(d.sum()) for n, d in op.split(diag).items()}
    return op, float(diag.sum()), per


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace", "xtrace-rademacher", "adaptive", "auto"])
def test_estimate_within_reported_error(moderate, method):
    op, true, per_true = moderate
    assert op.dim > 1000
    for seed in range(3):
        est = estimate_trace(op, 60, method=method, seed=seed)
        assert est.num_matvecs == 60
        assert est.stderr > 0
        assert abs(est.trace - true) <= 4 * est.stderr, (seed, est.trace, true, est.stderr)
        assert abs(sum(est.per_parameter.values()) - est.trace) <= 1e-8 * abs(true)
        assert set(est.per_parameter) == set(per_true)


def test_seeded_determinism(moderate):
    op, _, _ = moderate
    for method in ("hutchinson", "xtrace", "adaptive"):
        a = estimate_trace(op, 20, method=method, seed=3)
        b = estimate_trace(op, 20, method=method, seed=3)
        c = estimate_trace(op, 20, method=method, seed=4)
        assert a.trace == b.trace and torch.equal(a.samples, b.samples)
        assert a.trace != c.trace


def test_low_rank_hessian_is_recovered_exactly():
    g = torch.Generator().manual_seed(0)
    n = 300
    q, _ = torch.linalg.qr(torch.randn(n, 4, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([3.0, -2.0, 1.5, -0.5], dtype=torch.float64)) @ q.T
    w = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    op = HessianOperator(lambda: 0.5 * w @ a @ w, {"w": w})
    for method in ("xtrace", "adaptive"):
        est = estimate_trace(op, 20, method=method, seed=0, diagonal=True)
        assert est.exact and est.stderr == 0.0
        assert abs(est.trace - 2.0) < 1e-10
        assert est.diagonal is not None
        torch.testing.assert_close(est.diagonal, torch.diagonal(a), rtol=1e-9, atol=1e-12)


def test_adaptive_chooses_deflation_for_outliers_and_hutchinson_for_flat():
    g = torch.Generator().manual_seed(0)
    n = 400
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    outliers = torch.cat(
        [
            torch.tensor([80.0, -60.0, 40.0], dtype=torch.float64),
            0.1 * torch.randn(n - 3, generator=g, dtype=torch.float64),
        ]
    )
    spiky = MatrixOperator(q @ torch.diag(outliers) @ q.T)
    flat = MatrixOperator(q @ torch.diag(torch.randn(n, generator=g, dtype=torch.float64)) @ q.T)
    assert estimate_trace(spiky, 40, method="adaptive", seed=0).method == "adaptive:xtrace-rademacher"
    assert estimate_trace(flat, 40, method="adaptive", seed=0).method == "adaptive:hutchinson"


def test_block_operator_trace(moderate):
    op, _, per_true = moderate
    block = op.block(["4.weight", "4.bias"])
    assert block.dim == 30 * 4 + 4
    est = estimate_trace(block, 40, method="hutchinson", seed=0)
    true = per_true["4.weight"] + per_true["4.bias"]
    assert abs(est.trace - true) <= 4 * est.stderr
    assert set(est.per_parameter) == {"4.weight", "4.bias"}
