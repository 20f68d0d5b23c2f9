"""Spectral density by stochastic Lanczos quadrature (SLQ), with Gaussian broadening.

Each run starts Lanczos from a fresh seeded random unit vector ``v``; the eigenvalues ``theta_k`` of
the tridiagonal matrix and the squared first components ``tau_k^2`` of its eigenvectors are the
nodes and weights of the Gauss quadrature of ``v``'s spectral measure. Averaging over runs and
replacing each node by a Gaussian of width ``sigma`` gives a smooth estimate of the eigenvalue
density ``(1/n) sum_i delta(t - lambda_i)``; it integrates to 1.

Example::

    dens = spectral_density(op, num_runs=4, matvecs_per_run=40, seed=0)
    plt.semilogy(dens.grid, dens.density)
    dens.nodes, dens.weights            # raw quadrature, one row per run
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gradmask.curvature._random import Seed, as_generator, subseed
from lightning_gradmask.curvature.lanczos import LanczosResult, lanczos
from lightning_gradmask.curvature.operator import LinearOperator

__all__ = ["SpectralDensity", "broaden", "spectral_density"]


@dataclass
class SpectralDensity:
    """A spectral density on a grid.

    Attributes:
        grid, density: ``(grid_size,)`` float64; ``density`` integrates to ~1 over ``grid``.
        nodes, weights: ``(runs, steps)`` float64 quadrature nodes (Ritz values) and weights (each
            row of ``weights`` sums to 1; rows shorter than ``steps`` are padded with weight 0).
        sigma: the Gaussian width used. num_matvecs: products spent. exact: nodes are the exact
            eigenvalues (weights ``1/dim``).
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_matvecs: int
    exact: bool = False


def broaden(
    nodes: Tensor,
    weights: Tensor,
    *,
    grid_size: int = 256,
    sigma: float | None = None,
    grid: Tensor | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Gaussian-broadened density ``mean_runs sum_k w_k N(t; theta_k, sigma^2)`` on a grid.

    ``sigma`` defaults to 1% of the node range; the grid spans the nodes plus ``5 sigma`` on each
    side, so the density integrates to 1 up to the trapezoid error.
    """
    nodes = nodes.to(torch.float64).reshape(nodes.shape[0] if nodes.ndim > 1 else 1, -1)
    weights = weights.to(torch.float64).reshape(nodes.shape)
    live = weights > 0
    lo = float(nodes[live].min()) if live.any() else 0.0
    hi = float(nodes[live].max()) if live.any() else 0.0
    if sigma is None:
        width = hi - lo
        sigma = 0.01 * width if width > 0 else max(abs(hi), 1.0) * 1e-3
    if sigma <= 0:
        raise ValueError("sigma must be positive")
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=torch.float64)
    grid = grid.to(torch.float64)
    diff = grid.reshape(-1, 1, 1) - nodes.unsqueeze(0)  # (grid, runs, steps)
    gauss = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * (2 * torch.pi) ** 0.5)
    density = (gauss * weights.unsqueeze(0)).sum(dim=2).mean(dim=1)
    return grid, density, float(sigma)


def spectral_density(
    op: LinearOperator,
    *,
    num_runs: int = 4,
    matvecs_per_run: int = 40,
    grid_size: int = 256,
    sigma: float | None = None,
    seed: Seed = 0,
    reuse: Sequence[LanczosResult] = (),
) -> SpectralDensity:
    """SLQ spectral density: ``num_runs`` Lanczos runs of ``matvecs_per_run`` matvecs each.

    Args:
        reuse: Lanczos runs already made from random start vectors (e.g. the one that computed the
            top eigenvalues); they count as runs, so only ``num_runs - len(reuse)`` new ones are made.
        seed: ``int`` or CPU ``torch.Generator``; run ``j`` uses a sub-seed of it.

    Example::

        top = lanczos(op, k=1, seed=1)
        dens = spectral_density(op, num_runs=4, reuse=[top], seed=2)
    """
    if num_runs < 1 or matvecs_per_run < 1:
        raise ValueError("num_runs and matvecs_per_run must be positive")
    steps = min(matvecs_per_run, op.dim)
    start = op.num_matvecs
    gen = as_generator(seed) if isinstance(seed, torch.Generator) else None
    runs: list[LanczosResult] = list(reuse)
    j = 0
    while len(runs) < num_runs:
        run_seed: Seed = gen if gen is not None else subseed(int(seed), j)  # type: ignore[arg-type]
        runs.append(lanczos(op, k=1, num_matvecs=steps, tol=0.0, seed=run_seed, restart=False))
        j += 1
    width = max(r.alphas.numel() for r in runs)
    nodes = torch.zeros(len(runs), width, dtype=torch.float64)
    weights = torch.zeros(len(runs), width, dtype=torch.float64)
    for i, r in enumerate(runs):
        theta, w = r.quadrature()
        nodes[i, : theta.numel()] = theta
        weights[i, : w.numel()] = w
    grid, density, sig = broaden(nodes, weights, grid_size=grid_size, sigma=sigma)
    return SpectralDensity(
        grid=grid,
        density=density,
        nodes=nodes,
        weights=weights,
        sigma=sig,
        num_matvecs=op.num_matvecs - start,
    )
