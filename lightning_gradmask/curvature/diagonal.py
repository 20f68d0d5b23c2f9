"""The Hessian diagonal: exact, or estimated from random probes.

Exact (:func:`exact_diagonal`), three paths chosen per parameter, tried in this order:

* ``"piecewise"`` for every parameter in which the network output is piecewise linear
  (convolutions, linear layers, BatchNorm in eval mode, anything followed only by ReLU,
  max-pooling, residual additions and linear maps): there the diagonal equals the generalized
  Gauss-Newton diagonal, computed exactly from the ``C`` eigenvectors of each sample's output
  Hessian (``C`` outputs per sample): for ``F.linear`` (one row per sample) and ``conv2d`` calls
  from factors at the layer output (one batched backward pass for all of them, then a product with
  the input or its unfolded patches), for any other parameter from ``C`` per-sample gradient passes;
  every assumption is checked, see :mod:`lightning_gradmask.curvature.piecewise`.
* ``"layerwise"`` for the weight and bias of every remaining linear map ``y = x W^T + b`` computed
  with ``torch.nn.functional.linear``: ``nn.Linear`` layers followed by a smooth nonlinearity, and
  inside ``nn.MultiheadAttention`` the packed query/key/value projection and the output projection
  (so every linear map of a transformer block). For ``y = x W^T + b`` the loss depends on ``W`` only
  through ``y``, linearly, so ``d2L/dW_ij^2 = sum_{r,r'} x_rj x_r'j d2L/dy_ri dy_r'i``. Rows ``r`` of
  ``y`` (samples, tokens) fall into groups that never interact downstream (every row alone in an
  MLP; the tokens of one sequence in a transformer); with ``S`` rows per group, ``S *
  out_features`` products with the Hessian w.r.t. ``y`` (all groups at once) give the diagonal
  exactly; ``out_features`` where the tokens meet only linearly after the layer (a transformer's
  output projection and feed-forward layers: the model output's Gauss-Newton part, of rank ``C``
  per sample, is subtracted and every row stands alone). LayerNorm weights and biases (``y = x *
  weight + bias`` of the normalized input) take the same rule. Each layer is checked on its own
  (call count, gradient rebuilt from ``(x, dL/dy)``, the grouping tested with
  ``ceil(log2(groups))`` products); see :mod:`lightning_gradmask.curvature.layerwise`.
  The per-layer path decisions of both rules are combined across processes with ``reduce``.
* ``"products"`` (fallback, any module, e.g. LayerNorm over several dimensions, embeddings,
  convolutions followed by tanh, or a layer whose checks failed): one matvec per selected entry,
  ``d(dL/dp[j]) / dp`` restricted to the parameter itself, keeping entry ``j`` (the textbook recipe), vmapped in chunks where that is
  faster (timed on the spot). :attr:`DiagonalResult.methods` and :attr:`DiagonalResult.notes` say
  which path each parameter took and why, :attr:`DiagonalResult.groupings` which row grouping.

Estimated (:func:`estimate_diagonal`): XDiag-style (the XTrace products, deflated) or Hutchinson
``mean(v * Hv)``, with a per-entry standard error. The per-entry error is about
``sqrt(sum_{j != i} H_ij^2 / m)``; on the benchmark MLPs the off-diagonal mass is so large that the
estimate is noise at 100 matvecs (figures in ``benchmarks/README.md``). Prefer the exact
diagonal wherever the layerwise path applies (it was also faster than 100 products).

Example::

    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    res = exact_diagonal(op)
    res.per_parameter["0.weight"]   # tensor of the weight's shape
    res.methods                     # {"0.weight": "layerwise", ...}
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lightning_gradmask.curvature._random import Seed, as_generator
from lightning_gradmask.curvature.layerwise import LayerwiseOutcome, layerwise_cost, layerwise_diagonal
from lightning_gradmask.curvature.operator import HessianOperator, LinearOperator
from lightning_gradmask.curvature.piecewise import PiecewiseOutcome, piecewise_cost, piecewise_diagonal
from lightning_gradmask.curvature.trace import estimate_trace

__all__ = ["DiagonalResult", "estimate_diagonal", "exact_diagonal", "exact_diagonal_cost", "parameter_diagonal"]


@dataclass
class DiagonalResult:
    """A Hessian diagonal, flat over the operator's selected entries.

    Attributes:
        diagonal: ``(dim,)`` float64.
        stderr: per-entry standard error (``None`` when exact).
        per_parameter: ``{name: tensor of the parameter's shape}``, NaN outside the mask.
        methods: ``{name: "layerwise" | "piecewise" | "products" | "xtrace" | "hutchinson" | ...}``.
        notes: ``{name: why the fast path was not taken}``.
        num_matvecs: Hessian-vector products spent (including the row-independence checks and the
            products with the Hessian w.r.t. layer outputs).
        exact: ``True`` for :func:`exact_diagonal`.
        notes: ``{name: why the fast path was not taken}``.
        groupings: ``{name: row grouping of the layerwise rule}``: ``"rows"`` (rows independent),
            ``"strided GxS"`` / ``"contiguous GxS"`` (``G`` independent groups of ``S`` rows, e.g.
            the tokens of each sequence in an attention projection), ``"rows + Gauss-Newton per
            sample, contiguous GxS"`` (every row alone once the model output's Gauss-Newton part,
            rank ``C`` per sample, is subtracted: a transformer's layers after attention).
    """

    diagonal: Tensor
    stderr: Tensor | None
    per_parameter: dict[str, Tensor]
    methods: dict[str, str]
    num_matvecs: int
    exact: bool
    notes: dict[str, str] = field(default_factory=dict)
    groupings: dict[str, str] = field(default_factory=dict)


def _owner_notes(op: HessianOperator, covered: set[int]) -> dict[str, str]:
    """Why each parameter outside ``covered`` has no layerwise rule."""
    owners: dict[int, str] = {}
    if op.module is not None:
        for mod in op.module.modules():
            for _, p in mod.named_parameters(recurse=False):
                owners.setdefault(id(p), type(mod).__name__)
    notes = {}
    for k, (name, param) in enumerate(zip(op.names, op.params)):
        if k not in covered:
            owner = owners.get(id(param))
            where = f"owned by {owner}, " if owner else ""
            notes[name] = (
                f"{where}not the weight or bias of a linear map (F.linear) or of F.layer_norm over the "
                "last dimension: no layerwise rule"
            )
    return notes


def exact_diagonal_cost(op: HessianOperator) -> int:
    """Upper bound on the matvecs :func:`exact_diagonal` spends (no matvec is run).

    Runs the first closure once (forward only) to find the linear layers and the model output.
    The piecewise rule costs ``2 C + ceil(log2 N)`` matvecs per closure with the output Hessian
    (``N`` samples, ``C`` outputs each); layerwise parameters cost ``out_features`` matvecs with
    the layer-output Hessian per layer and closure, times the rows per group (1 for an MLP, a
    layer whose tokens meet only linearly afterwards, up to the sequence length for attention
    projections), plus the grouping checks and ``2 C`` for the Gauss-Newton factors; every other
    selected entry costs one matvec.
    """
    cost, covered = layerwise_cost(op)
    return cost + piecewise_cost(op) + sum(size for k, size in enumerate(op.sizes) if k not in covered)


def exact_diagonal(
    op: HessianOperator,
    *,
    method: Literal["auto", "products"] = "auto",
    chunk_size: int = 16,
    skip_slow: bool = False,
) -> DiagonalResult:
    """The exact Hessian diagonal over the operator's selected entries.

    Args:
        op: a :class:`HessianOperator` (built with ``from_module`` for the piecewise rule, which
            evaluates the module itself; the layerwise rule needs no module).
        method: ``"auto"`` (piecewise where its checks pass, then layerwise where its checks pass,
            products elsewhere) or ``"products"`` (one product per entry everywhere: the slow
            reference).
        chunk_size: output columns per vmapped product in the layerwise path (capped so that the
            probes of one chunk take at most 256 MiB). 16 was the fastest choice measured on an
            MLP, a CNN head and a transformer block (figures in ``benchmarks/README.md``).
        skip_slow: leave out the parameters the layerwise and piecewise rules cannot handle (their
            entries are NaN and their method ``"skipped"``) instead of spending one product per
            entry on them.

    The result is reduced with ``op.reduce`` once (plus one reduce of the decision flags per fast
    rule that ran, so every rank takes the same path).

    Example::

        res = exact_diagonal(op)
        torch.testing.assert_close(res.diagonal, torch.diagonal(dense_hessian(op)))
    """
    start = op.num_matvecs
    everything = list(range(len(op.names)))
    piecewise = piecewise_diagonal(op, everything) if method == "auto" else PiecewiseOutcome()
    rest = {k for k in everything if k not in piecewise.parts}
    outcome = layerwise_diagonal(op, chunk_size, rest) if method == "auto" and rest else LayerwiseOutcome()
    diag_parts = {**piecewise.parts, **outcome.parts}
    notes = _owner_notes(op, set(diag_parts) | {op.names.index(n) for n in outcome.notes})
    notes.update(outcome.notes)
    for name, why in piecewise.notes.items():
        notes[name] = f"{notes[name]}; {why}" if name in notes else why
    if method != "auto":
        notes = {}
    methods: dict[str, str] = {}
    for k, name in enumerate(op.names):
        if k in outcome.parts:
            methods[name] = "layerwise"
        elif k in piecewise.parts:
            methods[name] = "piecewise"
        elif skip_slow:
            methods[name] = "skipped"
            diag_parts[k] = torch.full((op.sizes[k],), float("nan"), dtype=torch.float64, device=op.device)
        else:
            methods[name] = "products"
            diag_parts[k] = parameter_diagonal(op, k)
    flat = torch.cat([diag_parts[k].to(torch.float64) for k in range(len(op.names))])
    if op.reduce is not None:
        flat = op.reduce(flat)
    op.num_matvecs += outcome.num_matvecs + piecewise.num_matvecs
    return DiagonalResult(
        diagonal=flat,
        stderr=None,
        per_parameter=op.unflatten(flat),
        methods=methods,
        num_matvecs=op.num_matvecs - start,
        exact=True,
        notes={n: v for n, v in notes.items() if methods.get(n) == "products" or methods.get(n) == "skipped"},
        groupings={n: g for n, g in outcome.groupings.items() if methods.get(n) == "layerwise"},
    )


def parameter_diagonal(op: HessianOperator, k: int, chunk_size: int = 8) -> Tensor:
    """Diagonal of parameter ``k``'s selected block by one-hot matvecs (local, not reduced).

    Each matvec is ``d(g_k[j]) / d p_k`` only (the textbook per-entry recipe, restricted to the
    parameter itself), batched ``chunk_size`` entries at a time with ``is_grads_batched`` where the
    graph supports it and it is faster (timed on the first two chunks); entry by entry otherwise.
    Counts one matvec per selected entry.
    """
    size = op.sizes[k]
    p = op.params[k]
    out = torch.zeros(size, dtype=torch.float64, device=op.device)
    op.num_matvecs += size
    gradient = op.gradient(k)
    if gradient is None:  # the gradient of p_k has no graph: the loss is linear in p_k
        return out
    g = gradient.reshape(-1)
    idx = op.entry_indices(k)
    entries = torch.arange(p.numel(), device=p.device) if idx is None else idx
    # Batched (vmapped) backward is faster for some graphs (Linear) and slower for others
    # (convolutions): time one chunk each way, keep the faster.
    per_entry: dict[bool, float] = {}
    with torch.inference_mode(False), torch.enable_grad():
        for chunk_no, c0 in enumerate(range(0, size, chunk_size)):
            sel = entries[c0 : c0 + chunk_size]
            if chunk_no < 2:
                use_batched = chunk_no == 0
            else:
                use_batched = per_entry.get(True, math.inf) < per_entry.get(False, math.inf)
            t0 = time.perf_counter()
            h = _entries_batched(g, p, sel) if use_batched else None
            if h is None:
                h = _entries_one_by_one(g, p, sel)
                use_batched = False
            if chunk_no < 2:
                per_entry[use_batched] = (time.perf_counter() - t0) / sel.numel()
            out[c0 : c0 + sel.numel()] = h.to(torch.float64)
    return out


def _entries_batched(g: Tensor, p: Tensor, sel: Tensor) -> Tensor | None:
    """``d g[j] / d p[j]`` for the entries ``sel`` in one vmapped backward; ``None`` if the graph refuses."""
    rows = torch.arange(sel.numel(), device=p.device)
    onehot = torch.zeros(sel.numel(), p.numel(), dtype=g.dtype, device=p.device)
    onehot[rows, sel] = 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (h,) = torch.autograd.grad(
                g,
                p,
                grad_outputs=onehot,
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
                materialize_grads=True,
            )
    except RuntimeError:
        return None
    return h.reshape(sel.numel(), -1)[rows, sel]


def _entries_one_by_one(g: Tensor, p: Tensor, sel: Tensor) -> Tensor:
    """``d g[j] / d p[j]`` for the entries ``sel``, one backward each."""
    return torch.stack(
        [
            torch.autograd.grad(g[j], p, retain_graph=True, allow_unused=True, materialize_grads=True)[0].reshape(-1)[j]
            for j in sel.tolist()
        ]
    )


def estimate_diagonal(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    method: Literal["auto", "adaptive", "xtrace", "xtrace-rademacher", "hutchinson", "hutch++"] = "auto",
    seed: Seed = 0,
) -> DiagonalResult:
    """Stochastic diagonal estimate with a per-entry standard error.

    ``"xtrace"`` deflates the top of the spectrum exactly (the XDiag idea) and estimates the rest;
    ``"hutchinson"`` is ``mean(v * Hv)`` over Rademacher probes. Per-entry standard errors are
    computed like the trace's; both are rough at 100 products (see the benchmark for measured
    relative L2 errors).

    Example::

        est = estimate_diagonal(op, 100, seed=0)
        est.per_parameter["0.weight"], est.stderr
    """
    est = estimate_trace(op, num_matvecs, method=method, seed=as_generator(seed), diagonal=True)
    assert est.diagonal is not None
    return DiagonalResult(
        diagonal=est.diagonal,
        stderr=est.diagonal_stderr,
        per_parameter=op.unflatten(est.diagonal),
        methods=dict.fromkeys(op.names, est.method),
        num_matvecs=est.num_matvecs,
        exact=est.exact,
    )
