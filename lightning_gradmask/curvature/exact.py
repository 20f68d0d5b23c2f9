"""Exact Hessian statistics when the selected dimension is small enough to afford.

"Never estimate what can be afforded exactly": with ``dim`` products the whole (restricted)
Hessian is known, and trace, eigenvalues, diagonal and spectral density follow exactly.

Example::

    if op.dim <= 2000:
        H = dense_hessian(op)                    # (dim, dim) float64, symmetrized
        ex = exact_statistics(H)
        ex.trace, ex.eigenvalues[:3]
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gradmask.curvature.operator import HessianOperator, LinearOperator, NonFiniteLossError

__all__ = ["ExactStatistics", "dense_hessian", "exact_statistics"]


def dense_hessian(op: LinearOperator, *, chunk_size: int = 32) -> Tensor:
    """The full ``(dim, dim)`` float64 Hessian by ``dim`` products with unit vectors, symmetrized.

    With a :class:`HessianOperator` the products go in chunks of ``chunk_size`` rows through
    ``op.matmat``. The Hessian is linear in the loss, so the products stay local and the
    operator's ``reduce`` hook is applied once, to the whole matrix (one collective under DDP).
    """
    dim = int(op.dim)
    out = torch.empty(dim, dim, dtype=torch.float64, device=op.device)
    matmat = getattr(op, "matmat", None)
    local = op.local_products() if isinstance(op, HessianOperator) else contextlib.nullcontext()
    with local as reduce:
        for c0 in range(0, dim, chunk_size):
            c1 = min(dim, c0 + chunk_size)
            eye = torch.zeros(c1 - c0, dim, dtype=op.dtype, device=op.device)
            eye[torch.arange(c1 - c0), torch.arange(c0, c1)] = 1.0
            if matmat is not None:
                rows = matmat(eye)
            else:
                rows = torch.stack([op.matvec(e) for e in eye])
            out[c0:c1] = rows.to(torch.float64)
    if reduce is not None:
        out = reduce(out)
    if isinstance(op, HessianOperator) and op.check_finite and not bool(torch.isfinite(out).all()):
        raise NonFiniteLossError("a Hessian-vector product is not finite")
    return 0.5 * (out + out.T)


@dataclass
class ExactStatistics:
    """Trace, full spectrum (descending) and diagonal of a dense symmetric matrix."""

    trace: float
    eigenvalues: Tensor
    diagonal: Tensor


def exact_statistics(hessian: Tensor) -> ExactStatistics:
    """Exact statistics of a dense symmetric matrix (float64)."""
    h = hessian.to(torch.float64)
    h = 0.5 * (h + h.T)
    eig = torch.linalg.eigvalsh(h).flip(0)
    diag = torch.diagonal(h).clone()
    return ExactStatistics(trace=float(diag.sum()), eigenvalues=eig, diagonal=diag)
