"""The exact Hessian diagonal of every linear map ``y = x W^T + b`` (and LayerNorm), one layer at a time.

The loss depends on ``W`` only through ``y``, linearly, so with ``H_i[r', r] = d2L / dy_r'i dy_ri``::

    d2L/dW_ij^2 = sum_{r, r'} x_rj x_r'j H_i[r', r]          d2L/db_i^2 = sum_{r, r'} H_i[r', r]

Which rows ``r`` of ``y`` (samples, tokens) the rest of the network couples decides the cost.
Rows fall into *groups* that never interact (``H_i[r', r] = 0`` across groups): every row alone
(an MLP, a transformer's feed-forward layers, a head), or one group per sample whose tokens
interact (the query/key/value and output projections of attention). With groups of ``S`` rows, row
``r`` at position ``c`` in its group, one product with the Hessian w.r.t. ``y`` per output column
``i`` and position ``c`` (all groups at once) gives ``H_i[r', partner_c(r')]`` for every row
``r'``, where ``partner_c(r')`` is the row at position ``c`` in the group of ``r'``: ``S *
out_features`` products in all, each a backward pass from ``y`` only.

Where the tokens of a sample meet only linearly after the layer (a mean before the head) and every
map in between acts token by token (a transformer's output projection and feed-forward layers),
``H_y`` is a per-row part plus a Gauss-Newton part of rank ``C`` per sample (``C`` model outputs
per sample), known in factored form from the model output (:mod:`._gauss_newton`). With that part
subtracted every row stands alone: ``out_features`` products instead of ``S * out_features``
(grouping ``"rows + Gauss-Newton per sample, ..."``), plus ``2 C`` per closure for the factors.

``F.layer_norm`` over the last dimension is the map ``y = x * weight + bias`` of the normalized
input ``x``: the same rule with ``d2L/dw_i^2 = sum_{r, r'} x_ri x_r'i H_i[r', r]``.

Nothing is assumed, everything is checked, per layer:

* the layer is found by its weight: every call of ``torch.nn.functional.linear`` (what
  ``nn.Linear`` and ``nn.MultiheadAttention`` use) or ``F.layer_norm`` (``nn.LayerNorm``) whose
  weight or bias is a selected parameter is recorded while the closure runs; a weight used in
  more than one call takes the generic path;
* the gradient rebuilt from ``(x, dL/dy)`` must equal autograd's gradient of the parameter
  (catches weights used elsewhere, tied weights, penalties inside the loss);
* the grouping is tested with ``ceil(log2(groups))`` products: random vectors supported on the
  rows whose group index has bit ``k`` clear must map to 0 (to 1e-6 relative) on the other rows.
  Candidate groupings, cheapest first: every row alone, then groups of ``S`` consecutive or
  strided rows for each batch-like size ``G`` seen among the recorded leading dimensions. A
  grouping with more positions per group than the layer has inputs is not cheaper than one
  product per entry and is not used. Between every row alone and the groups of rows, the
  Gauss-Newton split is tried (when it pays) for each grouping with one group per model-output
  sample: ``H_y - G`` must couple no two rows, ``ceil(log2(rows))`` products
  (:func:`._gauss_newton.residual_decoupled`). Nothing about the network is assumed: ``G`` is a
  matrix whose products and diagonal share are computed exactly, whatever it is.

The calls are recorded by a :class:`torch.overrides.TorchFunctionMode` that is active only while the
closures run, in the calling thread only (nothing global is replaced). It sees every call of
``F.linear``, including those inside the Python functions of ``torch.nn.functional`` such as
``multi_head_attention_forward``; a linear map written by hand (``x @ W.T + b``) is not seen and
fails the gradient check, so its parameters take the generic path.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_gradmask.curvature._gauss_newton import LowRankPart, OutputFactors, residual_decoupled
from lightning_gradmask.curvature._output_hessian import (
    Grouping,
    ModelCall,
    batched_grad,
    capture_model_calls,
    close,
    decoupled,
)
from lightning_gradmask.curvature.operator import HessianOperator

__all__ = ["LayerwiseOutcome", "layerwise_diagonal", "linear_layers"]

_PROBE_BYTES = 256 * 2**20  # probes (and their products) held at once: chunk_size is capped by this


@dataclass
class _Call:
    """One recorded ``F.linear`` call."""

    x: Tensor  # (rows, in) float64 input
    y: Tensor  # the output, with its graph
    lead: tuple[int, ...]  # leading shape of x / y


@dataclass
class _Layer:
    """A weight (or a bias without a selected weight) and the op indices it owns."""

    weight_index: int | None
    bias_index: int | None
    out_features: int
    in_features: int
    lead: tuple[int, ...] = ()  # leading shape of the input at the first recorded call
    elementwise: bool = False  # LayerNorm: y = x * weight + bias with x the normalized input
    calls: list[_Call] = field(default_factory=list)

    @property
    def indices(self) -> list[int]:
        return [k for k in (self.weight_index, self.bias_index) if k is not None]


@dataclass
class LayerwiseOutcome:
    """What :func:`layerwise_diagonal` computed.

    Attributes:
        parts: ``{op index: flat diagonal of the selected entries}`` (local, not reduced).
        notes: ``{parameter name: why the layerwise rule was not used}``.
        groupings: ``{parameter name: the row grouping used}`` (``"rows"``, ``"contiguous G x S"``, ...).
        num_matvecs: products with layer-output Hessians spent (checks included).
    """

    parts: dict[int, Tensor] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    groupings: dict[str, str] = field(default_factory=dict)
    num_matvecs: int = 0


# ------------------------------------------------------------------------------------ recording


class _LinearCalls(TorchFunctionMode):
    """While active (in this thread): ``on_call(input, weight, bias, output, elementwise)`` for every
    ``F.linear`` call, and for every ``F.layer_norm`` call over the last dimension with the
    normalized input as ``input`` and ``elementwise=True`` (``y = input * weight + bias``).

    ``on_call`` returns what the caller gets. Python functions of
    ``torch.nn.functional`` (``multi_head_attention_forward``) dispatch to the mode once, on entry,
    and would then run with the mode off; they are run with it on, so their own ``F.linear`` calls
    are seen too.
    """

    def __init__(self, on_call: Callable[[Tensor, Tensor | None, Tensor | None, Tensor, bool], Tensor]) -> None:
        super().__init__()
        self.on_call = on_call

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            input, weight, bias = _linear_arguments(*args, **kwargs)
            return self.on_call(input, weight, bias, func(*args, **kwargs), False)
        if func is F.layer_norm:
            return self._layer_norm(func(*args, **kwargs), *_layer_norm_arguments(*args, **kwargs))
        if _SKIP_NEXT is not None and inspect.isfunction(func) and func.__module__ == F.__name__:
            with self:  # the function's own dispatch on entry is skipped once, then its body runs under the mode
                _SKIP_NEXT(True)
                try:
                    return func(*args, **kwargs)
                finally:
                    _SKIP_NEXT(False)
        return func(*args, **kwargs)


    def _layer_norm(
        self, out: Tensor, input: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        if len(shape) != 1 or input.ndim < 2 or (weight is None and bias is None):
            return out
        normalized = F.layer_norm(input.detach(), shape, None, None, eps)
        return self.on_call(normalized, weight, bias, out, True)


_SKIP_NEXT: Callable[[bool], None] | None = getattr(torch._C, "_set_skip_next_torch_function", None)
"""Skips the next ``__torch_function__`` dispatch of this thread (without it: attention projections
are not seen and take the generic path, correct but slower)."""


def _linear_arguments(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    return input, weight, bias


def _layer_norm_arguments(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, tuple[int, ...], Tensor | None, Tensor | None, float]:
    return input, tuple(normalized_shape), weight, bias, eps


def _recording(layers: dict[int, _Layer], by_param: dict[int, int]) -> _LinearCalls:
    """Record every ``F.linear`` (and ``F.layer_norm``) call whose weight or bias is one of the watched parameters."""

    def record(input: Tensor, weight: Tensor | None, bias: Tensor | None, out: Tensor, elementwise: bool) -> Tensor:
        key = by_param.get(id(weight), -1) if weight is not None else -1
        if key < 0 and bias is not None:
            key = by_param.get(id(bias), -1)
        if key < 0:
            return out
        x = input.detach()
        lead = tuple(x.shape[:-1])
        layers[key].calls.append(_Call(x.reshape(-1, x.shape[-1]).to(torch.float64, copy=True), out, lead))
        return out.clone()  # in-place ops downstream must not touch the recorded output

    return _LinearCalls(record)


def linear_layers(
    op: HessianOperator, indices: set[int] | None = None, model_calls: list[ModelCall] | None = None
) -> tuple[dict[int, _Layer], dict[int, int]]:
    """Candidate layers from one forward of the first closure: ``{key: layer}``, ``{id(param): key}``.

    The key of a layer is its weight's op index (or its bias's when the weight is not selected);
    only the op parameters ``indices`` (default: all) are considered. The calls of ``op.module``
    are appended to ``model_calls`` when given.
    """
    index_of = {id(p): k for k, p in enumerate(op.params) if indices is None or k in indices}
    seen: list[tuple[Tensor | None, Tensor | None, tuple[int, ...], int, int, bool]] = []

    def spy(input: Tensor, weight: Tensor | None, bias: Tensor | None, out: Tensor, elementwise: bool) -> Tensor:
        if any(t is not None and id(t) in index_of for t in (weight, bias)):
            features = int(out.shape[-1]), int(input.shape[-1])
            seen.append((weight, bias, tuple(input.shape[:-1]), *features, elementwise))
        return out

    capture = (
        capture_model_calls(op.module, model_calls)
        if op.module is not None and model_calls is not None
        else contextlib.nullcontext()
    )
    with _LinearCalls(spy), capture, op.autograd_context():
        op.evaluate_loss(0)
    layers: dict[int, _Layer] = {}
    by_param: dict[int, int] = {}
    for weight, bias, lead, out_features, in_features, elementwise in seen:
        w_k = index_of.get(id(weight)) if weight is not None else None
        b_k = index_of.get(id(bias)) if bias is not None else None
        key = w_k if w_k is not None else b_k
        assert key is not None
        if key in layers:
            continue
        layers[key] = _Layer(w_k, b_k, out_features, in_features, lead, elementwise)
        for k in layers[key].indices:
            by_param.setdefault(id(op.params[k]), key)
    return layers, by_param


# ------------------------------------------------------------------------------------ groupings


def _groupings(rows: int, sizes: set[int], in_features: int) -> list[Grouping]:
    """Candidate groupings of ``rows`` rows, cheapest (fewest rows per group) first."""
    out = [Grouping("rows", torch.arange(rows), torch.zeros(rows, dtype=torch.long), rows, 1)]
    r = torch.arange(rows)
    for groups in sorted((g for g in sizes if 1 < g < rows and rows % g == 0), reverse=True):
        size = rows // groups
        if size > in_features:
            continue
        out.append(Grouping(f"contiguous {groups}x{size}", r // size, r % size, groups, size))
        out.append(Grouping(f"strided {groups}x{size}", r % groups, r // groups, groups, size))
    return out


def _batch_like_sizes(layers: dict[int, _Layer]) -> set[int]:
    return {d for layer in layers.values() for call in layer.calls for d in call.lead}


# ------------------------------------------------------------------------------------ the rule


def _columns_hessian(g: Tensor, y: Tensor, rows_c: Tensor, c0: int, c1: int) -> Tensor:
    """``h[i, r'] = sum_{r in rows_c} H[(r', c0+i), (r, c0+i)]`` for the columns ``c0 <= i < c1``."""
    out = y.shape[-1]
    rows = y.numel() // out
    idx = torch.arange(c1 - c0, device=y.device)
    probe = torch.zeros(c1 - c0, rows, out, dtype=y.dtype, device=y.device)
    probe[idx.unsqueeze(1), rows_c.to(y.device).unsqueeze(0), (c0 + idx).unsqueeze(1)] = 1.0
    h = batched_grad(g, y, probe.reshape(c1 - c0, *y.shape)).reshape(c1 - c0, -1, out)
    return h[idx, :, c0 + idx].to(torch.float64)


def _layer_diagonal(
    g: Tensor, y: Tensor, x: Tensor, grouping: Grouping, chunk_size: int, elementwise: bool
) -> tuple[Tensor, Tensor, int]:
    """``(diag of W, diag of b, products)`` for one call, given a valid grouping.

    ``elementwise``: ``y = x * weight + bias`` (LayerNorm, ``x`` normalized), the weight a vector.
    """
    out = y.shape[-1]
    diag_w = torch.zeros(out, *(() if elementwise else (x.shape[1],)), dtype=torch.float64, device=x.device)
    diag_b = torch.zeros(out, dtype=torch.float64, device=x.device)
    chunk_size = max(1, min(chunk_size, _PROBE_BYTES // max(1, y.numel() * y.element_size())))
    for c in range(grouping.size):
        rows_c = (grouping.position == c).nonzero().squeeze(1)
        paired = x * x[grouping.partner(c).to(x.device)]
        for c0 in range(0, out, chunk_size):
            c1 = min(out, c0 + chunk_size)
            h = _columns_hessian(g, y, rows_c, c0, c1).to(x.device)
            diag_w[c0:c1] += (h * paired[:, c0:c1].T).sum(dim=1) if elementwise else h @ paired
            diag_b[c0:c1] += h.sum(dim=1)
    return diag_w, diag_b, grouping.size * out


def _low_rank_layer_diagonal(
    g: Tensor, y: Tensor, x: Tensor, part: LowRankPart, chunk_size: int, elementwise: bool
) -> tuple[Tensor, Tensor, int]:
    """``(diag of W, diag of b, products)`` for one call whose ``H_y - G`` couples no two rows."""
    out = y.shape[-1]
    diag_w, diag_b = part.layer_terms(x, elementwise)
    low_rank_columns = part.column_products()  # (out, rows)
    every_row = torch.arange(x.shape[0])
    squares = x.square()
    chunk_size = max(1, min(chunk_size, _PROBE_BYTES // max(1, y.numel() * y.element_size())))
    for c0 in range(0, out, chunk_size):
        c1 = min(out, c0 + chunk_size)
        residual = _columns_hessian(g, y, every_row, c0, c1).to(x.device) - low_rank_columns[c0:c1].to(x.device)
        diag_w[c0:c1] += (residual * squares[:, c0:c1].T).sum(dim=1) if elementwise else residual @ squares
        diag_b[c0:c1] += residual.sum(dim=1)
    return diag_w, diag_b, out


def _gradient_matches(layer: _Layer, call: _Call, gy: Tensor, grads: Mapping[int, Tensor | None]) -> bool:
    gy2 = gy.detach().reshape(-1, gy.shape[-1]).to(torch.float64)

    def weight_gradient() -> Tensor:
        return (gy2 * call.x).sum(dim=0) if layer.elementwise else gy2.T @ call.x

    for k, rebuilt in ((layer.weight_index, weight_gradient), (layer.bias_index, lambda: gy2.sum(dim=0))):
        if k is None:
            continue
        gp = grads.get(k)
        if gp is None or not close(rebuilt().reshape(-1), gp.detach().reshape(-1).to(torch.float64)):
            return False
    return True


# ------------------------------------------------------------------------------------ driver


class _Pass:
    """State of one :func:`layerwise_diagonal` run: per-layer accumulators and failure notes."""

    def __init__(self, op: HessianOperator, layers: dict[int, _Layer]) -> None:
        self.op, self.layers = op, layers
        self.ok = dict.fromkeys(layers, True)
        self.acc_w: dict[int, Tensor] = {}
        self.acc_b: dict[int, Tensor] = {}
        self.outcome = LayerwiseOutcome()

    def fail(self, key: int, why: str) -> None:
        if self.ok[key]:
            self.ok[key] = False
            for k in self.layers[key].indices:
                self.outcome.notes[self.op.names[k]] = why

    def add(self, key: int, diag_w: Tensor, diag_b: Tensor, scale: float) -> None:
        self.acc_w[key] = self.acc_w.get(key, 0.0) + scale * diag_w
        self.acc_b[key] = self.acc_b.get(key, 0.0) + scale * diag_b


def _run_closure(run: _Pass, fn_index: int, by_param: dict[int, int]) -> tuple[Tensor, Tensor | None]:
    """The loss, and the model output when ``op.module`` was called exactly once (else ``None``)."""
    op = run.op
    for layer in run.layers.values():
        layer.calls = []
    calls: list[ModelCall] = []
    capture = capture_model_calls(op.module, calls) if op.module is not None else contextlib.nullcontext()
    with _recording(run.layers, by_param), capture, op.autograd_context():
        loss = op.evaluate_loss(fn_index)
    for key, layer in run.layers.items():
        if len(layer.calls) != 1:
            run.fail(key, f"layer called {len(layer.calls)} times in one loss evaluation (needs exactly 1)")
    f = calls[0].output if len(calls) == 1 and calls[0].output.ndim > 0 else None
    return loss, f


def _one_closure(run: _Pass, fn_index: int, by_param: dict[int, int], chunk_size: int) -> None:
    op = run.op
    loss, f = _run_closure(run, fn_index, by_param)
    used = [key for key in run.layers if run.ok[key]]
    if not used:
        return
    ys = [run.layers[key].calls[0].y for key in used]
    params = sorted({k for key in used for k in run.layers[key].indices})
    outputs = [f] if f is not None and f.requires_grad else []
    with op.autograd_context():
        grads = torch.autograd.grad(
            loss, ys + [op.params[k] for k in params] + outputs, create_graph=True, allow_unused=True
        )
    gys = dict(zip(used, grads[: len(ys)]))
    grad_of = dict(zip(params, grads[len(ys) : len(ys) + len(params)]))
    g_f = grads[-1] if outputs else None
    factors = None
    if f is not None and g_f is not None and g_f.requires_grad:
        factors = OutputFactors(f, g_f, {key: run.layers[key].calls[0].y for key in used})
    sizes = _batch_like_sizes(run.layers)
    gen = torch.Generator().manual_seed(12345 + fn_index)
    for key in used:
        _one_layer(run, key, gys[key], grad_of, sizes, gen, chunk_size, factors)
    if factors is not None:
        run.outcome.num_matvecs += factors.num_matvecs


def _one_layer(
    run: _Pass,
    key: int,
    gy: Tensor | None,
    grad_of: Mapping[int, Tensor | None],
    sizes: set[int],
    gen: torch.Generator,
    chunk_size: int,
    factors: OutputFactors | None,
) -> None:
    layer = run.layers[key]
    call = layer.calls[0]
    if gy is None:
        run.fail(key, "layer output or parameter does not reach the loss")
        return
    if not _gradient_matches(layer, call, gy, grad_of):
        run.fail(
            key,
            "gradient does not match the layer decomposition (parameter used elsewhere, or a penalty on it inside the loss)",
        )
        return
    shape = (layer.out_features,) if layer.elementwise else (layer.out_features, layer.in_features)
    zero_w = torch.zeros(shape, dtype=torch.float64, device=call.x.device)
    zero_b = torch.zeros(layer.out_features, dtype=torch.float64, device=call.x.device)
    if not gy.requires_grad:  # the loss is linear in y: no second derivative
        run.add(key, zero_w, zero_b, 1.0)
        return
    with run.op.autograd_context():
        found = _first_valid_grouping(run, key, gy, sizes, gen, factors)
        if found is None:
            run.fail(
                key,
                "rows of the layer output are coupled downstream in no grouping that is cheaper than "
                "one product per entry (e.g. train-mode BatchNorm, a batch-level loss)",
            )
            return
        if isinstance(found, LowRankPart):
            diag_w, diag_b, spent = _low_rank_layer_diagonal(gy, call.y, call.x, found, chunk_size, layer.elementwise)
            name = f"rows + Gauss-Newton per sample, {found.samples.name}"
        else:
            diag_w, diag_b, spent = _layer_diagonal(gy, call.y, call.x, found, chunk_size, layer.elementwise)
            name = found.name
    run.outcome.num_matvecs += spent
    for k in layer.indices:
        run.outcome.groupings[run.op.names[k]] = name
    run.add(key, diag_w, diag_b, 1.0)


def _first_valid_grouping(
    run: _Pass, key: int, gy: Tensor, sizes: set[int], gen: torch.Generator, factors: OutputFactors | None
) -> Grouping | LowRankPart | None:
    """The cheapest valid way to split the rows: every row alone; every row alone once the model
    output's Gauss-Newton part is subtracted (see :mod:`._gauss_newton`); groups of rows."""
    layer = run.layers[key]
    call = layer.calls[0]
    candidates = _groupings(call.x.shape[0], sizes, layer.in_features)
    for n, grouping in enumerate(candidates):
        ok, spent = decoupled(gy, call.y, grouping, gen)
        run.outcome.num_matvecs += spent
        if ok:
            return grouping
        if n == 0 and factors is not None and factors.covers(key):
            for samples in _sample_groupings(candidates, factors, layer.out_features):
                part = factors.part(key, samples)
                ok, spent = residual_decoupled(gy, call.y, part, gen)
                run.outcome.num_matvecs += spent
                if ok:
                    return part
    return None


def _sample_groupings(candidates: list[Grouping], factors: OutputFactors, out_features: int) -> list[Grouping]:
    """Groupings with one group per sample of the model output, where subtracting ``G`` pays.

    Subtracting ``G`` costs ``2 C`` products per closure (``C`` outputs per sample) and saves
    ``(size - 1) * out_features`` per layer.
    """
    samples = int(factors.f.shape[0])
    return [
        g for g in candidates if g.groups == samples and g.size > 1 and 2 * factors.outputs < (g.size - 1) * out_features
    ]


def layerwise_diagonal(op: HessianOperator, chunk_size: int = 16, indices: set[int] | None = None) -> LayerwiseOutcome:
    """The exact diagonal of every selected linear-map weight and bias whose checks pass.

    Only the op parameters ``indices`` (default: all) are considered. Returns local (not reduced)
    diagonals; the caller agrees on the path across processes and reduces. Parameters without a
    layerwise rule are simply absent from ``parts``.
    """
    layers, by_param = linear_layers(op, indices)
    run = _Pass(op, layers)
    if not layers:
        return run.outcome
    for fn_index in range(len(op.loss_fns)):
        _one_closure(run, fn_index, by_param, chunk_size)
    _agree_across_processes(run)
    for key, layer in layers.items():
        if not run.ok[key]:
            continue
        if key not in run.acc_w:
            run.fail(key, "layer not used by any loss evaluation")
            continue
        for k, full in ((layer.weight_index, run.acc_w[key]), (layer.bias_index, run.acc_b[key])):
            if k is not None:
                run.outcome.parts[k] = op.select_entries(k, full)
    return run.outcome


def _agree_across_processes(run: _Pass) -> None:
    """One collective so that every process takes the same path for every layer."""
    keys = list(run.layers)
    flags = torch.tensor([1.0 if run.ok[key] else 0.0 for key in keys], dtype=torch.float64, device=run.op.device)
    if run.op.reduce is not None:
        flags = run.op.reduce(flags)
    for j, key in enumerate(keys):
        if float(flags[j]) < 1.0 - 1e-9:
            run.fail(key, "fast path not applicable on another process")


def layerwise_cost(op: HessianOperator) -> tuple[int, set[int]]:
    """Upper bound on the matvecs :func:`layerwise_diagonal` spends, and the op indices it covers.

    Runs the first closure once (a forward pass, no product) to find the linear layers; assumes
    the most expensive candidate grouping and every check run in full, including those of the
    Gauss-Newton split (``2 C`` products per closure for ``C`` model outputs per sample, and
    ``ceil(log2(rows))`` per layer and grouping tried).
    """
    calls: list[ModelCall] = []
    layers, _ = linear_layers(op, model_calls=calls)
    covered = {k for layer in layers.values() for k in layer.indices}
    sizes = {d for layer in layers.values() for d in layer.lead}
    outputs = int(calls[0].output[0].numel()) if len(calls) == 1 and calls[0].output.ndim > 0 else None
    per_closure = 2 * outputs if outputs is not None else 0
    for layer in layers.values():
        rows = math.prod(layer.lead)
        candidates = _groupings(rows, sizes, layer.in_features)
        checks = sum(math.ceil(math.log2(c.groups)) if c.groups > 1 else 0 for c in candidates)
        if outputs is not None:
            checks += (len(candidates) - 1) * (math.ceil(math.log2(rows)) if rows > 1 else 0)
        per_closure += checks + layer.out_features * max(c.size for c in candidates)
    return per_closure * len(op.loss_fns), covered
