"""Stochastic trace (and diagonal) estimation with a standard error.

Estimators, all seeded (the same seed draws the same probes on every process):

* ``"hutchinson"``: ``mean(v^T H v)`` over Rademacher probes; standard error = sample std / sqrt(m).
  Its variance, ``2 * sum_{i != j} H_ij^2 / m``, ignores the diagonal: best when the spectrum is
  flat (no few dominant eigenvalues). ``O(dim)`` memory.
* ``"xtrace"``: the exchangeable estimator XTrace of Epperly, Tropp and Webber (2023), derived and
  implemented here from its definition. With ``m`` products it draws ``s = m // 2`` Gaussian test
  vectors ``omega_i``, computes ``Y = H Omega`` and ``Z = H Q`` (``Q`` an orthonormal basis of
  ``Y``), and for each ``i`` forms the unbiased estimate

      ``t_i = tr(P_i H) + (d / ||u_i||^2) * u_i^T H u_i``,   ``u_i = (I - P_i) omega_i``, ``d = n - s + 1``,

  where ``P_i`` projects onto ``range(H Omega_{-i})`` (every test vector but ``omega_i``): the top of
  the spectrum is removed exactly and only the rest is sampled. ``t_i`` is unbiased because
  ``omega_i`` is independent of ``P_i``; the estimate is the mean of the ``s`` values and the
  standard error their sample std over ``sqrt(s)`` (the authors' error estimate; the ``t_i`` share
  products, so it is a practical estimate whose calibration the benchmark measures). Nothing here
  assumes ``H`` positive semidefinite, which a Hessian is not: the deflated part holds the
  largest-*magnitude* eigenvalues of either sign. The Nystrom variants (XNysTrace, Nystrom++) need a
  PSD matrix and are deliberately not offered. ``"xtrace-rademacher"``: the same with Rademacher
  vectors and no normalization (still unbiased; keeps Hutchinson's blindness to the diagonal).
  Memory: three ``dim x s`` blocks.
* ``"hutch++"``: Meyer, Musco, Musco, Woodruff (2021): 1/3 sketch, 1/3 ``tr(Q^T H Q)``, 1/3
  Hutchinson on the deflated rest; standard error of that last part (the rest is exact given Q).
* ``"adaptive"`` (what ``"auto"`` picks when the blocks fit in ``memory_limit``): spend ``m // 2``
  Rademacher probes, which serve both as Hutchinson samples and as XTrace's sketch; from them,
  at no extra product, compare the predicted variance of the two continuations (see
  :func:`_adaptive`) and finish with XTrace if deflation pays, else with ``m - m // 2`` more
  Hutchinson probes. Deflation only pays when a few eigenvalues dominate ``||H||_F``; measured on
  network Hessians this is sometimes the case (a trained CNN) and often not (an MLP at init).

Per-parameter traces and the diagonal come from the same products at no extra product cost: every
estimator is a sum over entries of a per-entry quantity (``v * Hv`` for Hutchinson,
``diag(H P_i) + (d/||u_i||^2) u_i * H u_i`` for XTrace, the XDiag idea), so splitting it by
parameter gives unbiased per-parameter traces whose sum is exactly the total, each with its own
standard error computed like the total's.

Where structure allows, do not estimate at all: :func:`hessian_statistics` computes the exact
diagonal of Linear layers (see :mod:`.diagonal`) and estimates only the remaining blocks.

Example::

    est = estimate_trace(op, num_matvecs=100, seed=0)
    print(f"{est.trace:.4g} +- {est.stderr:.2g}", est.method, est.per_parameter["0.weight"])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_gradmask.curvature._random import Seed, as_generator, gaussian, rademacher
from lightning_gradmask.curvature.operator import LinearOperator
from lightning_gradmask.curvature.options import TraceMethod

__all__ = ["TraceEstimate", "estimate_trace", "xtrace_memory_bytes"]



@dataclass
class TraceEstimate:
    """Outcome of :func:`estimate_trace`.

    Attributes:
        trace, stderr: the estimate and its standard error.
        per_parameter, per_parameter_stderr: ``{name: trace of that parameter's diagonal block}``;
            the values sum to ``trace``.
        diagonal, diagonal_stderr: flat ``(dim,)`` float64 diagonal estimate and per-entry standard
            error, if ``diagonal=True`` was asked.
        samples: the per-probe (Hutchinson) or leave-one-out (XTrace) estimates the mean is made of.
        num_matvecs: products spent. method: the estimator used.
        exact: ``True`` when the estimator could prove the value exact (XTrace on a Hessian whose
            rank is below the number of test vectors); ``stderr`` is then 0.
    """

    trace: float
    stderr: float
    per_parameter: dict[str, float]
    per_parameter_stderr: dict[str, float]
    num_matvecs: int
    method: str
    samples: Tensor
    diagonal: Tensor | None = None
    diagonal_stderr: Tensor | None = None
    exact: bool = False
    extra: dict[str, float] = field(default_factory=dict)


def _layout(op: LinearOperator) -> tuple[list[str], list[int]]:
    names, sizes = list(op.names), list(op.sizes)
    if sum(sizes) != op.dim or len(names) != len(sizes):
        raise ValueError(f"the operator's sizes {sizes} do not partition its dim {op.dim} among names {names}")
    return names, sizes


def _segment_sums(rows: Tensor, sizes: list[int]) -> Tensor:
    """``(k, dim)`` -> ``(k, n_params)`` sums over each parameter's entries."""
    return torch.stack([c.sum(dim=1) for c in torch.split(rows, sizes, dim=1)], dim=1)


def _mean_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard error along dim 0 (float64)."""
    n = samples.shape[0]
    mean = samples.mean(dim=0)
    if n < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, samples.std(dim=0, unbiased=True) / math.sqrt(n)


def _estimate(
    op: LinearOperator,
    start: int,
    method: str,
    names: list[str],
    samples: Tensor,
    per_parameter_samples: Tensor,
    diagonal: Tensor | None,
    diagonal_stderr: Tensor | None,
) -> TraceEstimate:
    """A :class:`TraceEstimate` from per-probe samples of the trace and of each parameter's block."""
    trace, stderr = _mean_stderr(samples)
    per_parameter, per_parameter_stderr = _mean_stderr(per_parameter_samples)
    return TraceEstimate(
        trace=float(trace),
        stderr=float(stderr),
        per_parameter=dict(zip(names, per_parameter.tolist())),
        per_parameter_stderr=dict(zip(names, per_parameter_stderr.tolist())),
        num_matvecs=op.num_matvecs - start,
        method=method,
        samples=samples,
        diagonal=diagonal,
        diagonal_stderr=diagonal_stderr,
    )


def xtrace_memory_bytes(dim: int, num_matvecs: int, itemsize: int = 4, diagonal: bool = False) -> int:
    """Peak memory of the XTrace blocks (``dim x s`` each, ``s = num_matvecs // 2``)."""
    s = max(num_matvecs // 2, 1)
    blocks = 3 + (4 if diagonal else 0)
    return blocks * dim * s * itemsize + 2 * dim * s * 8  # plus float64 work copies


def estimate_trace(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    method: TraceMethod = "auto",
    seed: Seed = 0,
    diagonal: bool = False,
    memory_limit: int = 2**30,
) -> TraceEstimate:
    """Estimate ``tr(H)`` (and per-parameter traces, optionally the diagonal) with a standard error.

    Args:
        op: the operator.
        num_matvecs: products to spend (XTrace uses ``2 * (num_matvecs // 2)``).
        method: ``"adaptive"``, ``"xtrace"``, ``"xtrace-rademacher"``, ``"hutchinson"``,
            ``"hutch++"`` or ``"auto"`` (adaptive unless its ``dim x m/2`` blocks would exceed
            ``memory_limit`` bytes, then Hutchinson).
        seed: ``int`` or CPU ``torch.Generator``.
        diagonal: also return the per-entry diagonal estimate (same products).

    Example::

        est = estimate_trace(op, 100, seed=0)
        assert abs(sum(est.per_parameter.values()) - est.trace) < 1e-6 * abs(est.trace)
    """
    if num_matvecs < 2:
        raise ValueError("num_matvecs must be at least 2")
    if method == "auto":
        itemsize = torch.empty((), dtype=op.dtype).element_size()
        fits = xtrace_memory_bytes(op.dim, num_matvecs, itemsize, diagonal) <= memory_limit
        method = "adaptive" if fits and num_matvecs >= 4 else "hutchinson"
    gen = as_generator(seed)
    if method == "hutchinson":
        return _hutchinson(op, num_matvecs, gen, diagonal)
    if method == "adaptive":
        return _adaptive(op, num_matvecs, gen, diagonal)
    if method in ("xtrace", "xtrace-rademacher"):
        if num_matvecs < 4:
            raise ValueError("xtrace needs at least 4 products")
        probes = "gaussian" if method == "xtrace" else "rademacher"
        return _xtrace(op, num_matvecs // 2, gen, diagonal, probes)
    if method == "hutch++":
        if num_matvecs < 3:
            raise ValueError("hutch++ needs at least 3 products")
        return _hutchpp(op, num_matvecs, gen, diagonal)
    raise ValueError(f"unknown method {method!r}")


def _hutchinson(
    op: LinearOperator, m: int, gen: torch.Generator, diagonal: bool, first: Tensor | None = None
) -> TraceEstimate:
    """Rademacher Hutchinson; ``first`` holds rows ``v * Hv`` of probes already spent (reused)."""
    names, sizes = _layout(op)
    start = op.num_matvecs
    done = 0 if first is None else int(first.shape[0])
    total = m + done
    per_param = torch.empty(total, len(sizes), dtype=torch.float64)
    diag_sum = torch.zeros(op.dim, dtype=torch.float64, device=op.device) if diagonal else None
    diag_sq = torch.zeros(op.dim, dtype=torch.float64, device=op.device) if diagonal else None
    for i in range(total):
        if i < done:
            assert first is not None
            prod = first[i]
        else:
            v = rademacher((op.dim,), gen, op.dtype, op.device)
            prod = (v * op.matvec(v)).double()
        per_param[i] = _segment_sums(prod.unsqueeze(0), sizes)[0].cpu()
        if diag_sum is not None and diag_sq is not None:
            diag_sum += prod
            diag_sq += prod.square()
    m = total
    diag = diag_se = None
    if diag_sum is not None and diag_sq is not None:
        diag = diag_sum / m
        var = (diag_sq - m * diag.square()).clamp_min(0) / max(m - 1, 1)
        diag_se = (var / m).sqrt()
    return _estimate(op, start, "hutchinson", names, per_param.sum(dim=1), per_param, diag, diag_se)


def _apply_rows(op: LinearOperator, rows: Tensor) -> Tensor:
    """``H`` applied to each row of ``rows``, one product at a time (sequential is fastest on CPU)."""
    return torch.stack([op.matvec(r) for r in rows])


def _xtrace(
    op: LinearOperator, s: int, gen: torch.Generator, diagonal: bool, probes: str = "gaussian"
) -> TraceEstimate:
    n = op.dim
    if s >= n:
        raise ValueError(f"xtrace with {s} test vectors needs dim > {s} (dim={n}); compute exactly instead")
    start = op.num_matvecs
    if probes == "gaussian":
        om = gaussian((s, n), gen, op.dtype, op.device)  # rows are the test vectors
    else:
        om = rademacher((s, n), gen, op.dtype, op.device)
    y = _apply_rows(op, om)  # rows: H omega_i
    q, r = torch.linalg.qr(y.T)  # Y^T = Q R, Q (n, s), in the operator's dtype
    del y
    return _xtrace_finish(op, om, q, r, diagonal, probes, start)


def _xtrace_finish(
    op: LinearOperator, om: Tensor, q: Tensor, r: Tensor, diagonal: bool, probes: str, start: int
) -> TraceEstimate:
    """Second half of XTrace, given the test vectors (rows of ``om``) and ``H Omega^T = Q R``."""
    names, sizes = _layout(op)
    f64 = torch.float64
    r = r.to(f64)
    zt = _apply_rows(op, q.T.contiguous())  # rows: H q_k
    h = (zt @ q).to(f64)  # Q^T H Q
    h = 0.5 * (h + h.T)
    svals = torch.linalg.svdvals(r)
    rcond = 10 * torch.finfo(op.dtype).eps
    if float(svals[-1]) <= rcond * float(svals[0]):
        return _xtrace_exact(op, q, zt, h, om.shape[0], diagonal, start)
    parts = _xtrace_parts(om, q, r, h, probes, op.dim)
    samples = (torch.trace(h) - parts.s_h_s + parts.gamma * parts.quad).cpu()
    pp_samples = _xtrace_per_parameter(om, q, zt, r, parts, sizes)
    diag = diag_se = None
    if diagonal:
        diag, diag_se = _xtrace_diagonal(op.dtype, om, q, zt, r, parts)
    method = "xtrace" if probes == "gaussian" else "xtrace-rademacher"
    return _estimate(op, start, method, names, samples, pp_samples, diag, diag_se)


def _xtrace_exact(
    op: LinearOperator, q: Tensor, zt: Tensor, h: Tensor, s: int, diagonal: bool, start: int
) -> TraceEstimate:
    """rank(H Omega) < s: then range(Y) = range(H) (almost surely), so the projection is exact:
    tr(H) = tr(Q^T H Q) and diag(H) = diag(H Q Q^T), up to rounding."""
    names, sizes = _layout(op)
    f64 = torch.float64
    diag_exact = (zt.T * q).sum(dim=1).to(f64)
    pp = _segment_sums(diag_exact.unsqueeze(0), sizes)[0].cpu()
    total = float(torch.trace(h))
    return TraceEstimate(
        trace=total,
        stderr=0.0,
        per_parameter=dict(zip(names, pp.tolist())),
        per_parameter_stderr=dict.fromkeys(names, 0.0),
        num_matvecs=op.num_matvecs - start,
        method="xtrace",
        samples=torch.full((s,), total, dtype=f64),
        diagonal=diag_exact if diagonal else None,
        diagonal_stderr=torch.zeros_like(diag_exact) if diagonal else None,
        exact=True,
    )


@dataclass
class _XTraceParts:
    """The ``s x s`` quantities every XTrace sample is made of (float64)."""

    w: Tensor  # column i: w_i = Q^T omega_i
    sm: Tensor  # column i: s_i, the unit normal of range(R_{-i}) inside range(Q)
    a: Tensor  # column i: a_i = w_i - c_i s_i, so u_i = omega_i - Q a_i
    s_h_s: Tensor  # s_i^T H s_i
    quad: Tensor  # u_i^T H u_i
    gamma: Tensor  # normalization of each residual probe


def _xtrace_parts(om: Tensor, q: Tensor, r: Tensor, h: Tensor, probes: str, n: int) -> _XTraceParts:
    s = om.shape[0]
    f64 = torch.float64
    w = (om @ q).T.to(f64)  # (s, s): column i is w_i = Q^T omega_i
    # s_i: unit normal of range(R_{-i}) inside range(Q), i.e. the normalized columns of R^{-T}.
    eye = torch.eye(s, dtype=f64, device=r.device)
    sm = torch.linalg.solve_triangular(r.T, eye, upper=False)  # R^{-T}
    sm = sm / sm.norm(dim=0, keepdim=True)
    c = (sm * w).sum(dim=0)  # c_i = s_i^T w_i
    a = w - sm * c  # a_i = w_i - c_i s_i, so u_i = (I - P_i) omega_i = omega_i - Q a_i
    s_h_s = (sm * (h @ sm)).sum(dim=0)
    # u_i^T H u_i = w_i^T r_i - 2 r_i^T a_i + a_i^T H a_i   (H omega_i = Q r_i, H symmetric)
    quad = (w * r).sum(dim=0) - 2 * (r * a).sum(dim=0) + (a * (h @ a)).sum(dim=0)
    if probes == "gaussian":
        # normalize the residual probe to the sphere of radius sqrt(n - s + 1) in range(I - P_i)
        unorm2 = om.to(f64).square().sum(dim=1) - w.square().sum(dim=0) + c.square()
        gamma = (n - s + 1) / unorm2
    else:
        gamma = torch.ones(s, dtype=f64, device=r.device)
    return _XTraceParts(w, sm, a, s_h_s, quad, gamma)


def _xtrace_per_parameter(
    om: Tensor, q: Tensor, zt: Tensor, r: Tensor, parts: _XTraceParts, sizes: list[int]
) -> Tensor:
    """Per parameter block P: the samples restricted to P's entries, from ``s x s`` Gram blocks."""
    f64 = torch.float64
    sm, a, gamma = parts.sm, parts.a, parts.gamma
    pp_rows = []
    offset = 0
    for size in sizes:
        sl = slice(offset, offset + size)
        offset += size
        qp, zp, op_ = q[sl], zt[:, sl].T, om[:, sl].T
        m_zq = (zp.T @ qp).to(f64)  # Z_P^T Q_P
        m_oq = (op_.T @ qp).to(f64)  # row i: omega_i,P^T Q_P
        m_oz = (op_.T @ zp).to(f64)  # row i: omega_i,P^T Z_P
        m_qq = (qp.T @ qp).to(f64)
        t1 = (m_oq * r.T).sum(dim=1)  # omega_P^T Q_P r_i
        t2 = (m_oz * a.T).sum(dim=1)  # omega_P^T Z_P a_i
        t3 = ((m_qq @ r) * a).sum(dim=0)  # a_i^T Q_P^T Q_P r_i
        t4 = ((m_zq @ a) * a).sum(dim=0)  # a_i^T Q_P^T Z_P a_i
        low = torch.trace(m_zq) - (sm * (m_zq @ sm)).sum(dim=0)  # tr(E_P H P_i)
        pp_rows.append(low + gamma * (t1 - t2 - t3 + t4))
    return torch.stack(pp_rows, dim=1).cpu()  # (s, n_params)


def _xtrace_diagonal(
    dt: torch.dtype, om: Tensor, q: Tensor, zt: Tensor, r: Tensor, parts: _XTraceParts
) -> tuple[Tensor, Tensor]:
    """diag(H P_i) + gamma_i u_i * H u_i, entry by entry (H u_i = Q r_i - Z a_i); mean and stderr."""
    smd, ad, rd = parts.sm.to(dt), parts.a.to(dt), r.to(dt)
    z = zt.T
    per_i = (z * q).sum(dim=1, keepdim=True) - (z @ smd) * (q @ smd)
    per_i += parts.gamma.to(dt) * (om.T - q @ ad) * (q @ rd - z @ ad)  # (n, s)
    return _mean_stderr(per_i.T.to(torch.float64))


def _adaptive(op: LinearOperator, m: int, gen: torch.Generator, diagonal: bool) -> TraceEstimate:
    """XTrace or Hutchinson, whichever the first half of the products says has the lower variance.

    Phase 1: ``s = m // 2`` Rademacher probes, ``Y = H Omega``. These are Hutchinson samples
    (``omega_i^T y_i``) and also XTrace's sketch. From them, at no extra product:

    * per-probe Hutchinson variance ``sigma2`` (sample variance of ``omega_i^T y_i``);
    * ``F = mean ||y_i||^2``, an unbiased estimate of ``||H||_F^2``;
    * ``rho``, the fraction of ``||H||_F^2`` left after deflating by the other ``s - 1`` sketch
      vectors: ``||(I - P_{-i}) y_i||^2 = 1 / ||R^{-T} e_i||^2`` for ``Y^T = QR``.

    Deflation (XTrace, residual variance about ``2 rho F`` per sample, ``s`` samples) is chosen when
    ``2 rho F / s < sigma2 / m``, i.e. ``rho < sigma2 / (4 F)``; otherwise phase 2 draws ``m - s``
    more Rademacher probes and all ``m`` are averaged (Hutchinson). Either way the estimate is
    unbiased given the choice; the choice itself uses the phase-1 samples (a negligible selection
    effect, measured in the benchmark). ``extra`` records ``rho`` and the threshold.
    """
    n = op.dim
    s = m // 2
    if s < 2 or s >= n:
        return _hutchinson(op, m, gen, diagonal)
    start = op.num_matvecs
    om = rademacher((s, n), gen, op.dtype, op.device)
    y = _apply_rows(op, om)
    f64 = torch.float64
    y64 = y.to(f64)
    first = om.to(f64) * y64  # per-entry Hutchinson samples
    hutch = first.sum(dim=1)
    sigma2 = float(hutch.var(unbiased=True))
    gram = y64 @ y64.T  # = R^T R for Y^T = Q R; no QR needed to decide
    del y64
    frob = float(torch.diagonal(gram).mean())
    ev = torch.linalg.eigvalsh(gram)
    rank_deficient = float(ev[0]) <= (10 * torch.finfo(op.dtype).eps) ** 2 * float(ev[-1])
    rho = 0.0
    if not rank_deficient:
        try:
            chol = torch.linalg.cholesky(gram)  # L = R^T, so R^{-T} = L^{-1}
            linv = torch.linalg.solve_triangular(chol, torch.eye(s, dtype=f64, device=chol.device), upper=False)
            rho = float((1.0 / linv.square().sum(dim=0)).mean()) / max(frob, 1e-300)
        except RuntimeError:  # numerically singular
            rank_deficient = True
    threshold = sigma2 / (4 * frob) if frob > 0 else 0.0
    if rank_deficient or rho < threshold:
        del first
        q, r = torch.linalg.qr(y.T)
        del y
        est = _xtrace_finish(op, om, q, r, diagonal, "rademacher", start)
    else:
        del y, om
        est = _hutchinson(op, m - s, gen, diagonal, first=first)
        est.num_matvecs = op.num_matvecs - start
    est.extra.update({"rho": rho, "threshold": threshold})
    est.method = f"adaptive:{est.method}"
    return est


def _hutchpp(op: LinearOperator, m: int, gen: torch.Generator, diagonal: bool) -> TraceEstimate:
    names, sizes = _layout(op)
    n = op.dim
    start = op.num_matvecs
    f64 = torch.float64
    k = max(m // 3, 1)
    g = m - 2 * k  # Hutchinson probes on the deflated rest
    sketch = rademacher((k, n), gen, op.dtype, op.device)
    y = _apply_rows(op, sketch)
    q64, _ = torch.linalg.qr(y.T.to(f64))
    q = q64.to(op.dtype)
    z64 = _apply_rows(op, q.T.contiguous()).T.to(f64)
    low = (z64 * q64).sum(dim=1)  # diag(H Q Q^T) per entry; sums to tr(Q^T H Q)
    probes = rademacher((g, n), gen, op.dtype, op.device)
    p64 = probes.to(f64)
    proj = p64 - (p64 @ q64) @ q64.T  # (I - QQ^T) g_j, rows
    hp = _apply_rows(op, proj.to(op.dtype)).to(f64)
    rest = proj * hp  # rows: per-entry g^T (I-QQ^T) H (I-QQ^T) g
    samples_entry = low.unsqueeze(0) + rest  # (g, n)
    pp_samples = _segment_sums(samples_entry, sizes).cpu()
    diag = diag_se = None
    if diagonal:
        diag, diag_se = _mean_stderr(samples_entry)
    return _estimate(op, start, "hutch++", names, pp_samples.sum(dim=1), pp_samples, diag, diag_se)
