"""Lanczos with full reorthogonalization: the algebraically largest eigenvalues of a symmetric operator.

Power iteration (PyHessian, hessian-eigenthings) converges to the eigenvalue of largest *magnitude*:
on a Hessian with a dominant negative eigenvalue it reports that negative number as "the top
eigenvalue". Lanczos builds a Krylov basis and reads the top of the spectrum off a small
tridiagonal matrix, so it returns the largest eigenvalues in the algebraic sense, and converges in
far fewer products.

Example::

    op = HessianOperator.from_module(model, closure)
    res = lanczos(op, k=3, seed=0)
    res.eigenvalues        # float64, descending: the three algebraically largest
    res.num_matvecs       # products used (early stop on convergence)
    res.stop_reason        # "converged", "invariant", "exhausted" or "num_matvecs" (ran out of matvecs)

Warm start from earlier eigenvectors (a ``(dim,)`` vector or a ``(dim, m)`` block)::

    res2 = lanczos(op, k=3, init=res.eigenvectors)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_gradmask.curvature._random import Seed, as_generator, gaussian
from lightning_gradmask.curvature.operator import LinearOperator

__all__ = ["LanczosResult", "StopReason", "default_lanczos_matvecs", "lanczos", "tridiagonal"]

StopReason = Literal["converged", "invariant", "exhausted", "num_matvecs"]
"""Why :func:`lanczos` stopped; only ``"num_matvecs"`` means the matvecs ran out before the tolerance was met."""


@dataclass
class LanczosResult:
    """Outcome of :func:`lanczos`.

    Attributes:
        eigenvalues: ``(k,)`` float64, the ``k`` algebraically largest Ritz values, descending.
        eigenvectors: ``(dim, k)`` Ritz vectors (operator dtype) if asked for, else ``None``.
        residuals: ``(k,)`` float64 residual norms ``|beta_m * s_mi|`` (``= ||H y - theta y||``) of the
            returned Ritz pairs; each eigenvalue is within this distance of a true eigenvalue.
        error_bounds: ``(k,)`` float64 ``min(residual, residual**2 / gap)``, the usual (Ritz-gap
            based, so heuristic) estimate of each eigenvalue's error; ``gap`` is the distance to the
            nearest other Ritz value *minus that value's own residual* (a Ritz value that has not
            converged yet may hide an eigenvalue closer by), and the bound is the residual itself
            when that leaves no gap.
        alphas: ``(m,)`` float64 diagonal of the tridiagonal matrix ``T_m``.
        betas: ``(m-1,)`` float64 off-diagonal of ``T_m`` (a 0 marks a restart after an invariant
            subspace was found).
        num_matvecs: operator products used (``m``).
        converged: every returned pair met the tolerance (or the Krylov space is exhausted).
        stop_reason: ``"converged"`` (tolerance met), ``"invariant"`` (restarts found no further
            eigenvalue: exact), ``"exhausted"`` (``m == dim``: exact), or ``"num_matvecs"``: the
            ``num_matvecs`` ran out first and ``converged`` is ``False`` (with ``tol=0`` that is the request).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    error_bounds: Tensor
    alphas: Tensor
    betas: Tensor
    num_matvecs: int
    converged: bool
    stop_reason: StopReason = "converged"

    def tridiagonal(self) -> Tensor:
        """The ``(m, m)`` float64 tridiagonal matrix ``T_m``."""
        return tridiagonal(self.alphas, self.betas)

    def quadrature(self) -> tuple[Tensor, Tensor]:
        """Gauss quadrature nodes and weights of the start vector's spectral measure (for SLQ).

        Nodes are the eigenvalues of ``T_m``, weights the squared first components of its
        eigenvectors; the weights sum to 1.
        """
        theta, s = torch.linalg.eigh(self.tridiagonal())
        return theta, s[0].square()


def _error_bound(theta: Tensor, residuals: Tensor, k: int) -> Tensor:
    """``min(r, r^2 / gap)`` for the top ``k`` Ritz values (``theta`` descending).

    ``gap`` of value ``i`` is ``min_j |theta_i - theta_j| - r_j`` over the other Ritz values: an
    unconverged neighbour (large ``r_j``) only says an eigenvalue lies somewhere within ``r_j`` of
    it, so the gap shrinks accordingly. Without a positive gap the bound is ``r`` (rigorous).
    """
    top_t, top_r = theta[:k], residuals[:k]
    if theta.numel() < 2:
        return top_r
    dist = (top_t.unsqueeze(1) - theta.unsqueeze(0)).abs() - residuals.unsqueeze(0)
    own = torch.arange(top_t.numel())
    dist[own, own] = float("inf")
    gap = dist.min(dim=1).values
    by_gap = torch.where(gap > 0, top_r.square() / gap.clamp_min(1e-300), top_r)
    return torch.minimum(top_r, by_gap)


def tridiagonal(alphas: Tensor, betas: Tensor) -> Tensor:
    t = torch.diag(alphas.to(torch.float64))
    if betas.numel():
        b = betas.to(torch.float64)
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    return t


def default_lanczos_matvecs(dim: int, k: int) -> int:
    """The default ``num_matvecs`` of :func:`lanczos`: ``min(dim, max(100, 30 k + 40))``.

    Generous on purpose: the iteration stops as soon as the tolerance is met, so a large limit only
    costs where it is needed, i.e. on clustered spectra (at initialization the top eigenvalues of a
    network Hessian often lie within 1-5% of each other; five of them took 121 products with
    ARPACK's restarted Lanczos and about as many here).
    """
    return min(int(dim), max(100, 30 * int(k) + 40))


def _unit(v: Tensor, what: str) -> Tensor:
    nrm = float(v.double().norm())
    if nrm == 0.0 or nrm != nrm:
        raise ValueError(f"{what} is zero or not finite")
    return v / nrm


def _start_vector(
    dim: int, init: Tensor | None, v0: Tensor | None, random_vector: Callable[[], Tensor]
) -> Tensor:
    """The first Lanczos vector: ``v0`` exactly, a warm start built from ``init``, or random."""
    if init is not None and v0 is not None:
        raise ValueError("pass either v0 (the exact start vector) or init (a warm start), not both")
    if v0 is not None:
        q = v0.reshape(-1)
        if q.shape[0] != dim:
            raise ValueError(f"v0 has length {q.shape[0]}, expected {dim}")
        return _unit(q.to(random_vector().dtype), "the start vector v0")
    noise = _unit(random_vector(), "the random start vector")
    if init is None:
        return noise
    block = init.reshape(dim, -1) if init.ndim == 1 else init
    if block.ndim != 2 or block.shape[0] != dim:
        raise ValueError(f"init must have shape ({dim},) or ({dim}, m), got {tuple(init.shape)}")
    cols = block.to(device=noise.device, dtype=noise.dtype)
    norms = cols.double().norm(dim=0)
    if bool((norms == 0).any()) or not bool(torch.isfinite(norms).all()):
        raise ValueError("init has a zero or non-finite column")
    warm = _unit((cols / norms.to(cols.dtype)).sum(dim=1), "the sum of the init columns")
    # A little randomness keeps the Krylov space from being confined to span(init), so an
    # eigenvalue the warm start missed is still found.
    return _unit(warm + _WARM_NOISE * noise, "the warm start vector")


_WARM_NOISE = 0.1
_CONFIRM_FRACTION = 0.25


class _Basis:
    """Orthonormal Lanczos vectors, stored row-wise in a buffer that grows as needed."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, capacity: int) -> None:
        self.rows = torch.empty((min(capacity, 32), dim), dtype=dtype, device=device)
        self.size = 0
        self.capacity = capacity

    def append(self, q: Tensor) -> None:
        if self.size == self.rows.shape[0]:
            grow = min(self.capacity, 2 * self.rows.shape[0]) - self.rows.shape[0]
            self.rows = torch.cat([self.rows, self.rows.new_empty((grow, self.rows.shape[1]))])
        self.rows[self.size] = q
        self.size += 1

    @property
    def active(self) -> Tensor:
        return self.rows[: self.size]

    def orthogonalize(self, w: Tensor) -> tuple[Tensor, float]:
        """``w`` minus its projection on the basis, and the norm left.

        One classical Gram-Schmidt pass, a second only when the first removed most of ``w``
        (Kahan-Parlett "twice is enough"): orthogonal to working precision at about half the
        memory traffic of always doing two passes.
        """
        qs = self.active
        before = float(w.double().norm())
        w = w - qs.T @ (qs @ w)
        beta = float(w.double().norm())
        if beta < 0.7071 * before:
            w = w - qs.T @ (qs @ w)
            beta = float(w.double().norm())
        return w, beta


@dataclass
class _Ritz:
    theta: Tensor  # descending
    vectors: Tensor  # eigenvectors of T, columns aligned with theta
    residuals: Tensor


def _ritz(alphas: list[float], betas: list[float], beta: float) -> _Ritz:
    t = tridiagonal(torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64))
    theta, s = torch.linalg.eigh(t)  # ascending
    theta, s = theta.flip(0), s.flip(1)
    return _Ritz(theta, s, beta * s[-1].abs())


def _tolerance_met(ritz: _Ritz, k: int, tol: float, criterion: str, scale: float) -> bool:
    top = ritz.theta[:k]
    bound = _error_bound(ritz.theta, ritz.residuals, k) if criterion == "gap" else ritz.residuals[:k]
    limit = torch.maximum(tol * top.abs(), torch.full_like(top, 1e-12 * max(scale, 1e-300)))
    return bool((bound <= limit).all())


class _Confirmation:
    """Stop only when the tolerance has held, with the top ``k`` unmoved, for a while.

    A single start vector can have almost no component along one of the top eigenvectors (likely in
    a cluster): that eigenvalue then stays invisible for many steps while the others converge, and
    every bound looks fine. It shows up once the Krylov space is large enough; on the clustered
    ``mlp_100k`` spectrum a fifth eigenvalue missed at 91 products appeared at 110. So the first
    time the tolerance is met at step ``m``, the iteration goes on for ``ceil(m / 4)`` more steps
    and stops only if the tolerance still holds and none of the top ``k`` moved by more than
    ``tol`` (relative) meanwhile; otherwise the count starts again. A heuristic (no finite Krylov
    method can rule out a hidden eigenvalue); its cost in matvecs is in ``benchmarks/README.md``.
    """

    def __init__(self, k: int, tol: float) -> None:
        self.k, self.tol = k, tol
        self.met_at: int | None = None
        self.met_top: Tensor | None = None

    def confirmed(self, m: int, ritz: _Ritz, met: bool) -> bool:
        top = ritz.theta[: self.k]
        if not met:
            self.met_at = self.met_top = None
            return False
        if self.met_top is None or bool(((top - self.met_top).abs() > self.tol * top.abs()).any()):
            self.met_at, self.met_top = m, top.clone()
            return False
        assert self.met_at is not None
        return m >= self.met_at + math.ceil(self.met_at * _CONFIRM_FRACTION)


def _validate(dim: int, k: int, num_matvecs: int | None, criterion: str) -> int:
    if k < 1:
        raise ValueError("k must be at least 1")
    if k > dim:
        raise ValueError(f"k={k} exceeds the operator dimension {dim}")
    if criterion not in ("gap", "residual"):
        raise ValueError(f"criterion must be 'gap' or 'residual', got {criterion!r}")
    limit = default_lanczos_matvecs(dim, k) if num_matvecs is None else min(int(num_matvecs), dim)
    if limit < k:
        raise ValueError(f"num_matvecs={limit} is smaller than k={k}")
    return limit


def lanczos(
    op: LinearOperator,
    k: int = 1,
    *,
    num_matvecs: int | None = None,
    tol: float = 1e-4,
    seed: Seed = 0,
    v0: Tensor | None = None,
    init: Tensor | None = None,
    return_eigenvectors: bool = False,
    restart: bool = True,
    criterion: Literal["gap", "residual"] = "gap",
) -> LanczosResult:
    """The ``k`` algebraically largest eigenvalues of a symmetric operator, by Lanczos.

    Every new Lanczos vector is orthogonalized against all previous ones (full
    reorthogonalization), so no spurious copies of converged eigenvalues appear. If the Krylov space
    becomes invariant before ``k`` eigenvalues are found, the iteration restarts with a fresh random
    vector orthogonal to the basis (so repeated eigenvalues are found with their multiplicity).
    The iteration only stops early when *every one* of the ``k`` values meets the tolerance and has
    kept meeting it, unmoved, for another quarter of the steps taken (a hidden eigenvalue, e.g. in
    a cluster, shows up in that time); if the matvecs run out first, the result says so
    (``converged=False``, ``stop_reason="num_matvecs"``).

    Args:
        op: the operator (:class:`HessianOperator`, :class:`MatrixOperator`, ...).
        k: number of eigenvalues wanted.
        num_matvecs: most matvecs to spend, an upper bound (default :func:`default_lanczos_matvecs`:
            ``min(dim, max(100, 30k + 40))``; the products are only spent if needed).
        tol: relative accuracy wanted for each of the ``k`` top eigenvalues. With the residual norm
            ``r = |beta_m * (last component of the Ritz vector)|`` (``= ||H y - theta y||``) and
            ``gap`` the distance from ``theta`` to the nearest other Ritz value less that value's
            residual, the iteration stops when ``min(r, r**2 / gap) <= tol * |theta|``
            (``criterion="gap"``, the default: the Ritz value error is about ``r**2 / gap``) or
            when ``r <= tol * |theta|`` (``criterion="residual"``: a rigorous but much more
            expensive bound, since ``|theta - lambda| <= r`` always holds). ``tol=0`` runs all
            ``num_matvecs`` steps (what stochastic Lanczos quadrature wants).
        seed: ``int`` or CPU ``torch.Generator`` for the start vector; the same seed gives the same
            vector on every process.
        v0: explicit start vector, used exactly (``seed`` then only draws restart vectors); what
            quadrature wants.
        init: warm start, e.g. the previous call's ``eigenvectors``: a ``(dim,)`` vector or a
            ``(dim, m)`` block. The start vector is the sum of its normalized columns plus a 10%
            random component (from ``seed``), so the top eigenvalues converge in fewer products
            when the warm start is good, and are still found when it is not.
        return_eigenvectors: also return the Ritz vectors, ``(dim, k)``.
        criterion: ``"gap"`` or ``"residual"``, see ``tol``.
        restart: on an invariant Krylov space, continue from a fresh orthogonal random vector
            (default). ``False`` stops there instead (the quadrature of the start vector is then exact).

    Returns:
        A :class:`LanczosResult`; ``alphas``/``betas`` can be reused for quadrature (SLQ).

    Example::

        res = lanczos(op, k=2, tol=1e-6, seed=123)
        top, second = res.eigenvalues.tolist()
        if not res.converged:       # res.stop_reason == "num_matvecs"
            res = lanczos(op, k=2, tol=1e-6, num_matvecs=4 * res.num_matvecs, init=res.eigenvectors)
    """
    dim = int(op.dim)
    limit = _validate(dim, k, num_matvecs, criterion)
    dtype, device = op.dtype, op.device
    gen = as_generator(seed)

    def random_vector() -> Tensor:
        return gaussian((dim,), gen, dtype, device)

    q = _start_vector(dim, init, v0, random_vector)
    basis = _Basis(dim, dtype, device, limit)
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0  # running estimate of ||T||, for breakdown tests
    stop: StopReason = "num_matvecs"
    last_invariant_top: Tensor | None = None
    watch = _Confirmation(k, tol)
    while True:
        basis.append(q)
        w = op.matvec(q)
        alpha = float(torch.dot(q.double(), w.double()))
        alphas.append(alpha)
        w, beta = basis.orthogonalize(w - alpha * q - (betas[-1] * basis.rows[basis.size - 2] if betas else 0.0))
        scale = max(scale, abs(alpha) + beta + (betas[-1] if betas else 0.0))
        m = len(alphas)
        ritz = _ritz(alphas, betas, beta)
        if m == dim:
            stop = "exhausted"
            break
        invariant = beta <= 1e-10 * max(scale, 1e-300)
        if invariant:
            # The Krylov space is invariant: its Ritz values are exact eigenvalues, but eigenvalues
            # outside it (e.g. a second copy of a repeated one) are unseen. Restart orthogonally
            # and stop once a whole restart block leaves the top k unchanged.
            top = ritz.theta[: min(k, m)].clone()
            if not restart or _same_top(top, last_invariant_top, m >= k, scale):
                stop = "invariant"
                break
            last_invariant_top = top
        elif m >= k and tol > 0 and watch.confirmed(m, ritz, _tolerance_met(ritz, k, tol, criterion, scale)):
            stop = "converged"
            break
        if m == limit:
            if watch.met_at is not None:  # met now, not yet confirmed: still within tolerance
                stop = "converged"
            break
        q = _next_vector(w, beta, invariant, basis, random_vector)
        betas.append(0.0 if invariant else beta)
    return _result(basis, alphas, betas, ritz, k, stop, return_eigenvectors)


def _same_top(top: Tensor, previous: Tensor | None, enough: bool, scale: float) -> bool:
    if not enough or previous is None or previous.shape != top.shape:
        return False
    return torch.allclose(top, previous, rtol=1e-10, atol=1e-12 * max(scale, 1e-300))


def _next_vector(w: Tensor, beta: float, invariant: bool, basis: _Basis, random_vector: Callable[[], Tensor]) -> Tensor:
    if not invariant:
        return w / beta
    fresh = random_vector()
    for _ in range(2):
        fresh = fresh - basis.active.T @ (basis.active @ fresh)
    return fresh / float(fresh.double().norm())


def _result(
    basis: _Basis,
    alphas: list[float],
    betas: list[float],
    ritz: _Ritz,
    k: int,
    stop: StopReason,
    return_eigenvectors: bool,
) -> LanczosResult:
    m = len(alphas)
    vectors = None
    if return_eigenvectors:
        s = ritz.vectors[:, :k].to(basis.rows.device)
        vectors = (basis.active.T.double() @ s).to(basis.rows.dtype)
    return LanczosResult(
        eigenvalues=ritz.theta[:k].clone(),
        eigenvectors=vectors,
        residuals=ritz.residuals[:k].clone(),
        error_bounds=_error_bound(ritz.theta, ritz.residuals, k).clone(),
        alphas=torch.tensor(alphas, dtype=torch.float64),
        betas=torch.tensor(betas[: m - 1], dtype=torch.float64),
        num_matvecs=m,
        converged=stop != "num_matvecs" and m >= k,
        stop_reason=stop,
    )
