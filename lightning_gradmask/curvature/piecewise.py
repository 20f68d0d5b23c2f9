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
products for the blocks and ``C`` passes of per-sample gradients (``torch.func.vmap``) of the
pseudo-losses ``u_nc . f_n``: the cost of a few backward passes, not one product per entry
(BackPACK's ``DiagHessian`` computes the same quantity by propagating the factors layer by layer).

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
  used twice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from lightning_gradmask.curvature._output_hessian import Grouping, batched_grad, close, decoupled
from lightning_gradmask.curvature._random import gaussian
from lightning_gradmask.curvature.operator import HessianOperator

__all__ = ["PiecewiseOutcome", "piecewise_diagonal"]

_LINEARITY_TOL = 1e-6
_REPRODUCE_TOL = 1e-5
_CHECK_SAMPLES = 8  # the structural checks (per-sample evaluation, linearity) run on this many samples


@dataclass
class PiecewiseOutcome:
    """What :func:`piecewise_diagonal` computed: local diagonals by op index, notes, products."""

    parts: dict[int, Tensor] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    num_matvecs: int = 0


@dataclass
class _Forward:
    """The root module's call inside one closure."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Tensor


@contextlib.contextmanager
def _capturing(module: nn.Module, calls: list[_Forward]) -> Iterator[None]:
    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if isinstance(output, Tensor):
            calls.append(_Forward(args, kwargs, output))
            return output.clone()  # in-place ops in the loss must not touch the captured output
        return output

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _Model:
    """The root module as a function of the selected parameters, per batch and per sample."""

    def __init__(self, module: nn.Module, names: list[str], call: _Forward) -> None:
        self.module, self.names, self.call = module, names, call
        self.batch = int(call.output.shape[0])
        self.in_dims = tuple(0 if self._batched(a) else None for a in call.args)

    def _batched(self, a: Any) -> bool:
        return isinstance(a, Tensor) and a.ndim > 0 and a.shape[0] == self.batch

    def _with_args(self, args: tuple[Any, ...], batch: int) -> _Model:
        other = _Model.__new__(_Model)
        other.module, other.names, other.in_dims, other.batch = self.module, self.names, self.in_dims, batch
        other.call = _Forward(args, self.call.kwargs, self.call.output)
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


def _output_hessian_blocks(g_f: Tensor, f: Tensor) -> Tensor:
    """``(N, C, C)`` blocks of the Hessian of the loss w.r.t. the output (rows already decoupled)."""
    n = f.shape[0]
    c = f[0].numel()
    probes = torch.zeros(c, n, c, dtype=f.dtype, device=f.device)
    probes[torch.arange(c), :, torch.arange(c)] = 1.0
    h = batched_grad(g_f, f, probes.reshape(c, *f.shape)).reshape(c, n, c)
    blocks = h.permute(1, 2, 0).to(torch.float64)  # [n, row, column]
    return 0.5 * (blocks + blocks.transpose(1, 2))


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
    calls: list[_Forward] = []
    with _capturing(op.module, calls), op.autograd_context():
        loss = op.evaluate_loss(fn_index)
    if len(calls) != 1:
        return run.fail_all(f"the model was called {len(calls)} times in one loss evaluation (needs exactly 1)")
    with op.autograd_context():
        if any(m.training for m in op.module.modules()):
            # train-mode BatchNorm couples the samples (and re-running it would move its statistics)
            return run.fail_all("the model is in training mode (samples coupled, e.g. train-mode BatchNorm)")
        _accumulate(run, loss, _Model(op.module, [op.names[k] for k in run.indices], calls[0]), gen)


def _accumulate(run: _Run, loss: Tensor, model: _Model, gen: torch.Generator) -> None:
    op = run.op
    f = model.call.output
    params = {op.names[k]: op.params[k] for k in run.indices}
    detached = {n: p.detach() for n, p in params.items()}
    if not _reproduces(model.subset(_CHECK_SAMPLES), detached, f[:_CHECK_SAMPLES]):
        return run.fail_all("evaluated one sample at a time the model does not reproduce its batch output "
                            "(samples coupled, e.g. train-mode BatchNorm)")
    grads = torch.autograd.grad(loss, [f, *params.values()], create_graph=True, allow_unused=True)
    g_f = grads[0]
    if g_f is None or not g_f.requires_grad:
        return run.fail_all("the loss does not depend on the model output twice-differentiably")
    rebuilt = torch.autograd.grad(f, list(params.values()), grad_outputs=g_f.detach(), retain_graph=True,
                                  allow_unused=True, materialize_grads=True)
    for k, got, want in zip(list(run.indices), rebuilt, grads[1:]):
        if want is None or not close(got.reshape(-1).double(), want.detach().reshape(-1).double()):
            run.fail(k, "gradient does not pass through the model output only (a penalty inside the loss?)")
    rows = Grouping("rows", torch.arange(f.shape[0]), torch.zeros(f.shape[0], dtype=torch.long), f.shape[0], 1)
    independent, spent = decoupled(g_f, f, rows, gen)
    run.outcome.num_matvecs += spent
    if not independent:
        return run.fail_all("the loss couples the samples' outputs")
    try:
        for k in list(run.indices):
            if not _linear_in(model.subset(_CHECK_SAMPLES), detached, op.names[k], gen):
                run.fail(k, "the output is not piecewise linear in this parameter (tanh, LayerNorm, reuse, ...)")
        if run.indices:
            _ggn_diagonal(run, model, g_f, f)
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


def _ggn_diagonal(run: _Run, model: _Model, g_f: Tensor, f: Tensor) -> None:
    op = run.op
    blocks = _output_hessian_blocks(g_f, f)
    lam, vecs = torch.linalg.eigh(blocks.detach())  # (N, C), (N, C, C)
    n, classes = blocks.shape[0], blocks.shape[1]
    run.outcome.num_matvecs += 2 * classes
    params = {op.names[k]: op.params[k].detach() for k in run.indices}
    numel = sum(p.numel() for p in params.values())
    per_pass = max(1, min(classes, _PASS_BYTES // max(1, n * numel * f.element_size())))
    for c0 in range(0, classes, per_pass):
        c1 = min(classes, c0 + per_pass)
        per_sample = model.per_sample_grads(params, vecs[:, :, c0:c1].transpose(1, 2).to(f.dtype))  # (N, J, C)
        weight = lam[:, c0:c1].to(f.dtype).reshape(-1)  # (N * J,)
        for k in run.indices:
            g = per_sample[op.names[k]].detach().reshape(weight.shape[0], -1)
            run.acc[k] = run.acc.get(k, 0.0) + (weight @ g.square()).to(torch.float64)


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
