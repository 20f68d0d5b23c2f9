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

import torch
from torch import Tensor

from lightning_gradmask.curvature._random import subseed
from lightning_gradmask.curvature.density import SpectralDensity, broaden, spectral_density
from lightning_gradmask.curvature.diagonal import DiagonalResult, exact_diagonal, parameter_diagonal
from lightning_gradmask.curvature.exact import ExactStatistics, dense_hessian, exact_statistics
from lightning_gradmask.curvature.lanczos import LanczosResult, default_lanczos_matvecs, lanczos
from lightning_gradmask.curvature.operator import HessianOperator, LinearOperator
from lightning_gradmask.curvature.options import StatisticsOptions
from lightning_gradmask.curvature.trace import TraceEstimate, estimate_trace

__all__ = ["STATS", "HessianStatistics", "hessian_statistics", "planned_matvecs"]

STATS = ("trace", "eigenvalues", "diagonal", "density")


@dataclass
class HessianStatistics:
    """Everything :func:`hessian_statistics` computed: the results it is made of, ``None`` if not asked for.

    Attributes:
        dim: number of selected entries the Hessian acts on.
        loss: the (reduced) loss value the Hessian belongs to (``None`` for a bare operator).
        num_matvecs: Hessian-vector products spent in this call; ``matvecs`` splits it by statistic
            (``"dense_hessian"`` on the exact path, where the results below count 0 matvecs each).
        exact: ``{statistic: True if computed exactly}``.
        trace: a :class:`TraceEstimate` (``trace.trace``, ``trace.stderr``, ``trace.per_parameter``,
            ``trace.method``: ``"exact"``, ``"exact+adaptive:hutchinson"``, ...).
        eigen: a :class:`LanczosResult` for the ``top_k`` algebraically largest eigenvalues
            (``eigen.eigenvalues``, ``eigen.residuals``, ``eigen.error_bounds``, ``eigen.eigenvectors``
            with ``return_eigenvectors=True``: pass ``eigen.eigenvectors.sum(1)`` as ``lanczos_v0`` to
            warm-start the next call). On the exact path ``alphas`` holds the whole spectrum,
            ``residuals`` are 0 and ``stop_reason`` is ``"exhausted"``.
        diagonal: a :class:`DiagonalResult` (``diagonal.per_parameter[name]`` has the parameter's
            shape, NaN outside the mask; ``diagonal.methods[name]`` says how it was found).
        density: a :class:`SpectralDensity` (``density.grid``, ``density.density``, the raw
            quadrature in ``nodes``/``weights``; on the exact path the spectrum, weights ``1/dim``).
        notes: human-readable remarks (e.g. why a diagonal fell back to the slow path).
    """

    dim: int
    loss: float | None = None
    num_matvecs: int = 0
    matvecs: dict[str, int] = field(default_factory=dict)
    exact: dict[str, bool] = field(default_factory=dict)
    trace: TraceEstimate | None = None
    eigen: LanczosResult | None = None
    diagonal: DiagonalResult | None = None
    density: SpectralDensity | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def scalars(self, prefix: str = "hessian/", per_parameter: bool = False) -> dict[str, float]:
        """The logged scalars, flat ``{key: float}`` (what ``HessianMonitor`` logs, minus its timings).

        Keys: ``trace``, ``trace_stderr``, ``trace/<param>`` (with ``per_parameter``),
        ``eigenvalue_1`` ... ``eigenvalue_k`` and ``matvecs``.
        """
        out: dict[str, float] = {}
        if self.trace is not None:
            out[f"{prefix}trace"] = float(self.trace.trace)
            out[f"{prefix}trace_stderr"] = float(self.trace.stderr)
            if per_parameter:
                for name, value in self.trace.per_parameter.items():
                    out[f"{prefix}trace/{name}"] = float(value)
        if self.eigen is not None:
            for index, value in enumerate(self.eigen.eigenvalues.tolist(), start=1):
                out[f"{prefix}eigenvalue_{index}"] = float(value)
        out[f"{prefix}matvecs"] = float(self.num_matvecs)
        return out


def _planned(stats: Sequence[str], trace_matvecs: int, lanczos_matvecs: int, options: StatisticsOptions) -> int:
    total = 0
    if "trace" in stats or "diagonal" in stats:
        total += max(trace_matvecs, options.diagonal_matvecs if "diagonal" in stats else 0)
    if "eigenvalues" in stats:
        total += lanczos_matvecs
    if "density" in stats:
        total += options.density_runs * options.density_matvecs_per_run
    return total


def planned_matvecs(
    dim: int,
    stats: Sequence[str] = ("trace", "eigenvalues"),
    *,
    top_k: int = 1,
    exact_up_to: int | None = None,
    trace_matvecs: int = 100,
    options: StatisticsOptions | None = None,
) -> int:
    """The most matvecs :func:`hessian_statistics` plans for these arguments (no matvec is run).

    ``dim`` when the exact path is taken, otherwise the sum of each statistic's ``num_matvecs``
    (Lanczos may stop earlier; the layerwise exact diagonal of Linear layers is counted as
    ``trace_matvecs``). Example: ``planned_matvecs(op.dim, ("trace",), trace_matvecs=40)``.
    """
    options = options or StatisticsOptions()
    planned = _planned(stats, trace_matvecs, _lanczos_matvecs(dim, top_k, options), options)
    limit = planned if exact_up_to is None else exact_up_to
    return dim if dim <= limit else planned


def _lanczos_matvecs(dim: int, top_k: int, options: StatisticsOptions) -> int:
    return options.lanczos_matvecs if options.lanczos_matvecs is not None else default_lanczos_matvecs(dim, top_k)


def hessian_statistics(
    operator: LinearOperator,
    stats: Sequence[str] = ("trace", "eigenvalues"),
    *,
    top_k: int = 1,
    exact_up_to: int | None = None,
    trace_matvecs: int = 100,
    seed: int = 0,
    options: StatisticsOptions | None = None,
    lanczos_v0: Tensor | None = None,
    return_eigenvectors: bool = False,
) -> HessianStatistics:
    """Compute the requested Hessian statistics, exactly whenever that is affordable.

    Args:
        operator: a :class:`HessianOperator` (or any :class:`LinearOperator`).
        stats: any of ``"trace"`` (with per-parameter traces), ``"eigenvalues"`` (the ``top_k``
            algebraically largest), ``"diagonal"``, ``"density"``.
        top_k: number of top eigenvalues.
        exact_up_to: if ``operator.dim <= exact_up_to`` the full Hessian is built with ``dim``
            matvecs and every statistic is exact. Default: the number of matvecs the estimates
            would spend, so exact is chosen whenever it is not more expensive.
        trace_matvecs: matvecs for the trace estimate (the diagonal estimate shares them); see
            :attr:`StatisticsOptions.trace_method` for what is computed exactly instead.
        seed: one ``int``; every random draw derives from it (give the same value on every rank).
        options: the finer estimator options (:class:`StatisticsOptions`; default: its defaults).
        lanczos_v0: start vector for Lanczos (length ``dim``), e.g. the previous call's top
            eigenvectors summed: a warm start on a slowly changing Hessian needs fewer matvecs.
            Ignored when its length is not ``dim`` or it is zero.
        return_eigenvectors: keep the Lanczos Ritz vectors in ``eigen.eigenvectors``.

    Returns:
        :class:`HessianStatistics`.

    The operator's ``reduce`` hook is applied to every product, so under DDP every rank computes the
    same numbers as long as ``seed`` is the same everywhere.

    Example::

        stats = hessian_statistics(op, ("trace", "eigenvalues", "diagonal", "density"), top_k=2, seed=0)
        stats.trace.trace, stats.trace.stderr, stats.eigen.eigenvalues, stats.exact
    """
    options = options or StatisticsOptions()
    _check_request(operator, stats, top_k, seed, options)
    dim = int(operator.dim)
    lanczos_matvecs = _lanczos_matvecs(dim, top_k, options)
    if exact_up_to is None:
        exact_up_to = _planned(stats, trace_matvecs, lanczos_matvecs, options)
    res = HessianStatistics(dim=dim, loss=getattr(operator, "loss", None))
    start = operator.num_matvecs
    if not stats:
        return res
    if dim <= exact_up_to:
        _exact_path(operator, res, stats, top_k, options)
    else:
        if "eigenvalues" in stats:
            _top_eigenvalues(operator, res, top_k, lanczos_matvecs, seed, options, lanczos_v0, return_eigenvectors)
        if "trace" in stats or "diagonal" in stats:
            _trace_and_diagonal(
                operator,
                res,
                want_trace="trace" in stats,
                want_diagonal="diagonal" in stats,
                trace_matvecs=trace_matvecs,
                options=options,
                seed=subseed(seed, 2),
            )
        if "density" in stats:
            _density(operator, res, seed, options)
    res.num_matvecs = operator.num_matvecs - start
    return res


def _check_request(
    operator: LinearOperator, stats: Sequence[str], top_k: int, seed: int, options: StatisticsOptions
) -> None:
    unknown = set(stats) - set(STATS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {STATS}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError("seed must be an int (the same on every process)")
    if top_k < 1 or top_k > int(operator.dim):
        raise ValueError(f"top_k must be in [1, {int(operator.dim)}]")
    if not isinstance(options, StatisticsOptions):
        raise TypeError(f"options must be a StatisticsOptions, got {type(options).__name__}")


# ---------------------------------------------------------------------- the exact path
def _exact_path(
    operator: LinearOperator, res: HessianStatistics, stats: Sequence[str], top_k: int, options: StatisticsOptions
) -> None:
    """Every statistic from the dense Hessian (``dim`` matvecs, counted under ``"dense_hessian"``)."""
    before = operator.num_matvecs
    ex = exact_statistics(dense_hessian(operator))
    res.matvecs["dense_hessian"] = operator.num_matvecs - before
    if "trace" in stats:
        res.trace = _exact_trace(operator, ex)
    if "eigenvalues" in stats:
        res.eigen = _exact_eigen(ex, top_k)
    if "diagonal" in stats:
        res.diagonal = DiagonalResult(
            diagonal=ex.diagonal,
            stderr=None,
            per_parameter=operator.unflatten(ex.diagonal),
            methods=dict.fromkeys(operator.names, "exact"),
            num_matvecs=0,
            exact=True,
        )
    if "density" in stats:
        res.density = _exact_density(ex, res.dim, options)
    res.exact.update(dict.fromkeys(stats, True))


def _exact_trace(operator: LinearOperator, ex: ExactStatistics) -> TraceEstimate:
    parts = torch.split(ex.diagonal, list(operator.sizes))
    return TraceEstimate(
        trace=ex.trace,
        stderr=0.0,
        per_parameter={n: float(p.sum()) for n, p in zip(operator.names, parts)},
        per_parameter_stderr=dict.fromkeys(operator.names, 0.0),
        num_matvecs=0,
        method="exact",
        samples=torch.tensor([ex.trace], dtype=torch.float64),
        exact=True,
    )


def _exact_eigen(ex: ExactStatistics, top_k: int) -> LanczosResult:
    spectrum = ex.eigenvalues.cpu()
    zeros = torch.zeros(top_k, dtype=torch.float64)
    return LanczosResult(
        eigenvalues=ex.eigenvalues[:top_k].clone(),
        eigenvectors=None,
        residuals=zeros,
        error_bounds=zeros.clone(),
        alphas=spectrum.clone(),  # T = diag(spectrum): the exact "tridiagonal" matrix
        betas=torch.zeros(max(spectrum.numel() - 1, 0), dtype=torch.float64),
        num_matvecs=0,
        converged=True,
        stop_reason="exhausted",
    )


def _exact_density(ex: ExactStatistics, dim: int, options: StatisticsOptions) -> SpectralDensity:
    nodes = ex.eigenvalues.cpu().unsqueeze(0)
    weights = torch.full_like(nodes, 1.0 / dim)
    grid, density, sigma = broaden(nodes, weights, grid_size=options.density_grid_size, sigma=options.density_sigma)
    return SpectralDensity(grid, density, nodes, weights, sigma, num_matvecs=0, exact=True)


# ---------------------------------------------------------------------- estimates
def _top_eigenvalues(
    operator: LinearOperator,
    res: HessianStatistics,
    top_k: int,
    lanczos_matvecs: int,
    seed: int,
    options: StatisticsOptions,
    lanczos_v0: Tensor | None,
    return_eigenvectors: bool,
) -> None:
    v0 = lanczos_v0
    if v0 is not None and (v0.numel() != res.dim or not bool(torch.isfinite(v0).all()) or float(v0.norm()) == 0.0):
        v0 = None
    res.eigen = lanczos(
        operator,
        k=top_k,
        num_matvecs=lanczos_matvecs,
        tol=options.lanczos_tol,
        seed=subseed(seed, 1),
        v0=v0,
        return_eigenvectors=return_eigenvectors,
    )
    res.matvecs["eigenvalues"] = res.eigen.num_matvecs
    res.exact["eigenvalues"] = False
    if not res.eigen.converged:
        res.notes["eigenvalues"] = (
            f"Lanczos stopped at lanczos_matvecs={lanczos_matvecs} before reaching "
            f"lanczos_tol={options.lanczos_tol}; see eigen.residuals"
        )


def _density(operator: LinearOperator, res: HessianStatistics, seed: int, options: StatisticsOptions) -> None:
    res.density = spectral_density(
        operator,
        num_runs=options.density_runs,
        matvecs_per_run=options.density_matvecs_per_run,
        grid_size=options.density_grid_size,
        sigma=options.density_sigma,
        seed=subseed(seed, 3),
    )
    res.matvecs["density"] = res.density.num_matvecs
    res.exact["density"] = False


# ---------------------------------------------------------------------- trace and diagonal
@dataclass
class _Blocks:
    """Per-parameter diagonals found exactly, and the estimate of the remaining parameters."""

    exact: dict[str, Tensor] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    rest: list[str] = field(default_factory=list)
    estimate: TraceEstimate | None = None


def _trace_and_diagonal(
    op: LinearOperator,
    res: HessianStatistics,
    *,
    want_trace: bool,
    want_diagonal: bool,
    trace_matvecs: int,
    options: StatisticsOptions,
    seed: int,
) -> None:
    """Trace and/or diagonal: exact on every block where that is affordable, estimated on the rest.

    ``trace_method="auto"`` on a :class:`HessianOperator`: blocks the layerwise or piecewise rule
    handles get their exact diagonal; the remaining block is computed exactly by one-hot matvecs if
    it has at most ``exact_diagonal_up_to`` entries (when the diagonal is wanted) or
    ``trace_matvecs`` entries (trace only), and otherwise estimated with ``trace_matvecs`` matvecs
    restricted to it. An explicit method (``"xtrace"``, ``"hutchinson"``, ...) estimates everything.
    """
    before = op.num_matvecs
    structured = isinstance(op, HessianOperator) and options.trace_method == "auto" and options.diagonal != "estimate"
    blocks = _Blocks(rest=list(op.names))
    if structured:
        assert isinstance(op, HessianOperator)
        _fast_exact_blocks(op, blocks, res, skip_slow=not (want_diagonal and options.diagonal == "exact"))
        limit = options.exact_diagonal_up_to if want_diagonal else trace_matvecs
        rest_dim = sum(size for n, size in zip(op.names, op.sizes) if n in blocks.rest)
        if blocks.rest and rest_dim <= limit:
            _one_hot_blocks(op, blocks)
    if blocks.rest:
        matvecs = max(trace_matvecs, options.diagonal_matvecs) if want_diagonal else trace_matvecs
        target = op.block(blocks.rest) if isinstance(op, HessianOperator) and len(blocks.rest) < len(op.names) else op
        blocks.estimate = estimate_trace(
            target, matvecs, method=options.trace_method, seed=seed, diagonal=want_diagonal
        )
    spent = op.num_matvecs - before
    if want_trace:
        res.trace = _combined_trace(op, blocks, spent)
        res.exact["trace"] = res.trace.exact
    if want_diagonal:
        res.diagonal = _combined_diagonal(op, blocks, spent)
        res.exact["diagonal"] = res.diagonal.exact
    res.matvecs["trace" if want_trace else "diagonal"] = spent


def _fast_exact_blocks(op: HessianOperator, blocks: _Blocks, res: HessianStatistics, skip_slow: bool) -> None:
    """The parameters :func:`exact_diagonal`'s fast rules handle (all of them unless ``skip_slow``)."""
    found = exact_diagonal(op, skip_slow=skip_slow)
    for name, part in op.split(found.diagonal).items():
        if found.methods[name] != "skipped":
            blocks.exact[name] = part
            blocks.methods[name] = found.methods[name]
    for name, why in found.notes.items():
        if name not in blocks.exact:
            res.notes[f"diagonal/{name}"] = why
    blocks.rest = [n for n in op.names if n not in blocks.exact]


def _one_hot_blocks(op: HessianOperator, blocks: _Blocks) -> None:
    """The remaining parameters exactly, one matvec per entry (local; one ``reduce`` for all)."""
    ks = [k for k, name in enumerate(op.names) if name in blocks.rest]
    flat = torch.cat([parameter_diagonal(op, k) for k in ks])
    if op.reduce is not None:
        flat = op.reduce(flat)
    for k, part in zip(ks, torch.split(flat, [op.sizes[k] for k in ks])):
        blocks.exact[op.names[k]] = part
        blocks.methods[op.names[k]] = "products"
    blocks.rest = []


def _combined_trace(op: LinearOperator, blocks: _Blocks, spent: int) -> TraceEstimate:
    est = blocks.estimate
    exact_total = sum(float(d.sum()) for d in blocks.exact.values())
    per_parameter = {n: float(d.sum()) for n, d in blocks.exact.items()}
    per_parameter_stderr = dict.fromkeys(per_parameter, 0.0)
    if est is None:
        method, trace, stderr, samples = "exact", exact_total, 0.0, torch.tensor([exact_total], dtype=torch.float64)
    else:
        per_parameter.update(est.per_parameter)
        per_parameter_stderr.update(est.per_parameter_stderr)
        method = est.method if not blocks.exact else f"exact+{est.method}"
        trace, stderr, samples = exact_total + est.trace, est.stderr, est.samples + exact_total
    return TraceEstimate(
        trace=trace,
        stderr=stderr,
        per_parameter={n: per_parameter[n] for n in op.names},
        per_parameter_stderr={n: per_parameter_stderr[n] for n in op.names},
        num_matvecs=spent,
        method=method,
        samples=samples,
        exact=est is None or est.exact,
        extra=dict(est.extra) if est is not None else {},
    )


def _combined_diagonal(op: LinearOperator, blocks: _Blocks, spent: int) -> DiagonalResult:
    est = blocks.estimate
    estimated: dict[str, Tensor] = {}
    estimated_stderr: dict[str, Tensor] = {}
    methods = dict(blocks.methods)
    if est is not None:
        assert est.diagonal is not None and est.diagonal_stderr is not None
        sizes = [op.sizes[op.names.index(n)] for n in blocks.rest]
        estimated = dict(zip(blocks.rest, torch.split(est.diagonal, sizes)))
        estimated_stderr = dict(zip(blocks.rest, torch.split(est.diagonal_stderr, sizes)))
        methods.update(dict.fromkeys(blocks.rest, est.method))
    parts, stderr_parts = [], []
    for name in op.names:
        if name in blocks.exact:
            parts.append(blocks.exact[name].to(torch.float64))
            stderr_parts.append(torch.zeros_like(parts[-1]))
        else:
            parts.append(estimated[name].to(torch.float64))
            stderr_parts.append(estimated_stderr[name].to(torch.float64))
    flat = torch.cat(parts)
    return DiagonalResult(
        diagonal=flat,
        stderr=torch.cat(stderr_parts) if est is not None else None,
        per_parameter=op.unflatten(flat),
        methods={n: methods[n] for n in op.names},
        num_matvecs=spent,
        exact=est is None or est.exact,
    )
