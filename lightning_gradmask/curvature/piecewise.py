"""The exact Hessian diagonal of parameters in which the network is piecewise linear.

For a loss ``L = l(f(theta))`` of the network output ``f``, the Hessian splits into the
generalized Gauss-Newton part and a residual::

    H = J^T H_f J + sum_k (dL/df_k) d2f_k/dtheta2

If ``f`` is (piecewise) linear in a parameter tensor ``P`` -- convolutions, linear layers,
BatchNorm in eval mode, ReLU, max-pooling, residual additions, flattening, in any arrangement where
``P`` enters once -- the residual's ``P`` block vanishes (almost everywhere) and the diagonal of
``H`` equals that of ``J^T H_f J``::

    diag(H_PP) = sum_n sum_c lambda_nc (J_n^T u_nc)^2

with ``H_f``'s per-sample ``C x C`` blocks ``sum_c lambda_nc u_nc u_nc^T``. That takes ``C``
products for the blocks and the per-sample gradients of the pseudo-losses ``u_nc . f_n``: for the
weight and bias of an ``F.linear`` call with one row per sample or of a ``conv2d`` call, from the
factors ``J^T u_c`` at the layer output (one batched backward pass through the closure's graph for
all such layers, then a product with the input or its unfolded patches,
:mod:`lightning_gradmask.curvature._factor_layers`; what BackPACK's ``DiagHessian`` does); for any
other parameter (BatchNorm, a weight used twice, ``padding="same"``) from ``C`` per-sample
gradient passes (``torch.func.vmap``). The cost of a few backward passes, not one product per entry.
Linear maps applied to several rows (tokens) per sample are left to the layerwise rule.

Everything it relies on is checked, or the parameter takes the generic path:

* the model is in eval mode (nothing is re-run in training mode, so no running statistics move);
* the root module is called once per closure, with the batch along dimension 0 of every tensor
  argument, and evaluated one sample at a time (``vmap``) it reproduces the batch output (fails for
  train-mode BatchNorm and anything else that couples samples);
* the loss depends on the selected parameters only through the output (gradient rebuilt from
  ``dL/df`` equals autograd's; fails for weight penalties inside the loss);
* ``H_f`` has no entry across samples (``ceil(log2(N))`` products);
* per parameter tensor, ``d2/dt2 f(P + t v) = 0`` for a random direction ``v`` (forward-over-forward
  mode, exact zero for piecewise-linear paths; fails for tanh, sigmoid, GELU, LayerNorm, a weight
  used twice in sequence);
* for the factor path: the parameter appears in exactly one ``F.linear`` / ``conv2d`` call, and its
  gradient rebuilt from that call's input and ``dL/dy`` equals autograd's (a weight also used
  elsewhere takes the per-sample path).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from lightning_gradmask.curvature._factor_layers import FactorLayer, FactorLayers
from lightning_gradmask.curvature._output_hessian import (
    Grouping,
    ModelCall,
    backward_batched,
    capture_model_calls,
    close,
    decoupled,
    output_hessian_blocks,
)
from lightning_gradmask.curvature._random import gaussian
from lightning_gradmask.curvature.operator import HessianOperator

__all__ = ["PiecewiseOutcome", "piecewise_cost", "piecewise_diagonal"]

_LINEARITY_TOL = 1e-6
_REPRODUCE_TOL = 1e-5
_CHECK_SAMPLES = 8  # the structural checks (per-sample evaluation, linearity) run on this many samples


@dataclass
class PiecewiseOutcome:
    """What :func:`piecewise_diagonal` computed: local diagonals by op index, notes, products."""

    parts: dict[int, Tensor] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    num_matvecs: int = 0


class _Model:
    """The root module as a function of the selected parameters, per batch and per sample."""

    def __init__(self, module: nn.Module, names: list[str], call: ModelCall) -> None:
        self.module, self.names, self.call = module, names, call
        self.batch = int(call.output.shape[0])
        self.in_dims = tuple(0 if self._batched(a) else None for a in call.args)

    def _batched(self, a: Any) -> bool:
        return isinstance(a, Tensor) and a.ndim > 0 and a.shape[0] == self.batch

    def _with_args(self, args: tuple[Any, ...], batch: int) -> _Model:
        other = _Model.__new__(_Model)
        other.module, other.names, other.in_dims, other.batch = self.module, self.names, self.in_dims, batch
        other.call = ModelCall(args, self.call.kwargs, self.call.output)
        return other

    def subset(self, n: int) -> _Model:
        """The same model on the first ``n`` samples."""
        n = min(n, self.batch)
        return self._with_args(tuple(a[:n] if d == 0 else a for a, d in zip(self.call.args, self.in_dims)), n)

    def batch_output(self, params: dict[str, Tensor]) -> Tensor:
        return functional_call(self.module, params, self.call.args, self.call.kwargs, strict=False)

    def sample_output(self, params: dict[str, Tensor], *sample: Any) -> Tensor:
        args = tuple(a.unsqueeze(0) if d == 0 else a for a, d in zip(sample, self.in_dims))
        return functional_call(self.module, params, args, self.call.kwargs, strict=False).squeeze(0)

    def per_sample_outputs(self, params: dict[str, Tensor]) -> Tensor:
        return vmap(self.sample_output, in_dims=(None, *self.in_dims))(params, *self.call.args)

    def per_sample_grads(self, params: dict[str, Tensor], u: Tensor) -> dict[str, Tensor]:
        """``d(u_nj . f_n) / dparams`` for every sample ``n`` and cotangent ``j`` (``u``: ``(N, J, C)``).

        One forward per sample (vmapped), then ``J`` backward passes through it (vmapped too).
        """

        def one_sample(p: dict[str, Tensor], u_n: Tensor, *sample: Any) -> dict[str, Tensor]:
            pullback = vjp(lambda q: self.sample_output(q, *sample).reshape(-1), p)[1]
            return vmap(lambda cot: pullback(cot)[0])(u_n)

        return vmap(one_sample, in_dims=(None, 0, *self.in_dims))(params, u, *self.call.args)


def _linear_in(model: _Model, params: dict[str, Tensor], name: str, gen: torch.Generator) -> bool:
    """Whether the output is linear in ``params[name]`` along a random direction (2nd derivative 0)."""
    p = params[name]
    v = gaussian(tuple(p.shape), gen, p.dtype, p.device)
    v = v * (float(p.norm()) / max(float(v.norm()), 1e-300) if float(p.norm()) > 0 else 1.0)

    def along(q: Tensor) -> Tensor:
        return model.batch_output({**params, name: q})

    def first(q: Tensor) -> Tensor:
        return jvp(along, (q,), (v,))[1]

    d1, d2 = jvp(first, (p,), (v,))[:2]
    return float(d2.detach().abs().max()) <= _LINEARITY_TOL * max(float(d1.detach().abs().max()), 1e-30)


class _Run:
    def __init__(self, op: HessianOperator, indices: list[int]) -> None:
        self.op, self.indices = op, list(indices)
        self.outcome = PiecewiseOutcome()
        self.acc: dict[int, Tensor] = {}

    def fail_all(self, why: str) -> None:
        for k in self.indices:
            self.outcome.notes[self.op.names[k]] = why
        self.indices = []

    def fail(self, k: int, why: str) -> None:
        self.outcome.notes[self.op.names[k]] = why
        self.indices.remove(k)


def _one_closure(run: _Run, fn_index: int, gen: torch.Generator) -> None:
    op = run.op
    assert op.module is not None
    calls: list[ModelCall] = []
    recorded = FactorLayers({id(op.params[k]) for k in run.indices})
    with capture_model_calls(op.module, calls), recorded, op.autograd_context():
        loss = op.evaluate_loss(fn_index)
    if len(calls) != 1:
        return run.fail_all(f"the model was called {len(calls)} times in one loss evaluation (needs exactly 1)")
    with op.autograd_context():
        if any(m.training for m in op.module.modules()):
            # train-mode BatchNorm couples the samples (and re-running it would move its statistics)
            return run.fail_all("the model is in training mode (samples coupled, e.g. train-mode BatchNorm)")
        for k in list(run.indices):
            if id(op.params[k]) in recorded.token_maps:
                run.fail(k, "a linear map applied to several rows (tokens) per sample: left to the layerwise rule")
        index_of = {id(op.params[k]): k for k in run.indices}
        layers = recorded.owned(index_of, int(calls[0].output.shape[0]))
        _accumulate(run, loss, _Model(op.module, [op.names[k] for k in run.indices], calls[0]), gen, layers)


_Layer = tuple[FactorLayer, int | None, int | None]  # a recorded linear or conv2d call, its weight's and bias's op index


def _accumulate(run: _Run, loss: Tensor, model: _Model, gen: torch.Generator, layers: list[_Layer]) -> None:
    op = run.op
    f = model.call.output
    params = {op.names[k]: op.params[k] for k in run.indices}
    detached = {n: p.detach() for n, p in params.items()}
    # the checks override only the parameter under test: the others stay the module's own (they
    # require grad, which keeps modules such as nn.TransformerEncoderLayer off their fused inference paths)
    if not _reproduces(model.subset(_CHECK_SAMPLES), {}, f[:_CHECK_SAMPLES]):
        return run.fail_all("evaluated one sample at a time the model does not reproduce its batch output "
                            "(samples coupled, e.g. train-mode BatchNorm)")
    ys = [call.y for call, _, _ in layers]
    grads = torch.autograd.grad(loss, [f, *ys, *params.values()], create_graph=True, allow_unused=True)
    g_f, g_ys, g_params = grads[0], grads[1 : 1 + len(ys)], grads[1 + len(ys) :]
    if g_f is None or not g_f.requires_grad:
        return run.fail_all("the loss does not depend on the model output twice-differentiably")
    want_of = dict(zip(list(params), g_params))
    matched = [(layer, gy) for layer, gy in zip(layers, g_ys) if _factor_gradient_matches(run, layer, gy, want_of)]
    layers = [layer for layer, _ in matched]
    in_layers = {k for _, w_k, b_k in layers for k in (w_k, b_k) if k is not None}
    # Every other parameter: its gradient rebuilt through the output alone. (The factor layers are
    # checked the same way, on dL/dy, inside the batched backward pass of _ggn_diagonal.)
    others = [k for k in run.indices if k not in in_layers]
    if others:
        rebuilt = torch.autograd.grad(f, [op.params[k] for k in others], grad_outputs=g_f.detach(),
                                      retain_graph=True, allow_unused=True, materialize_grads=True)
        for k, got in zip(others, rebuilt):
            want = want_of[op.names[k]]
            if want is None or not close(got.reshape(-1).double(), want.detach().reshape(-1).double()):
                run.fail(k, _NOT_THROUGH_OUTPUT)
    rows = Grouping("rows", torch.arange(f.shape[0]), torch.zeros(f.shape[0], dtype=torch.long), f.shape[0], 1)
    independent, spent = decoupled(g_f, f, rows, gen)
    run.outcome.num_matvecs += spent
    if not independent:
        return run.fail_all("the loss couples the samples' outputs")
    try:
        for k in list(run.indices):
            name = op.names[k]
            if not _linear_in(model.subset(_CHECK_SAMPLES), {name: detached[name]}, name, gen):
                run.fail(k, "the output is not piecewise linear in this parameter (tanh, LayerNorm, reuse, ...)")
        if run.indices:
            _ggn_diagonal(run, model, g_f, f, matched)
    except (RuntimeError, ValueError) as err:  # torch.func cannot transform this forward
        run.fail_all(f"torch.func could not transform the model ({type(err).__name__}: {str(err)[:120]})")


def _reproduces(model: _Model, params: dict[str, Tensor], f: Tensor) -> bool:
    try:
        # with grad mode on, as in the closure (no_grad would switch some modules to fused fast paths)
        per_sample = model.per_sample_outputs(params).detach()
    except (RuntimeError, ValueError):  # vmap cannot split it (e.g. BatchNorm in train mode)
        return False
    if per_sample.shape != f.shape:
        return False
    scale = max(float(f.detach().abs().max()), 1e-30)
    return float((per_sample - f.detach()).abs().max()) <= _REPRODUCE_TOL * scale


def _factor_gradient_matches(run: _Run, layer: _Layer, gy: Tensor | None, want_of: Mapping[str, Tensor | None]) -> bool:
    """Whether the recorded call alone accounts for its parameters' gradients (else: the per-sample path)."""
    call, w_k, b_k = layer
    if gy is None:
        return False
    gw, gb = call.gradient(gy)
    for k, got in ((w_k, gw), (b_k, gb)):
        if k is None:
            continue
        want = want_of.get(run.op.names[k])
        if want is None or not close(got.reshape(-1), want.detach().reshape(-1).double()):
            return False
    return True


_NOT_THROUGH_OUTPUT = "gradient does not pass through the model output only (a penalty inside the loss?)"


def _ggn_diagonal(run: _Run, model: _Model, g_f: Tensor, f: Tensor, matched: list[tuple[_Layer, Tensor]]) -> None:
    """``sum_n sum_c lambda_nc (J_n^T u_nc)**2`` for every parameter left in ``run.indices``.

    Layers recorded once (``matched``: the call and ``dL/dy``): from factors at their outputs, one
    batched backward pass through the closure's graph for all of them, which also rebuilds ``dL/dy``
    through the output alone (a layer whose ``dL/dy`` differs fails). Every other parameter:
    per-sample gradients of the pseudo-losses (``torch.func.vmap`` over the samples).
    """
    op = run.op
    blocks = output_hessian_blocks(g_f, f)
    lam, vecs = torch.linalg.eigh(blocks.detach())  # (N, C), (N, C, C)
    n, classes = blocks.shape[0], blocks.shape[1]
    run.outcome.num_matvecs += 2 * classes
    matched = [(layer, gy) for layer, gy in matched if any(k is not None and k in run.indices for k in layer[1:])]
    in_layers = {k for (_, w, b), _ in matched for k in (w, b) if k is not None}
    if matched:
        _factor_diagonals(run, matched, g_f, f, lam, vecs)
    rest = [k for k in run.indices if k not in in_layers]
    if not rest:
        return
    params = {op.names[k]: op.params[k].detach() for k in rest}
    numel = sum(p.numel() for p in params.values())
    per_pass = max(1, min(classes, _PASS_BYTES // max(1, n * numel * f.element_size())))
    for c0 in range(0, classes, per_pass):
        c1 = min(classes, c0 + per_pass)
        per_sample = model.per_sample_grads(params, vecs[:, :, c0:c1].transpose(1, 2).to(f.dtype))  # (N, J, C)
        weight = lam[:, c0:c1].to(f.dtype).reshape(-1)  # (N * J,)
        for k in rest:
            g = per_sample[op.names[k]].detach().reshape(weight.shape[0], -1)
            run.acc[k] = run.acc.get(k, 0.0) + (weight @ g.square()).to(torch.float64)


def _factor_diagonals(
    run: _Run, matched: list[tuple[_Layer, Tensor]], g_f: Tensor, f: Tensor, lam: Tensor, vecs: Tensor
) -> None:
    """Accumulate the recorded layers' diagonals from factors, as many output directions per backward as fit.

    The first backward pass also carries ``dL/df``: a layer whose ``dL/dy`` rebuilt through the
    output differs from autograd's fails (the loss sees it elsewhere too).
    """
    classes = vecs.shape[1]
    ys = [call.y for (call, _, _), _ in matched]
    step = max(1, min(classes, _PASS_BYTES // max(1, sum(y.numel() for y in ys) * f.element_size())))
    cot = vecs.permute(2, 0, 1).to(f.dtype).reshape(classes, *f.shape)  # cotangent c: u_nc on sample n
    live = list(range(len(matched)))
    for c0 in range(0, classes, step):
        chunk = cot[c0 : c0 + step]
        if c0 == 0:
            chunk = torch.cat([chunk, g_f.detach().unsqueeze(0)])  # and dL/df, to rebuild dL/dy through f
        kept = []
        for i, s in zip(live, backward_batched(f, [ys[i] for i in live], chunk)):
            (call, w_k, b_k), gy = matched[i]
            if c0 == 0:
                if not close(s[-1].reshape(-1).double(), gy.detach().reshape(-1).double()):
                    for k in (w_k, b_k):
                        if k is not None and k in run.indices:
                            run.fail(k, _NOT_THROUGH_OUTPUT)
                    continue
                s = s[:-1]
            diag_w, diag_b = call.squared_gradients(s.detach(), lam[:, c0 : c0 + step])
            for k, full in ((w_k, diag_w), (b_k, diag_b)):
                if k is not None and k in run.indices:
                    run.acc[k] = run.acc.get(k, 0.0) + full.reshape(-1)
            kept.append(i)
        live = kept
        if not live:
            return


_PASS_BYTES = 256 * 2**20  # per-sample gradients held at once


def _agree_across_processes(run: _Run) -> None:
    """One collective so that every process takes the same path for every parameter."""
    if run.op.reduce is None:
        return
    flags = torch.tensor([1.0 if k in run.indices else 0.0 for k in range(len(run.op.names))], dtype=torch.float64)
    flags = run.op.reduce(flags.to(run.op.device))
    for k in list(run.indices):
        if float(flags[k]) < 1.0 - 1e-9:
            run.fail(k, "fast path not applicable on another process")


def piecewise_diagonal(op: HessianOperator, indices: list[int], seed: int = 2024) -> PiecewiseOutcome:
    """Exact diagonals (local, not reduced) of the op parameters ``indices`` where the checks pass."""
    run = _Run(op, indices)
    if op.module is None:
        run.fail_all("no module given (use HessianOperator.from_module)")
        return run.outcome
    known = dict(op.module.named_parameters())
    if any(known.get(op.names[k]) is not op.params[k] for k in indices):
        run.fail_all("parameter names do not match the module's (use HessianOperator.from_module)")
        return run.outcome
    gen = torch.Generator().manual_seed(seed)
    for fn_index in range(len(op.loss_fns)):
        if run.indices:
            _one_closure(run, fn_index, gen)
    _agree_across_processes(run)
    for k in run.indices:
        run.outcome.parts[k] = op.select_entries(k, run.acc[k])
    return run.outcome


def piecewise_cost(op: HessianOperator) -> int:
    """Upper bound on the matvecs :func:`piecewise_diagonal` spends: ``2 C + ceil(log2 N)`` per closure.

    Runs the first closure once (forward only) to read the model output's shape; 0 without a module.
    """
    if op.module is None:
        return 0
    calls: list[ModelCall] = []
    with capture_model_calls(op.module, calls), op.autograd_context():
        op.evaluate_loss(0)
    if len(calls) != 1:
        return 0
    f = calls[0].output
    n, c = int(f.shape[0]), int(f[0].numel()) if f.ndim else 1
    return len(op.loss_fns) * (2 * c + (math.ceil(math.log2(n)) if n > 1 else 0))
