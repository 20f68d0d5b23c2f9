"""Accuracy and speed of ``lightning_gradmask.curvature`` against PyHessian and the textbook loop.

Run (CPU, one thread for stable timings)::

    python benchmarks/curvature_benchmark.py            # full run, about 10 minutes on 2 cores
    python benchmarks/curvature_benchmark.py --quick    # fewer seeds, smaller references

What is compared, on the same model and the same batch:

* top eigenvalue: ``lanczos`` vs PyHessian's power iteration (``tol=1e-3``); reference: Lanczos
  run to full convergence on a float64 copy of the model.
* trace at 100 products: our estimators (adaptive, XTrace, Hutch++, Hutchinson), PyHessian's
  Hutchinson, and ``hessian_statistics``' default (exact where affordable); reference: the exact
  trace, i.e. the sum of the exact diagonal (layerwise for Linear layers, one product per entry for
  the convolutions).
* diagonal (~5k-parameter MLP): ``exact_diagonal`` vs the per-element ``torch.autograd.grad`` loop;
  reference: ``torch.func.hessian`` on a float64 copy.

PyHessian 0.1 (PyPI) is used for its eigenvalue and trace routines if it imports; otherwise a
faithful re-implementation of those two algorithms (below) stands in, and the output says so.
Its ``density()`` is not run (it calls ``torch.eig``, removed from torch).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradmask.curvature import (
    HessianOperator,
    estimate_diagonal,
    estimate_trace,
    exact_diagonal,
    hessian_statistics,
    lanczos,
)

# ----------------------------------------------------------------------------------------- models


def mlp_100k() -> nn.Module:
    return nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))


def cnn_100k() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(512, 192), nn.ReLU(), nn.Linear(192, 10),
    )  # fmt: skip


def mlp_5k() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))


class Transformer34k(nn.Module):
    """One ``nn.TransformerEncoderLayer`` (d_model 64, 4 heads, feed-forward 128) and a head on the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no double backward
            return self.head(self.block(x).mean(dim=1))


class ResidualBatchNormCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> MaxPool, a residual Conv -> BatchNorm -> ReLU block, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.inner = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(h + self.inner(h))


SHAPES = {"mlp_100k": (128,), "cnn_100k": (3, 16, 16), "mlp_5k": (32,), "transformer_34k": (8, 64), "cnn_bn_res": (3, 16, 16)}
BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mlp_100k": mlp_100k,
    "cnn_100k": cnn_100k,
    "mlp_5k": mlp_5k,
    "transformer_34k": Transformer34k,
    "cnn_bn_res": ResidualBatchNormCNN,
}


def problem(kind: str, state: str, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model (at init, or trained 600 Adam steps on a noisy linear-teacher task) and one batch."""
    torch.manual_seed(0)
    model = BUILDERS[kind]()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, *SHAPES[kind], generator=g)
    teacher = torch.randn(x[0].numel(), 10, generator=torch.Generator().manual_seed(2))
    y = (x.reshape(2048, -1) @ teacher / math.sqrt(x[0].numel()) + 0.3 * torch.randn(2048, 10, generator=g)).argmax(1)
    if state == "trained":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(600):
            idx = torch.randint(0, 2048, (128,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    return model, x[:batch].clone(), y[:batch].clone()


def operator(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> HessianOperator:
    return HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))


# ---------------------------------------------------------------------------- PyHessian baseline


_PYHESSIAN_COUNT = [0]


def _patched_pyhessian():  # noqa: ANN202
    """PyHessian's module with its ``hessian_vector_product`` counted (patched once)."""
    import importlib
    import sys

    importlib.import_module("pyhessian")
    module = sys.modules["pyhessian.hessian"]
    if not getattr(module, "_counted", False):
        original = module.hessian_vector_product

        def counted(gradsH, params, v):  # noqa: ANN001, ANN202, N803
            _PYHESSIAN_COUNT[0] += 1
            return original(gradsH, params, v)

        module.hessian_vector_product = counted
        module._counted = True
    return module


class CountingPyHessian:
    """PyHessian's ``hessian`` class with its HVPs counted (or a re-implementation if unavailable)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model, x, y
        self._own_products = 0
        try:
            ph = _patched_pyhessian()
            self.source = "PyHessian 0.1 (PyPI)"
            _PYHESSIAN_COUNT[0] = 0
            self._impl = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        except ImportError:
            self.source = "re-implementation of PyHessian's algorithms (PyHessian not importable)"
            self._impl = None
            params = [p for p in model.parameters() if p.requires_grad]
            loss = F.cross_entropy(model(x), y)
            self._params = params
            self._grads = torch.autograd.grad(loss, params, create_graph=True)

    @property
    def products(self) -> int:
        return _PYHESSIAN_COUNT[0] if self._impl is not None else self._own_products

    def _hvp(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        self._own_products += 1
        return list(torch.autograd.grad(self._grads, self._params, grad_outputs=v, retain_graph=True))

    def eigenvalue(self, tol: float = 1e-3, max_iter: int = 100) -> float:
        if self._impl is not None:
            eig, _ = self._impl.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
            return float(eig[0])
        # power iteration with PyHessian's stopping rule: |new - old| / (|old| + 1e-6) < tol
        v = [torch.randn_like(p) for p in self._params]
        norm = math.sqrt(sum(float((t * t).sum()) for t in v))
        v = [t / (norm + 1e-6) for t in v]
        eigenvalue = None
        for _ in range(max_iter):
            hv = self._hvp(v)
            new = sum(float((a * b).sum()) for a, b in zip(hv, v))
            norm = math.sqrt(sum(float((t * t).sum()) for t in hv))
            v = [t / (norm + 1e-6) for t in hv]
            if eigenvalue is not None and abs(eigenvalue - new) / (abs(eigenvalue) + 1e-6) < tol:
                eigenvalue = new
                break
            eigenvalue = new
        return float(eigenvalue)

    def trace(self, tol: float = 1e-3, max_iter: int = 100) -> float:
        if self._impl is not None:
            return float(statistics.fmean(self._impl.trace(maxIter=max_iter, tol=tol)))
        # Hutchinson with Rademacher probes and PyHessian's stopping rule
        samples: list[float] = []
        running = 0.0
        for _ in range(max_iter):
            v = [torch.randint_like(p, high=2) * 2 - 1 for p in self._params]
            hv = self._hvp(v)
            samples.append(sum(float((a * b).sum()) for a, b in zip(hv, v)))
            if abs(statistics.fmean(samples) - running) / (running + 1e-6) < tol:
                break
            running = statistics.fmean(samples)
        return statistics.fmean(samples)


# ---------------------------------------------------------------------------------- references


def reference_top_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top eigenvalue from Lanczos run to convergence (tol 1e-10, up to 300 steps) in float64."""
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    op = HessianOperator.from_module(m64, lambda: F.cross_entropy(m64(x64), y))
    res = lanczos(op, k=1, num_matvecs=300, tol=1e-10, seed=12345)
    return float(res.eigenvalues[0])


def reference_trace(op: HessianOperator) -> tuple[float, torch.Tensor, float, dict[str, str]]:
    t0 = time.perf_counter()
    res = exact_diagonal(op)
    return float(res.diagonal.sum()), res.diagonal, time.perf_counter() - t0, res.methods


# ------------------------------------------------------------------------------------ sections


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def hvp_cost(op: HessianOperator, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    v = torch.randn(op.dim)
    op.matvec(v)
    _, t_hvp = timed(lambda: [op.matvec(v) for _ in range(10)])
    params = [p for p in model.parameters()]
    _, t_grad = timed(lambda: [torch.autograd.grad(F.cross_entropy(model(x), y), params) for _ in range(10)])
    return t_hvp / 10, t_grad / 10


def eigen_section(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: int) -> None:
    ref = reference_top_eigenvalue(model, x, y)
    rows = []
    for seed in range(seeds):
        op = operator(model, x, y)
        res, t = timed(lambda: lanczos(op, k=1, seed=seed))
        rows.append(("ours", abs(float(res.eigenvalues[0]) - ref) / abs(ref), res.num_matvecs, t))  # type: ignore[attr-defined]
        torch.manual_seed(seed)
        ph = CountingPyHessian(model, x, y)
        val, t = timed(lambda: ph.eigenvalue(tol=1e-3))
        rows.append(("pyhessian", abs(float(val) - ref) / abs(ref), ph.products, t))  # type: ignore[arg-type]
        model.zero_grad(set_to_none=True)
    print(f"\n### Top eigenvalue, {name} (reference {ref:.6g}, float64 Lanczos to convergence; {seeds} seeds)\n")
    print("| method | mean rel. error | max rel. error | mean HVPs | mean time (s) |")
    print("|---|---|---|---|---|")
    summary = {}
    for method, label in (("ours", "`lanczos` (tol 1e-4)"), ("pyhessian", f"power iteration, tol 1e-3 [{ph.source}]")):
        r = [row for row in rows if row[0] == method]
        errs = [row[1] for row in r]
        prods = statistics.fmean(row[2] for row in r)
        secs = statistics.fmean(row[3] for row in r)
        summary[method] = (statistics.fmean(errs), prods, secs)
        print(f"| {label} | {statistics.fmean(errs):.2e} | {max(errs):.2e} | {prods:.1f} | {secs:.3f} |")
    o, p = summary["ours"], summary["pyhessian"]
    print(
        f"\nratios ours/PyHessian: error {o[0] / max(p[0], 1e-300):.2e}, HVPs {o[1] / p[1]:.2f}, time {o[2] / p[2]:.2f}"
    )


def trace_section(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: int) -> None:
    op = operator(model, x, y)
    true, _, t_ref, methods = reference_trace(op)
    kinds = sorted(set(methods.values()))
    print(
        f"\n### Trace, {name} (exact trace {true:.6g} from the exact diagonal [{', '.join(kinds)}], "
        f"{t_ref:.1f} s; 100 products, {seeds} seeds)\n"
    )
    print("| method | mean rel. error | max rel. error | rms z = err/stderr | mean HVPs | mean time (s) |")
    print("|---|---|---|---|---|---|")
    results: dict[str, tuple[float, float]] = {}
    for method in ("adaptive", "xtrace", "hutch++", "hutchinson"):
        errs, zs, secs, prods, chosen = [], [], [], [], set()
        for seed in range(seeds):
            op = operator(model, x, y)
            est, t = timed(lambda: estimate_trace(op, 100, method=method, seed=seed))
            errs.append(abs(est.trace - true) / abs(true))  # type: ignore[attr-defined]
            zs.append((est.trace - true) / est.stderr if est.stderr > 0 else 0.0)  # type: ignore[attr-defined]
            secs.append(t)
            prods.append(est.num_matvecs)  # type: ignore[attr-defined]
            chosen.add(est.method)  # type: ignore[attr-defined]
        z = math.sqrt(statistics.fmean(v * v for v in zs))
        label = f"`estimate_trace` {method}" + (
            f" (chose {', '.join(sorted(c.split(':')[1] for c in chosen))})" if method == "adaptive" else ""
        )
        results[method] = (statistics.fmean(errs), statistics.fmean(secs))
        print(
            f"| {label} | {statistics.fmean(errs):.4f} | {max(errs):.4f} | {z:.2f} | {statistics.fmean(prods):.0f} | {statistics.fmean(secs):.2f} |"
        )
    for tol, label in (
        (1e-3, "PyHessian trace, tol 1e-3 (default)"),
        (-1.0, "PyHessian trace, 100 probes (tol disabled)"),
    ):
        errs, secs, prods = [], [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            ph = CountingPyHessian(model, x, y)
            val, t = timed(lambda: ph.trace(tol=tol, max_iter=100))
            errs.append(abs(float(val) - true) / abs(true))  # type: ignore[arg-type]
            secs.append(t)
            prods.append(ph.products)
            model.zero_grad(set_to_none=True)
        results[label] = (statistics.fmean(errs), statistics.fmean(secs))
        print(
            f"| {label} | {statistics.fmean(errs):.4f} | {max(errs):.4f} | n/a | {statistics.fmean(prods):.0f} | {statistics.fmean(secs):.2f} |"
        )
    errs, secs, prods, notes = [], [], [], set()
    for seed in range(seeds):
        op = operator(model, x, y)
        st, t = timed(lambda: hessian_statistics(op, ("trace",), trace_matvecs=100, seed=seed))
        errs.append(abs(st.trace.trace - true) / abs(true))  # type: ignore[attr-defined]
        secs.append(t)
        prods.append(st.num_matvecs)  # type: ignore[attr-defined]
        notes.add(st.trace.method)  # type: ignore[attr-defined]
    results["default"] = (statistics.fmean(errs), statistics.fmean(secs))
    print(
        f"| `hessian_statistics` default ({', '.join(sorted(notes))}) | {statistics.fmean(errs):.2e} | {max(errs):.2e} | n/a | {statistics.fmean(prods):.0f} | {statistics.fmean(secs):.2f} |"
    )
    base = results["PyHessian trace, 100 probes (tol disabled)"]
    print(
        f"\nerror ratios vs PyHessian (100 probes): adaptive {results['adaptive'][0] / base[0]:.2f}, "
        f"xtrace {results['xtrace'][0] / base[0]:.2f}, default {results['default'][0] / base[0]:.2e}; "
        f"time ratio default/PyHessian {results['default'][1] / base[1]:.2f}"
    )


def diagonal_section(seeds: int) -> None:
    model, x, y = problem("mlp_5k", "trained", 256)
    n = sum(p.numel() for p in model.parameters())
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    names = [k for k, _ in m64.named_parameters()]
    shapes = [p.shape for p in m64.parameters()]

    def loss_flat(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for k, shape in zip(names, shapes):
            params[k] = flat[offset : offset + math.prod(shape)].reshape(shape)
            offset += math.prod(shape)
        return F.cross_entropy(torch.func.functional_call(m64, params, (x64,)), y)

    flat0 = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])
    ref, t_ref = timed(lambda: torch.diagonal(torch.func.hessian(loss_flat)(flat0)).clone())
    ref = ref  # type: ignore[assignment]

    def loop() -> torch.Tensor:
        params = list(model.parameters())
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        out = []
        for p, g in zip(params, grads):
            gf = g.reshape(-1)
            for i in range(gf.numel()):
                (h,) = torch.autograd.grad(gf[i], p, retain_graph=True)
                out.append(h.reshape(-1)[i])
        return torch.stack(out)

    def rel(a: torch.Tensor) -> float:
        return float((a.double() - ref).abs().max() / ref.abs().max())  # type: ignore[union-attr]

    loops = [timed(loop) for _ in range(2)]
    t_loop = min(t for _, t in loops)
    ours = []
    for _ in range(5):
        op = operator(model, x, y)
        ours.append(timed(lambda: exact_diagonal(op)))
    t_ours = min(t for _, t in ours)
    res = ours[0][0]
    op = operator(model, x, y)
    prod_res, t_prod = timed(lambda: exact_diagonal(op, method="products"))
    print(
        f"\n### Exact diagonal, MLP {n} parameters, batch 256 (reference: torch.func.hessian in float64, {t_ref:.1f} s)\n"
    )
    print("| method | max abs error / max abs diagonal | HVPs | time (s) | speed-up vs loop |")
    print("|---|---|---|---|---|")
    print(f"| per-element `torch.autograd.grad` loop | {rel(loops[0][0]):.1e} | {n} | {t_loop:.3f} | 1.0x |")  # type: ignore[arg-type]
    print(
        f"| `exact_diagonal` (layerwise) | {rel(res.diagonal):.1e} | {res.num_matvecs} | {t_ours:.4f} | {t_loop / t_ours:.0f}x |"
    )  # type: ignore[attr-defined]
    print(
        f'| `exact_diagonal(method="products")` (fallback) | {rel(prod_res.diagonal):.1e} | {prod_res.num_matvecs} | {t_prod:.3f} | {t_loop / t_prod:.1f}x |'
    )  # type: ignore[attr-defined]

    # stochastic diagonal on the 100k MLP, against its exact (layerwise) diagonal
    print("\n### Estimated diagonal, MLP ~100k (100 products; reference: exact layerwise diagonal)\n")
    print("| state | method | mean relative L2 error | mean time (s) | exact diagonal time (s) |")
    print("|---|---|---|---|---|")
    for state in ("init", "trained"):
        model, x, y = problem("mlp_100k", state, 256)
        op = operator(model, x, y)
        exact, t_exact = timed(lambda: exact_diagonal(op).diagonal)
        for method in ("hutchinson", "xtrace"):
            errs, secs = [], []
            for seed in range(min(seeds, 5)):
                op = operator(model, x, y)
                est, t = timed(lambda: estimate_diagonal(op, 100, method=method, seed=seed))
                errs.append(float((est.diagonal - exact).norm() / exact.norm()))  # type: ignore[attr-defined, operator]
                secs.append(t)
            print(
                f"| {state} | {method} | {statistics.fmean(errs):.2f} | {statistics.fmean(secs):.2f} | {t_exact:.2f} |"
            )


# --------------------------------------------------------------------- peers: curvlinops, BackPACK, eigenthings
# Installed for the benchmark only, without pulling a CUDA torch (see benchmarks/README.md):
#   pip install --no-deps backpack-for-pytorch curvlinops-for-pytorch hessian-eigenthings unfoldNd einconv linear_operator
#   pip install einops opt-einsum tqdm


def _peer(name: str):  # noqa: ANN202
    """The peer's module, or ``None`` (the column then reads "not installed")."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def reference_top(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    op = HessianOperator.from_module(m64, lambda: F.cross_entropy(m64(x64), y))
    res = lanczos(op, k=k, num_matvecs=400, tol=1e-11, seed=12345)
    assert res.converged, "reference Lanczos did not converge"
    return res.eigenvalues


def _rel_error(values: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((values.double().cpu() - ref).abs() / ref.abs()).max())


def _ours_top(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, int, float, bool]:
    op = operator(model, x, y)
    res, t = timed(lambda: lanczos(op, k=k, seed=seed))
    return res.eigenvalues, res.num_matvecs, t, res.converged  # type: ignore[attr-defined]


def _curvlinops_top(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, seed: int):  # noqa: ANN202
    curvlinops = _peer("curvlinops")
    if curvlinops is None:
        return None
    import numpy as np
    from scipy.sparse.linalg import LinearOperator as ScipyOperator
    from scipy.sparse.linalg import eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    h = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    inner = h.to_scipy()
    count = [0]

    def mv(v):  # noqa: ANN001, ANN202
        count[0] += 1
        return inner @ v

    wrapped = ScipyOperator(inner.shape, matvec=mv, dtype=np.float32)
    v0 = np.random.default_rng(seed).standard_normal(inner.shape[0]).astype(np.float32)
    vals, t = timed(lambda: eigsh(wrapped, k=k, which="LA", tol=1e-4, v0=v0, return_eigenvectors=False))
    return torch.from_numpy(np.sort(vals)[::-1].copy()), count[0], t  # type: ignore[arg-type]


def _eigenthings_top(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, seed: int, steps: int):  # noqa: ANN202
    """hessian-eigenthings' ``lanczos`` (a fixed number of steps, default ``2k``) given ``steps`` steps."""
    he = _peer("hessian_eigenthings")
    if he is None:
        return None
    op = he.HessianOperator(model, [(x, y)], he.supervised_loss(F.cross_entropy))
    count = [0]
    inner = op.matvec

    def mv(v: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return inner(v)

    op.matvec = mv
    res, t = timed(lambda: he.lanczos(op, k=k, max_iter=steps, reorthogonalize=True, which="LA", seed=seed))
    vals = torch.sort(res.eigenvalues.double(), descending=True).values  # type: ignore[attr-defined]
    return vals, count[0], t


def _summary(rows: list[tuple[float, int, float]]) -> str:
    errs = [r[0] for r in rows]
    prods = [r[1] for r in rows]
    secs = [r[2] for r in rows]
    return (
        f"{statistics.fmean(errs):.1e} / {max(errs):.1e} | {statistics.fmean(prods):.1f} (max {max(prods)}) "
        f"| {statistics.fmean(secs):.3f}"
    )


def lanczos_section(seeds: int) -> None:
    """Top-k over many seeds: ours against curvlinops + scipy ``eigsh`` and hessian-eigenthings ``lanczos``."""
    print("\n### Top eigenvalues over seeds (reference: float64 Lanczos, tol 1e-11)\n")
    print(
        "| model | k | seeds | `lanczos` mean / max rel. error | HVPs | time (s) | converged | runs above 1e-4 "
        "| curvlinops + eigsh(tol 1e-4) error | HVPs | time (s) | eigenthings lanczos, ours' HVPs: error | HVPs | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, state, batch, k in (
        ("mlp_100k", "init", 256, 1),
        ("transformer_34k", "init", 32, 1),
        ("mlp_100k", "init", 256, 5),
    ):
        model, x, y = problem(kind, state, batch)
        ref = reference_top(model, x, y, k)
        n = seeds if k == 1 else max(10, seeds // 3)
        ours, converged = [], 0
        for seed in range(n):
            vals, prods, t, conv = _ours_top(model, x, y, k, seed)
            ours.append((_rel_error(vals, ref), prods, t))
            converged += conv
        peers = []
        for run in (_curvlinops_top, _eigenthings_top):
            rows = []
            for seed in range(min(n, 5)):
                extra = (ours[seed][1],) if run is _eigenthings_top else ()  # as many steps as ours took
                got = run(model, x, y, k, seed, *extra)
                if got is None:
                    break
                rows.append((_rel_error(got[0], ref), got[1], got[2]))
            peers.append(_summary(rows) + f" ({len(rows)} seeds)" if rows else "not installed | - | -")
        above = sum(r[0] > 1e-4 for r in ours)
        print(f"| {kind} {state} | {k} | {n} | {_summary(ours)} | {converged}/{n} | {above} | {peers[0]} | {peers[1]} |")


def _median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[object, float]]:
    """Interleaved repeats, median time per function (and its last result)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            last[name], t = timed(fn)
            times[name].append(t)
    return {name: (last[name], statistics.median(times[name])) for name in fns}


def _backpack_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    backpack = _peer("backpack")
    if backpack is None:
        return None
    from backpack.extensions import DiagHessian

    bm = backpack.extend(copy.deepcopy(model))
    loss = backpack.extend(nn.CrossEntropyLoss())

    def run() -> torch.Tensor:
        bm.zero_grad()
        with backpack.backpack(DiagHessian()):
            loss(bm(x), y).backward()
        return torch.cat([p.diag_h.reshape(-1) for p in bm.parameters()])

    return run


def exact_diagonal_section(repeats: int = 5) -> None:
    """Exact diagonal: ours vs BackPACK ``DiagHessian`` and vs 100 Hutchinson products; trace at 100 products."""
    print(f"\n### Exact diagonal against BackPACK and Hutchinson (medians of {repeats} interleaved repeats)\n")
    print(
        "| model | params | `exact_diagonal` methods | products | time (s) | BackPACK DiagHessian (s) | ours / BackPACK "
        "| max diff / max diag vs BackPACK | 100 Hutchinson products (s) | ours / Hutchinson | default trace rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    import warnings

    for kind, state, batch in (("cnn_100k", "init", 128), ("cnn_bn_res", "trained", 128), ("transformer_34k", "init", 32)):
        model, x, y = problem(kind, state, batch)
        op = operator(model, x, y)
        fns: dict[str, Callable[[], object]] = {
            "ours": lambda: exact_diagonal(op),
            "hutchinson": lambda: estimate_trace(op, 100, method="hutchinson", seed=0),
        }
        bp = _backpack_diagonal(model, x, y) if kind == "cnn_100k" else None
        if bp is not None:
            fns["backpack"] = bp
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _median_times(fns, repeats)
        res, t_ours = got["ours"]
        _, t_hutch = got["hutchinson"]
        methods = ", ".join(sorted(set(res.methods.values())))  # type: ignore[attr-defined]
        true = float(res.diagonal.sum())  # type: ignore[attr-defined]
        stats = hessian_statistics(operator(model, x, y), ("trace",), seed=0)
        trace_err = abs(stats.trace.trace - true) / abs(true)  # type: ignore[operator]
        if "backpack" in got:
            theirs, t_bp = got["backpack"]
            diff = float((res.diagonal - theirs.double()).abs().max() / res.diagonal.abs().max())  # type: ignore[attr-defined, union-attr]
            bp_cols = f"{t_bp:.3f} | {t_ours / t_bp:.2f}x | {diff:.1e}"
        elif kind == "cnn_bn_res":  # BackPACK has no BatchNorm or residual support: the product path instead
            ref, t_ref = timed(lambda: exact_diagonal(operator(model, x, y), method="products").diagonal)
            diff = float((res.diagonal - ref).abs().max() / ref.abs().max())  # type: ignore[attr-defined, union-attr]
            bp_cols = f"none (no BatchNorm/residual support); one product per entry: {t_ref:.1f} | - | {diff:.1e} vs products"
        else:
            bp_cols = "none (no attention support) | - | -"
        print(
            f"| {kind} {state} | {op.dim} | {methods} | {res.num_matvecs} | {t_ours:.3f} | {bp_cols} "  # type: ignore[attr-defined]
            f"| {t_hutch:.3f} | {t_ours / t_hutch:.1f}x | {trace_err:.1e} ({stats.trace.method}) |"
        )


def matmat_section() -> None:
    """Per-product cost of ``matmat`` (a loop) against a vmapped retained-graph backward."""
    print("\n### `matmat` (10 rows): the loop it runs against a vmapped backward (`is_grads_batched`)\n")
    print("| model | loop (s) | vmapped (s) | vmapped / loop |")
    print("|---|---|---|---|")
    for kind, state, batch in (("mlp_100k", "init", 256), ("cnn_100k", "init", 128), ("transformer_34k", "init", 32)):
        model, x, y = problem(kind, state, batch)
        op = operator(model, x, y)
        rows = torch.randn(10, op.dim)
        params = list(op.params)
        grads = op._grads
        assert grads is not None

        def vmapped() -> object:
            parts = [r.reshape(10, *p.shape) for r, p in zip(torch.split(rows, op.sizes, dim=1), params)]
            return torch.autograd.grad(grads, params, grad_outputs=parts, retain_graph=True, is_grads_batched=True)

        got = _median_times({"loop": lambda: op.matmat(rows), "vmapped": vmapped}, 15)
        t_loop, t_vmap = got["loop"][1], got["vmapped"][1]
        print(f"| {kind} | {t_loop:.4f} | {t_vmap:.4f} | {t_vmap / t_loop:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds instead of 10")
    parser.add_argument(
        "--sections",
        default="hvp,eigen,trace,diagonal,lanczos30,peers",
        help="comma-separated: hvp, eigen, trace, diagonal, lanczos30 (30 seeds, peers), peers (= exactdiag and "
        "matmat), exactdiag (exact diagonal vs BackPACK and Hutchinson), matmat",
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the exactdiag timings")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = 3 if args.quick else 10
    sections = set(args.sections.split(","))
    print(f"torch {torch.__version__}, torch.set_num_threads(1), CPU")
    cases = [
        ("mlp_100k", "init", 256),
        ("mlp_100k", "trained", 256),
        ("cnn_100k", "init", 128),
        ("cnn_100k", "trained", 128),
    ]
    if "hvp" in sections:
        print("\n### Cost of one product\n")
        print("| model | params | batch | HVP on retained graph (ms) | gradient (ms) | ratio |")
        print("|---|---|---|---|---|---|")
        for kind, state, batch in cases[::2]:
            model, x, y = problem(kind, state, batch)
            op = operator(model, x, y)
            t_hvp, t_grad = hvp_cost(op, model, x, y)
            print(f"| {kind} | {op.dim} | {batch} | {t_hvp * 1e3:.2f} | {t_grad * 1e3:.2f} | {t_hvp / t_grad:.2f} |")
    for kind, state, batch in cases:
        label = f"{kind} ({state}, batch {batch})"
        model, x, y = problem(kind, state, batch)
        if "eigen" in sections:
            eigen_section(label, model, x, y, min(seeds, 5))
        if "trace" in sections:
            trace_section(label, model, x, y, seeds)
    if "diagonal" in sections:
        diagonal_section(seeds)
    if "lanczos30" in sections:
        lanczos_section(30)
    if "peers" in sections or "exactdiag" in sections:
        exact_diagonal_section(args.repeats)
    if "peers" in sections or "matmat" in sections:
        matmat_section()


if __name__ == "__main__":
    main()
