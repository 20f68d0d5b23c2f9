"""Pure-torch Hessian statistics: products, top eigenvalues, trace, diagonal, spectral density.

Nothing here imports Lightning; everything works on a bare ``nn.Module`` (the ``HessianMonitor``
callback is a thin layer over :func:`hessian_statistics`).

Example::

    from lightning_gradmask.curvature import HessianOperator, hessian_statistics

    model.eval()
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    stats = hessian_statistics(op, ("trace", "eigenvalues", "diagonal", "density"), top_k=3, seed=0)
    print(stats.trace.trace, "+-", stats.trace.stderr, stats.eigen.eigenvalues, stats.exact)

Building blocks, each usable alone:

* :class:`HessianOperator` -- ``v -> H v`` (masked, multi-batch, ``reduce`` hook for DDP).
* :func:`lanczos` -- algebraically largest eigenvalues (not largest magnitude).
* :func:`estimate_trace` -- XTrace / Hutchinson / Hutch++ with a standard error, per parameter.
* :func:`exact_diagonal`, :func:`estimate_diagonal` -- the diagonal, exact (fast for Linear layers)
  or estimated.
* :func:`spectral_density` -- stochastic Lanczos quadrature.
* :func:`dense_hessian`, :func:`exact_statistics` -- when ``dim`` is small enough to afford.
"""

from lightning_gradmask.curvature.density import SpectralDensity, broaden, spectral_density
from lightning_gradmask.curvature.diagonal import DiagonalResult, estimate_diagonal, exact_diagonal, exact_diagonal_cost
from lightning_gradmask.curvature.exact import ExactStatistics, dense_hessian, exact_statistics
from lightning_gradmask.curvature.lanczos import LanczosResult, default_lanczos_matvecs, lanczos
from lightning_gradmask.curvature.operator import (
    BlockOperator,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
    NonFiniteLossError,
)
from lightning_gradmask.curvature.options import StatisticsOptions
from lightning_gradmask.curvature.statistics import STATS, HessianStatistics, hessian_statistics, planned_matvecs
from lightning_gradmask.curvature.trace import TraceEstimate, estimate_trace

__all__ = [
    "STATS",
    "BlockOperator",
    "DiagonalResult",
    "ExactStatistics",
    "HessianOperator",
    "HessianStatistics",
    "LanczosResult",
    "LinearOperator",
    "MatrixOperator",
    "NonFiniteLossError",
    "SpectralDensity",
    "StatisticsOptions",
    "TraceEstimate",
    "broaden",
    "default_lanczos_matvecs",
    "dense_hessian",
    "estimate_diagonal",
    "estimate_trace",
    "exact_diagonal",
    "exact_diagonal_cost",
    "exact_statistics",
    "hessian_statistics",
    "lanczos",
    "planned_matvecs",
    "spectral_density",
]
