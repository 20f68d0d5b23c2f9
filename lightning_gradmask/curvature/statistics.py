"""One entry point for every Hessian statistic: :func:`hessian_statistics`.

Example (what the ``HessianMonitor`` callback does, minus Lightning)::

    module.eval()
    op = HessianOperator.from_module(
        module,
        [lambda b=b: loss_fn(module, b) for b in cached_batches],   # mean over the batches
        masks=trainable_masks,          # {name: bool tensor}; None = every entry
        reduce=all_reduce_mean,         # DDP: average every product across ranks
    )
    stats = hessian_statistics(op, stats=("trace", "eigenvalues", "density"), top_k=3, seed=step)
    for key, value in stats.scalars().items():
        log(key, value)
    op.release()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lightning_gradmask.curvature._random import subseed
from lightning_gradmask.curvature.density import broaden, spectral_density
from lightning_gradmask.curvature.diagonal import _diag_by_products, exact_diagonal
from lightning_gradmask.curvature.exact import dense_hessian, exact_statistics
from lightning_gradmask.curvature.lanczos import default_max_iter, lanczos
from lightning_gradmask.curvature.operator import HessianOperator, LinearOperator
from lightning_gradmask.curvature.trace import estimate_trace

__all__ = ["STATS", "HessianStatistics", "hessian_statistics", "planned_matvecs"]

STATS = ("trace", "eigenvalues", "diagonal", "density")


@dataclass
class HessianStatistics:
    """Everything :func:`hessian_statistics` computed. Fields of statistics not asked for are ``None``.

    Attributes:
        dim: number of selected entries the Hessian acts on.
        loss: the (reduced) loss value the Hessian belongs to (``None`` for a bare operator).
        num_products: Hessian-vector products spent in this call; ``products`` splits it by statistic.
        exact: ``{statistic: True if computed exactly}``.
        trace, trace_stderr: the trace and its standard error (0 when exact).
        trace_per_parameter, trace_per_parameter_stderr: ``{name: trace of the parameter's block}``.
        eigenvalues: ``(top_k,)`` float64, algebraically largest first.
        eigenvalue_residuals: ``(top_k,)`` Lanczos residual norms (0 when exact): each eigenvalue is
            within this distance of a true one.
        eigenvalue_error_bounds: ``(top_k,)`` the usual sharper estimate ``min(r, r**2 / gap)``.
        eigenvectors: ``(dim, top_k)`` Lanczos Ritz vectors with ``return_eigenvectors=True`` (``None``
            on the exact path): pass ``eigenvectors.sum(1)`` as ``lanczos_v0`` to warm-start the next call.
        diagonal: ``{name: float64 tensor of the parameter's shape}``, NaN outside the mask.
        diagonal_stderr: same layout, per-entry standard error (``None`` when exact).
        diagonal_methods: ``{name: "layerwise" | "piecewise" | "products" | "exact" | "xtrace" | "hutchinson"}``.
        density_grid, density: broadened spectral density (integrates to ~1).
        density_nodes, density_weights: raw quadrature (``(runs, steps)``), or the exact spectrum
            (one row, weights ``1/dim``).
        density_sigma: broadening width used.
        notes: human-readable remarks (e.g. why a diagonal fell back to the slow path).
    """

    dim: int
    loss: float | None = None
    num_products: int = 0
    products: dict[str, int] = field(default_factory=dict)
    exact: dict[str, bool] = field(default_factory=dict)
    trace: float | None = None
    trace_stderr: float | None = None
    trace_per_parameter: dict[str, float] | None = None
    trace_per_parameter_stderr: dict[str, float] | None = None
    trace_method: str | None = None
    eigenvalues: Tensor | None = None
    eigenvalue_residuals: Tensor | None = None
    eigenvalue_error_bounds: Tensor | None = None
    eigenvectors: Tensor | None = None
    diagonal: dict[str, Tensor] | None = None
    diagonal_stderr: dict[str, Tensor] | None = None
    diagonal_methods: dict[str, str] | None = None
    density_grid: Tensor | None = None
    density: Tensor | None = None
    density_nodes: Tensor | None = None
    density_weights: Tensor | None = None
    density_sigma: float | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def scalars(self, prefix: str = "hessian/", per_parameter: bool = True) -> dict[str, float]:
        """Flat ``{name: float}`` for a logger.

        Keys: ``trace``, ``trace_stderr``, ``eig_0`` ... ``eig_{k-1}``, ``trace/<param>`` (if
        ``per_parameter``), ``diag_mean/<param>`` (mean over selected entries) and ``products``.
        """
        out: dict[str, float] = {}
        if self.trace is not None:
            out[f"{prefix}trace"] = float(self.trace)
            out[f"{prefix}trace_stderr"] = float(self.trace_stderr or 0.0)
            if per_parameter and self.trace_per_parameter:
                for name, v in self.trace_per_parameter.items():
                    out[f"{prefix}trace/{name}"] = float(v)
        if self.eigenvalues is not None:
            for i, v in enumerate(self.eigenvalues.tolist()):
                out[f"{prefix}eig_{i}"] = float(v)
        if self.diagonal is not None and per_parameter:
            for name, d in self.diagonal.items():
                out[f"{prefix}diag_mean/{name}"] = float(torch.nanmean(d.to(torch.float64)))
        out[f"{prefix}products"] = float(self.num_products)
        return out


def _planned_products(
    stats: Sequence[str],
    trace_products: int,
    lanczos_max_iter: int,
    diagonal_products: int,
    density_runs: int,
    density_steps: int,
) -> int:
    total = 0
    if "trace" in stats or "diagonal" in stats:
        total += max(trace_products, diagonal_products if "diagonal" in stats else 0)
    if "eigenvalues" in stats:
        total += lanczos_max_iter
    if "density" in stats:
        total += density_runs * density_steps
    return total


def planned_matvecs(
    dim: int,
    stats: Sequence[str] = ("trace", "eigenvalues"),
    *,
    top_k: int = 1,
    budget: int | None = None,
    trace_products: int = 100,
    lanczos_max_iter: int | None = None,
    diagonal_products: int = 100,
    density_runs: int = 4,
    density_steps: int = 40,
    **others: object,
) -> int:
    """The most Hessian-vector products :func:`hessian_statistics` plans for these arguments.

    ``dim`` when the exact path is taken, otherwise the sum of each statistic's budget (Lanczos may
    stop earlier; the layerwise exact diagonal of Linear layers is counted as ``trace_products``).
    Other keyword arguments of :func:`hessian_statistics` are accepted and ignored, so the same
    ``**kwargs`` can be passed to both. Example: ``planned_matvecs(op.dim, ("trace",), trace_products=40)``.
    """
    max_iter = lanczos_max_iter if lanczos_max_iter is not None else min(dim, max(2 * top_k + 40, 60))
    planned = _planned_products(stats, trace_products, max_iter, diagonal_products, density_runs, density_steps)
    limit = planned if budget is None else budget
    return dim if dim <= limit else planned


def hessian_statistics(
    operator: LinearOperator,
    stats: Sequence[str] = ("trace", "eigenvalues"),
    *,
    top_k: int = 1,
    budget: int | None = None,
    seed: int = 0,
    trace_products: int = 100,
    trace_method: Literal["auto", "adaptive", "xtrace", "xtrace-rademacher", "hutchinson", "hutch++"] = "auto",
    lanczos_max_iter: int | None = None,
    lanczos_tol: float = 1e-4,
    diagonal: Literal["auto", "exact", "estimate"] = "auto",
    diagonal_budget: int = 2048,
    diagonal_products: int = 100,
    density_runs: int = 4,
    density_steps: int = 40,
    density_grid_size: int = 256,
    density_sigma: float | None = None,
    lanczos_v0: Tensor | None = None,
    return_eigenvectors: bool = False,
) -> HessianStatistics:
    """Compute the requested Hessian statistics, exactly whenever that is affordable.

    Args:
        operator: a :class:`HessianOperator` (or any :class:`LinearOperator`).
        stats: any of ``"trace"`` (with per-parameter traces), ``"eigenvalues"`` (the ``top_k``
            algebraically largest), ``"diagonal"``, ``"density"``.
        top_k: number of top eigenvalues.
        budget: if ``operator.dim <= budget`` the full Hessian is built with ``dim`` products and
            every statistic is exact. Default: the number of products the estimates would spend,
            so exact is chosen whenever it is not more expensive.
        seed: one ``int``; every random draw derives from it (give the same value on every rank).
        trace_products: products for the trace estimate (the diagonal estimate shares them).
        trace_method: ``"auto"`` (default): on a :class:`HessianOperator`, the exact diagonal of
            every parameter the layerwise or piecewise rule of :func:`exact_diagonal` accepts (cheap: about ``out_features`` products
            w.r.t. the layer output), the remaining parameters exactly by one-hot products if they
            have at most ``trace_products`` entries (``diagonal_budget`` when the diagonal is
            wanted), and otherwise estimated with ``trace_products`` products restricted to them
            (``estimate_trace(..., method="auto")``). ``trace_method`` then reads ``"exact"`` or
            ``"exact+adaptive:hutchinson"`` etc. Any explicit method of :func:`estimate_trace`
            estimates the whole trace with that method instead.
        lanczos_max_iter: see :func:`lanczos` (``max_iter``; default there).
        lanczos_tol: see :func:`lanczos` (``tol``).
        diagonal: ``"auto"`` (exact where the rules above make it affordable, estimated
            elsewhere), ``"exact"`` (exact everywhere, one product per entry outside Linear
            layers), ``"estimate"`` (stochastic everywhere, sharing the trace's products).
        diagonal_budget: most one-hot products to spend on the non-Linear rest of the diagonal.
        diagonal_products: products for a stochastic diagonal (shared with the trace).
        density_runs: see :func:`spectral_density` (``num_runs``).
        density_steps: see :func:`spectral_density` (``num_steps``).
        density_grid_size: see :func:`spectral_density` (``grid_size``).
        density_sigma: see :func:`spectral_density` (``sigma``).
        lanczos_v0: start vector for Lanczos (length ``dim``), e.g. the previous call's top
            eigenvectors summed: a warm start on a slowly changing Hessian needs fewer products.
            Ignored when its length is not ``dim`` or it is zero.
        return_eigenvectors: keep the Lanczos Ritz vectors in ``eigenvectors``.

    Returns:
        :class:`HessianStatistics`.

    The operator's ``reduce`` hook is applied to every product, so under DDP every rank computes the
    same numbers as long as ``seed`` is the same everywhere.

    Example::

        stats = hessian_statistics(op, ("trace", "eigenvalues", "diagonal", "density"), top_k=2, seed=0)
        stats.trace, stats.trace_stderr, stats.eigenvalues, stats.exact
    """
    unknown = set(stats) - set(STATS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {STATS}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError("seed must be an int (the same on every process)")
    dim = int(operator.dim)
    if top_k < 1 or top_k > dim:
        raise ValueError(f"top_k must be in [1, {dim}]")
    max_iter = lanczos_max_iter if lanczos_max_iter is not None else default_max_iter(dim, top_k)
    if budget is None:
        budget = _planned_products(stats, trace_products, max_iter, diagonal_products, density_runs, density_steps)
    res = HessianStatistics(dim=dim, loss=getattr(operator, "loss", None))
    start = operator.num_products
    names = list(getattr(operator, "names", ["all"]))
    sizes = list(getattr(operator, "sizes", [dim]))
    unflatten = getattr(operator, "unflatten", None)

    def per_param(flat: Tensor) -> dict[str, Tensor]:
        return unflatten(flat) if unflatten is not None else {"all": flat}

    if not stats:
        return res

    if dim <= budget:
        before = operator.num_products
        h = dense_hessian(operator)
        ex = exact_statistics(h)
        res.products["dense_hessian"] = operator.num_products - before
        if "trace" in stats:
            res.trace, res.trace_stderr, res.trace_method = ex.trace, 0.0, "exact"
            parts = torch.split(ex.diagonal, sizes)
            res.trace_per_parameter = {n: float(p.sum()) for n, p in zip(names, parts)}
            res.trace_per_parameter_stderr = dict.fromkeys(names, 0.0)
            res.exact["trace"] = True
        if "eigenvalues" in stats:
            res.eigenvalues = ex.eigenvalues[:top_k].clone()
            res.eigenvalue_residuals = torch.zeros(top_k, dtype=torch.float64)
            res.eigenvalue_error_bounds = torch.zeros(top_k, dtype=torch.float64)
            res.exact["eigenvalues"] = True
        if "diagonal" in stats:
            res.diagonal = per_param(ex.diagonal)
            res.diagonal_methods = dict.fromkeys(names, "exact")
            res.exact["diagonal"] = True
        if "density" in stats:
            nodes = ex.eigenvalues.cpu().unsqueeze(0)
            weights = torch.full_like(nodes, 1.0 / dim)
            grid, dens, sig = broaden(nodes, weights, grid_size=density_grid_size, sigma=density_sigma)
            res.density_grid, res.density, res.density_sigma = grid, dens, sig
            res.density_nodes, res.density_weights = nodes, weights
            res.exact["density"] = True
        res.num_products = operator.num_products - start
        return res

    if "eigenvalues" in stats:
        before = operator.num_products
        v0 = lanczos_v0
        if v0 is not None and (v0.numel() != dim or not bool(torch.isfinite(v0).all()) or float(v0.norm()) == 0.0):
            v0 = None
        lz = lanczos(
            operator,
            k=top_k,
            max_iter=max_iter,
            tol=lanczos_tol,
            seed=subseed(seed, 1),
            v0=v0,
            return_eigenvectors=return_eigenvectors,
        )
        res.eigenvectors = lz.eigenvectors
        res.eigenvalues, res.eigenvalue_residuals = lz.eigenvalues, lz.residuals
        res.eigenvalue_error_bounds = lz.error_bounds
        res.products["eigenvalues"] = operator.num_products - before
        res.exact["eigenvalues"] = False
        if not lz.converged:
            res.notes["eigenvalues"] = (
                f"Lanczos stopped at max_iter={max_iter} before reaching tol={lanczos_tol}; see eigenvalue_residuals"
            )

    if "trace" in stats or "diagonal" in stats:
        _trace_and_diagonal(
            operator,
            res,
            want_trace="trace" in stats,
            want_diagonal="diagonal" in stats,
            trace_products=trace_products,
            trace_method=trace_method,
            diagonal=diagonal,
            diagonal_budget=diagonal_budget,
            diagonal_products=diagonal_products,
            seed=subseed(seed, 2),
        )

    if "density" in stats:
        before = operator.num_products
        dens = spectral_density(  # type: ignore[assignment]  # dens is a SpectralDensity here
            operator,
            num_runs=density_runs,
            num_steps=density_steps,
            grid_size=density_grid_size,
            sigma=density_sigma,
            seed=subseed(seed, 3),
        )
        res.density_grid, res.density, res.density_sigma = dens.grid, dens.density, dens.sigma  # type: ignore[attr-defined]  # dens is a SpectralDensity here
        res.density_nodes, res.density_weights = dens.nodes, dens.weights  # type: ignore[attr-defined]  # dens is a SpectralDensity here
        res.products["density"] = operator.num_products - before
        res.exact["density"] = False

    res.num_products = operator.num_products - start
    return res


def _trace_and_diagonal(
    op: LinearOperator,
    res: HessianStatistics,
    *,
    want_trace: bool,
    want_diagonal: bool,
    trace_products: int,
    trace_method: str,
    diagonal: str,
    diagonal_budget: int,
    diagonal_products: int,
    seed: int,
) -> None:
    """Trace and/or diagonal: exact on every block where that is affordable, estimated on the rest.

    ``trace_method="auto"`` on a :class:`HessianOperator`: blocks the layerwise rule handles (Linear
    layers) get their exact diagonal; the remaining block is computed exactly by one-hot products
    if it has at most ``diagonal_budget`` entries (when the diagonal is wanted) or ``trace_products``
    entries (trace only), and otherwise estimated with ``trace_products`` products restricted to it.
    An explicit method (``"xtrace"``, ``"hutchinson"``, ``"hutch++"``) estimates everything with it.
    """
    if diagonal not in ("auto", "exact", "estimate"):
        raise ValueError(f"diagonal must be 'auto', 'exact' or 'estimate', got {diagonal!r}")
    names = list(getattr(op, "names", ["all"]))
    sizes = list(getattr(op, "sizes", [op.dim]))
    structured = isinstance(op, HessianOperator) and trace_method == "auto" and diagonal != "estimate"
    n_prod = max(trace_products, diagonal_products) if want_diagonal else trace_products
    before = op.num_products
    exact_diag: dict[str, Tensor] = {}
    methods: dict[str, str] = {}
    if structured:
        assert isinstance(op, HessianOperator)
        skip_slow = not (want_diagonal and diagonal == "exact")
        dres = exact_diagonal(op, skip_slow=skip_slow)
        for name, seg in op.split(dres.diagonal).items():
            if dres.methods[name] != "skipped":
                exact_diag[name] = seg
                methods[name] = dres.methods[name]
        for name, why in dres.notes.items():
            if name not in exact_diag:
                res.notes[f"diagonal/{name}"] = why
    rest = [n for n in names if n not in exact_diag]
    rest_dim = sum(size for n, size in zip(names, sizes) if n in rest)
    est = None
    if rest:
        limit = diagonal_budget if (want_diagonal and diagonal != "estimate") else trace_products
        if isinstance(op, HessianOperator) and structured and rest_dim <= limit:
            ks = [k for k, name in enumerate(op.names) if name in rest]
            flat = torch.cat([_diag_by_products(op, k) for k in ks])
            if op.reduce is not None:  # the one-hot products are local: one collective for all
                flat = op.reduce(flat)
            for k, seg in zip(ks, torch.split(flat, [op.sizes[k] for k in ks])):
                exact_diag[op.names[k]] = seg
                methods[op.names[k]] = "products"
            rest = []
        else:
            target = op.block(rest) if isinstance(op, HessianOperator) and len(rest) < len(names) else op
            method = "auto" if trace_method == "auto" else trace_method
            est = estimate_trace(target, n_prod, method=method, seed=seed, diagonal=want_diagonal)  # type: ignore[arg-type]
            res.trace_method = est.method if not exact_diag else f"exact+{est.method}"
    else:
        res.trace_method = "exact"
    exact_total = sum(float(d.sum()) for d in exact_diag.values())
    if want_trace:
        pp = {n: float(exact_diag[n].sum()) for n in names if n in exact_diag}
        pps = dict.fromkeys(pp, 0.0)
        trace, stderr = exact_total, 0.0
        if est is not None:
            pp.update(est.per_parameter)
            pps.update(est.per_parameter_stderr)
            trace += est.trace
            stderr = est.stderr
        res.trace, res.trace_stderr = trace, stderr
        res.trace_per_parameter = {n: pp[n] for n in names}
        res.trace_per_parameter_stderr = {n: pps[n] for n in names}
        res.exact["trace"] = est is None or est.exact
    if want_diagonal:
        flat_parts, se_parts = [], []
        est_parts = est_se = {}
        if est is not None:
            assert est.diagonal is not None and est.diagonal_stderr is not None
            est_parts = dict(zip(rest, torch.split(est.diagonal, [sizes[names.index(n)] for n in rest])))
            est_se = dict(zip(rest, torch.split(est.diagonal_stderr, [sizes[names.index(n)] for n in rest])))
            for n in rest:
                methods[n] = est.method
        for n in names:
            if n in exact_diag:
                flat_parts.append(exact_diag[n].to(torch.float64))
                se_parts.append(torch.zeros_like(flat_parts[-1]))
            else:
                flat_parts.append(est_parts[n].to(torch.float64))
                se_parts.append(est_se[n].to(torch.float64))
        flat = torch.cat(flat_parts)
        unflatten = getattr(op, "unflatten", None)
        res.diagonal = unflatten(flat) if unflatten is not None else {"all": flat}
        if est is not None:
            se = torch.cat(se_parts)
            res.diagonal_stderr = unflatten(se) if unflatten is not None else {"all": se}
        res.diagonal_methods = methods
        res.exact["diagonal"] = est is None or est.exact
    res.products["trace" if want_trace else "diagonal"] = op.num_products - before
