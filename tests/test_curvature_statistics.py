"""hessian_statistics: exact when affordable, estimates otherwise, density, seeding, reduce."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradmask.curvature import (
    STATS,
    HessianOperator,
    HessianStatistics,
    StatisticsOptions,
    exact_diagonal,
    hessian_statistics,
    spectral_density,
)

from reference import cross_entropy_of, reference_hessian

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp_problem(hidden: int = 8) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(24, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)


def full_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return reference_hessian(model, cross_entropy_of(x, y))


def test_exact_path_when_dim_within_budget():
    model, x, y = mlp_problem()
    h = full_hessian(model, x, y)
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    stats = hessian_statistics(op, STATS, top_k=3, exact_up_to=op.dim)
    assert isinstance(stats, HessianStatistics)
    assert all(stats.exact[s] for s in STATS)
    assert stats.num_matvecs == op.dim
    eig = torch.linalg.eigvalsh(h).flip(0)
    torch.testing.assert_close(stats.eigen.eigenvalues, eig[:3], rtol=1e-9, atol=1e-12)
    assert stats.trace.trace == pytest.approx(float(torch.trace(h)), rel=1e-10)
    assert stats.trace.stderr == 0.0
    flat = torch.cat([d.reshape(-1) for d in stats.diagonal.per_parameter.values()])
    torch.testing.assert_close(flat, torch.diagonal(h), rtol=1e-9, atol=1e-12)
    assert stats.density.nodes.shape == (1, op.dim)
    integral = torch.trapezoid(stats.density.density, stats.density.grid)
    assert float(integral) == pytest.approx(1.0, abs=1e-3)


def test_estimated_path_and_density():
    model, x, y = mlp_problem(hidden=30)
    h = full_hessian(model, x, y)
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    options = StatisticsOptions(density_runs=3, density_matvecs_per_run=25)
    stats = hessian_statistics(op, STATS, top_k=2, exact_up_to=0, seed=5, options=options)
    assert not stats.exact["eigenvalues"] and not stats.exact["density"]
    eig = torch.linalg.eigvalsh(h).flip(0)
    assert float(((stats.eigen.eigenvalues - eig[:2]).abs() / eig[:2].abs()).max()) < 1e-4
    # Linear layers: trace and diagonal come exactly from the layerwise (and, for the last layer,
    # the piecewise-linear) diagonal
    assert stats.exact["trace"] and stats.exact["diagonal"]
    assert stats.trace.trace == pytest.approx(float(torch.trace(h)), rel=1e-9)
    assert set(stats.diagonal.methods.values()) == {"layerwise", "piecewise"}
    assert stats.density.nodes.shape == (3, 25)
    torch.testing.assert_close(stats.density.weights.sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert float(torch.trapezoid(stats.density.density, stats.density.grid)) == pytest.approx(1.0, abs=1e-2)
    assert stats.num_matvecs == sum(stats.matvecs.values())
    keys = stats.scalars(per_parameter=True)
    assert {"hessian/trace", "hessian/eigenvalue_1", "hessian/eigenvalue_2", "hessian/trace/0.weight"} <= set(keys)


def test_seeded_statistics_are_identical():
    model, x, y = mlp_problem(hidden=30)
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    options = StatisticsOptions(trace_method="hutchinson", density_runs=2, density_matvecs_per_run=10)
    kw = dict(stats=("trace", "eigenvalues", "density"), exact_up_to=0, options=options)
    a = hessian_statistics(op, seed=11, **kw)
    b = hessian_statistics(op, seed=11, **kw)
    c = hessian_statistics(op, seed=12, **kw)
    assert a.trace.trace == b.trace.trace and torch.equal(a.eigen.eigenvalues, b.eigen.eigenvalues)
    assert torch.equal(a.density.density, b.density.density)
    assert a.trace.trace != c.trace.trace


def test_cnn_hybrid_trace_within_error():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)
    ).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 1, 7, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    true = float(exact_diagonal(op).diagonal.sum())
    # conv blocks (40 + 148 entries) are estimated with 30 products; the Linear block is exact
    stats = hessian_statistics(op, ("trace",), exact_up_to=0, trace_matvecs=30, seed=0)
    assert stats.trace.method.startswith("exact+")
    assert not stats.exact["trace"]
    assert stats.trace.per_parameter_stderr["5.weight"] == 0.0
    assert abs(stats.trace.trace - true) <= 4 * stats.trace.stderr
    # with enough budget the conv blocks are done exactly too
    exact = hessian_statistics(op, ("trace",), exact_up_to=0, trace_matvecs=200, seed=0)
    assert exact.exact["trace"] and exact.trace.trace == pytest.approx(true, rel=1e-9)


def recording_reduce() -> tuple[list[tuple[int, ...]], Callable[[torch.Tensor], torch.Tensor]]:
    """A ``reduce`` hook that records the shape of everything it is given (an identity otherwise)."""
    shapes: list[tuple[int, ...]] = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    return shapes, reduce


def test_reduce_called_once_per_product():
    model, x, y = mlp_problem(hidden=30)
    shapes, reduce = recording_reduce()
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y), reduce=reduce)
    shapes.clear()
    stats = hessian_statistics(
        op,
        ("trace", "eigenvalues", "density"),
        exact_up_to=0,
        trace_matvecs=12,
        options=StatisticsOptions(trace_method="hutchinson", density_runs=2, density_matvecs_per_run=8),
        seed=0,
    )
    assert shapes == [(op.dim,)] * stats.num_matvecs


def test_density_helper_integrates_to_one():
    model, x, y = mlp_problem(hidden=30)
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    dens = spectral_density(op, num_runs=2, matvecs_per_run=20, seed=0)
    assert dens.num_matvecs == 40
    assert float(torch.trapezoid(dens.density, dens.grid)) == pytest.approx(1.0, abs=1e-2)
    assert (dens.density >= 0).all()


def test_bad_arguments():
    model, x, y = mlp_problem()
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="unknown statistics"):
        hessian_statistics(op, ("trace", "curvature"))
    with pytest.raises(TypeError):
        hessian_statistics(op, ("trace",), seed=torch.Generator())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="options must be a StatisticsOptions"):
        hessian_statistics(op, ("trace",), options={"lanczos_tol": 1e-3})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(trace_method="exactly"), r"StatisticsOptions\(trace_method='exactly'\): choose from \['auto', 'adaptive'"),
        (dict(diagonal="some"), r"diagonal='some'.*choose from"),
        (dict(lanczos_matvecs=0), r"lanczos_matvecs=\.\.\.\) must be an integer >= 1"),
        (dict(density_runs=1.5), r"density_runs=\.\.\.\) must be an integer"),
        (dict(lanczos_tol=-1.0), r"lanczos_tol=\.\.\.\) must be a finite number >= 0"),
        (dict(density_sigma=0.0), r"density_sigma=\.\.\.\) must be a finite number > 0"),
    ],
)
def test_statistics_options_are_validated_when_made(options, match):
    with pytest.raises(ValueError, match=match):
        StatisticsOptions(**options)


def test_exact_path_reduces_the_whole_hessian_once():
    """Statistics linear in H need one collective, not one per product."""
    model, x, y = mlp_problem(hidden=3)
    shapes, reduce = recording_reduce()
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y), reduce=reduce)
    shapes.clear()
    stats = hessian_statistics(op, ("trace", "eigenvalues", "diagonal"), seed=0)
    assert stats.exact["trace"] and stats.exact["eigenvalues"]
    assert shapes == [(op.dim, op.dim)]
    assert op.reduce is reduce and op.check_finite  # restored after the local products
