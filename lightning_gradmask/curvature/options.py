"""The estimator options of :func:`~lightning_gradmask.curvature.hessian_statistics`, in one typed place.

The common knobs (which statistics, ``top_k``, ``trace_matvecs``, ``exact_up_to``, ``seed``) are
arguments of ``hessian_statistics`` and of ``HessianMonitor`` themselves; everything finer is a
field of :class:`StatisticsOptions`, validated when it is made.

Example::

    options = StatisticsOptions(lanczos_tol=1e-6, density_runs=8)
    hessian_statistics(op, ("eigenvalues", "density"), top_k=3, options=options)
    HessianMonitor(stats="eigenvalues", options=options)

In a LightningCLI YAML (jsonargparse builds the dataclass from the mapping)::

    - class_path: lightning_gradmask.HessianMonitor
      init_args:
        options:
          lanczos_tol: 1.0e-6
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from lightning_gradmask.errors import GradmaskConfigError

__all__ = ["DiagonalMode", "StatisticsOptions", "TraceMethod"]

TraceMethod = Literal["auto", "adaptive", "xtrace", "xtrace-rademacher", "hutchinson", "hutch++"]
"""How the trace is found: ``"auto"`` (exact blocks where cheap, an estimate on the rest) or one estimator."""

DiagonalMode = Literal["auto", "exact", "estimate"]
"""How the diagonal is found: exact where cheap (``"auto"``), exact everywhere, or estimated everywhere."""


@dataclass(frozen=True)
class StatisticsOptions:
    """Estimator options of :func:`~lightning_gradmask.curvature.hessian_statistics` (all have defaults).

    Attributes:
        trace_method: ``"auto"`` (default): on a :class:`~lightning_gradmask.curvature.HessianOperator`,
            the exact diagonal of every parameter the layerwise or piecewise rule of
            :func:`~lightning_gradmask.curvature.exact_diagonal` accepts, the remaining parameters
            exactly by one-hot matvecs if they have at most ``trace_matvecs`` entries
            (``exact_diagonal_up_to`` when the diagonal is wanted), otherwise estimated with
            ``trace_matvecs`` matvecs restricted to them. Any other method of
            :func:`~lightning_gradmask.curvature.estimate_trace` estimates the whole trace with it.
        lanczos_matvecs: most matvecs for the top eigenvalues (an upper bound: Lanczos stops once
            ``lanczos_tol`` is met). ``None``: :func:`~lightning_gradmask.curvature.default_lanczos_matvecs`.
        lanczos_tol: relative accuracy of each top eigenvalue (``tol`` of :func:`~lightning_gradmask.curvature.lanczos`).
        diagonal: ``"auto"`` (exact where the rules above make it affordable, estimated elsewhere),
            ``"exact"`` (exact everywhere, one matvec per entry outside the fast rules) or
            ``"estimate"`` (stochastic everywhere, sharing the trace's matvecs).
        exact_diagonal_up_to: the diagonal of the parameters no fast rule handles is computed
            exactly (one matvec per entry) when they have at most this many entries.
        diagonal_matvecs: matvecs for a stochastic diagonal (shared with the trace estimate).
        density_runs: Lanczos runs of the spectral density (``num_runs`` of
            :func:`~lightning_gradmask.curvature.spectral_density`).
        density_matvecs_per_run: matvecs of each density run (its quadrature order).
        density_grid_size: points of the density grid.
        density_sigma: Gaussian broadening width (``None``: 1% of the spectrum's range).

    Raises:
        GradmaskConfigError: (a ``ValueError``) a field out of range or not one of its choices, naming the field.
    """

    trace_method: TraceMethod = "auto"
    lanczos_matvecs: int | None = None
    lanczos_tol: float = 1e-4
    diagonal: DiagonalMode = "auto"
    exact_diagonal_up_to: int = 2048
    diagonal_matvecs: int = 100
    density_runs: int = 4
    density_matvecs_per_run: int = 40
    density_grid_size: int = 256
    density_sigma: float | None = None

    def __post_init__(self) -> None:
        _choice("trace_method", self.trace_method, TraceMethod)
        _choice("diagonal", self.diagonal, DiagonalMode)
        if self.lanczos_matvecs is not None:
            _count("lanczos_matvecs", self.lanczos_matvecs, minimum=1)
        _count("exact_diagonal_up_to", self.exact_diagonal_up_to, minimum=0)
        _count("diagonal_matvecs", self.diagonal_matvecs, minimum=2)
        _count("density_runs", self.density_runs, minimum=1)
        _count("density_matvecs_per_run", self.density_matvecs_per_run, minimum=1)
        _count("density_grid_size", self.density_grid_size, minimum=2)
        _positive("lanczos_tol", self.lanczos_tol, allow_zero=True)
        if self.density_sigma is not None:
            _positive("density_sigma", self.density_sigma, allow_zero=False)


def _choice(name: str, value: object, choices: object) -> None:
    allowed = list(get_args(choices))
    if value not in allowed:
        raise GradmaskConfigError(f"StatisticsOptions({name}={value!r}): choose from {allowed}")


def _count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GradmaskConfigError(f"StatisticsOptions({name}=...) must be an integer >= {minimum}, got {value!r}")


def _positive(name: str, value: object, allow_zero: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]  # a number here
        bound = ">= 0" if allow_zero else "> 0"
        raise GradmaskConfigError(f"StatisticsOptions({name}=...) must be a finite number {bound}, got {value!r}")
