"""A low-rank part of the Hessian w.r.t. a layer output, known in factored form from the model output.

Used by the layerwise rule (:mod:`.layerwise`) for layers whose rows (tokens) are coupled only
through a smooth per-sample map to the model output, such as the output projection and the
feed-forward layers of a transformer block whose tokens meet again in a mean before the head. Let
``f`` be the model output (``N`` samples of ``C`` entries), ``lambda_nc, u_nc`` the eigenpairs of
sample ``n``'s ``C x C`` block of ``d2L/df2``, and ``s_c = d(sum_n u_nc . f_n) / dy`` at a layer
output ``y`` (one batched backward pass for every ``c``). With ``P_n`` keeping the rows of ``y``
that a grouping assigns to sample ``n``::

    G = sum_{n,c} lambda_nc (P_n s_c) (P_n s_c)^T

Where ``f_n`` depends only on sample ``n``'s rows, ``G`` is the Gauss-Newton matrix ``J^T H_f J``
and ``H_y - G`` holds only the second derivatives of the maps between ``y`` and ``f``, which couple
no two rows when those maps act token by token (LayerNorm, ReLU, the feed-forward layers) and the
tokens meet only linearly (a mean). Nothing of that is assumed: ``G`` is simply a matrix whose
products and whose contribution to the diagonal are computed exactly, and the caller checks that
``H_y - G`` couples no two rows (:func:`residual_decoupled`). Then, for ``y = x W^T + b``::

    d2L/dW_ij^2 = sum_r x_rj^2 (H_y - G)[(r, i), (r, i)] + sum_{n,c} lambda_nc (sum_{r in n} s_c[r, i] x_rj)^2

``out_features`` products with ``H_y`` for the first sum (all rows at once), instead of one per
column and position in a group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gradmask.curvature._output_hessian import COUPLING_TOL, Grouping, backward_batched, output_hessian_blocks
from lightning_gradmask.curvature._random import gaussian

__all__ = ["LowRankPart", "OutputFactors", "residual_decoupled"]

_CHUNK_BYTES = 64 * 2**20  # per-sample gradient products held at once
_FACTOR_BYTES = 512 * 2**20  # the factors of one layer output, float64
ROUNDING_ULPS = 50
"""Cancellation in ``H_y v - G v`` tolerated, in units of the precision of ``y`` (6e-6 in float32)."""


@dataclass
class LowRankPart:
    """``G = sum_{n,c} lam[n, c] (P_n s[c]) (P_n s[c])^T`` at a layer output of ``rows x out`` entries.

    ``lam``: ``(N, C)``; ``s``: ``(C, rows, out)``, both float64; ``samples``: the grouping that
    assigns rows to samples (group ``n`` = sample ``n``).
    """

    lam: Tensor
    s: Tensor
    samples: Grouping

    def matvec(self, v: Tensor) -> Tensor:
        """``G v`` for ``v`` of shape ``(rows, out)`` (float64)."""
        group = self.samples.group.to(self.s.device)
        per_row = torch.einsum("cro,ro->rc", self.s, v.to(self.s.dtype))
        coeff = torch.zeros_like(self.lam).index_add_(0, group, per_row)
        return torch.einsum("rc,cro->ro", (self.lam * coeff)[group], self.s)

    def _column_sums(self) -> Tensor:
        """``(N, C, out)``: ``sum_{r in n} s[c, r, i]``."""
        group = self.samples.group.to(self.s.device)
        n, c = self.lam.shape
        return torch.zeros(n, c, self.s.shape[2], dtype=self.s.dtype, device=self.s.device).index_add_(
            0, group, self.s.transpose(0, 1)
        )

    def column_products(self) -> Tensor:
        """``(out, rows)``: entry ``[i, r]`` is ``(G v_i)[r, i]`` with ``v_i`` one on column ``i`` of every row."""
        group = self.samples.group.to(self.s.device)
        weighted = self.lam.unsqueeze(2) * self._column_sums()  # (N, C, out)
        return torch.einsum("rco,cro->or", weighted[group], self.s)

    def layer_terms(self, x: Tensor, elementwise: bool = False) -> tuple[Tensor, Tensor]:
        """``G``'s share of the weight and bias diagonals of ``y = x W^T + b`` (``x``: ``(rows, in)`` float64).

        ``elementwise``: of ``y = x * w + b`` instead (LayerNorm with ``x`` normalized, ``w`` a vector).
        """
        n, c = self.lam.shape
        out, inp = self.s.shape[2], x.shape[1]
        table = self.samples.table().to(self.s.device)  # (N, S)
        s = self.s[:, table]  # (C, N, S, out)
        xs = x.to(self.s.dtype)[table]  # (N, S, in)
        diag_b = (self.lam.unsqueeze(2) * self._column_sums().square()).sum(dim=(0, 1))
        if elementwise:
            per_sample = torch.einsum("cnso,nso->nco", s, xs)
            return torch.einsum("nc,nco->o", self.lam, per_sample.square()), diag_b
        diag_w = torch.zeros(out, inp, dtype=self.s.dtype, device=self.s.device)
        step = max(1, _CHUNK_BYTES // max(1, c * out * inp * self.s.element_size()))
        for n0 in range(0, n, step):
            per_sample = torch.einsum("cnso,nsj->ncoj", s[:, n0 : n0 + step], xs[n0 : n0 + step])
            diag_w += torch.einsum("nc,ncoj->oj", self.lam[n0 : n0 + step], per_sample.square())
        return diag_w, diag_b


def residual_decoupled(g: Tensor, y: Tensor, part: LowRankPart, gen: torch.Generator) -> tuple[bool, int]:
    """Whether ``H_y - G`` has no entry between two rows of ``y``; and the products with ``H_y`` spent.

    ``ceil(log2(rows))`` products: a random vector supported on the rows whose index has bit ``k``
    clear must map to 0 on the other rows, to ``COUPLING_TOL`` relative to the products' size, or
    ``ROUNDING_ULPS`` units of ``y``'s precision when larger (``H_y v - G v`` cancels: on a trained
    float32 transformer block it left up to 8e-7 where the rows are independent, against 0.2-1
    where they are not). ``H_y - G`` is symmetric, so that covers every pair of rows.
    """
    tol = max(COUPLING_TOL, ROUNDING_ULPS * torch.finfo(y.dtype).eps)
    rows, out = part.samples.group.numel(), y.shape[-1]
    index = torch.arange(rows, device=y.device)
    bits = math.ceil(math.log2(rows)) if rows > 1 else 0
    for bit in range(bits):
        clear = ((index >> bit) & 1) == 0
        v = gaussian((rows, out), gen, y.dtype, y.device) * clear.to(y.dtype).unsqueeze(1)
        (h,) = torch.autograd.grad(g, y, grad_outputs=v.reshape(y.shape), retain_graph=True, materialize_grads=True)
        hv = h.reshape(rows, out).to(part.s.dtype)
        gv = part.matvec(v)
        scale = max(float(hv.abs().max()), float(gv.abs().max()), 1e-300)
        across = (hv - gv)[~clear]
        if across.numel() and float(across.abs().max()) > tol * scale:
            return False, bit + 1
    return True, bits


class OutputFactors:
    """The model output's per-sample Hessian blocks (eigenpairs) and the factors ``s_c`` at layer outputs.

    Computed on first use, for every layer output in ``ys`` at once: ``C`` products with the
    Hessian w.r.t. the output for the blocks, then one batched backward pass from the output with
    ``C`` cotangents (counted as ``C`` more products in :attr:`num_matvecs`). Layer outputs whose
    ``C`` factors would take more than ``_FACTOR_BYTES`` are left out (:meth:`covers`).
    """

    def __init__(self, f: Tensor, g_f: Tensor, ys: dict[int, Tensor]) -> None:
        self.f, self.g_f = f, g_f
        self.outputs = int(f[0].numel())
        self.ys = {k: y for k, y in ys.items() if self.outputs * y.numel() * 8 <= _FACTOR_BYTES}
        self.num_matvecs = 0
        self._factors: dict[int, tuple[Tensor, Tensor]] | None = None

    def covers(self, key: int) -> bool:
        return key in self.ys

    def part(self, key: int, samples: Grouping) -> LowRankPart:
        """``G`` at the output of layer ``key`` with rows assigned to samples by ``samples``."""
        if self._factors is None:
            self._factors = self._compute()
        lam, s = self._factors[key]
        return LowRankPart(lam, s, samples)

    def _compute(self) -> dict[int, tuple[Tensor, Tensor]]:
        f, c = self.f, self.outputs
        lam, vecs = torch.linalg.eigh(output_hessian_blocks(self.g_f, f).detach())  # (N, C), (N, C, C)
        cot = vecs.permute(2, 0, 1).to(f.dtype).reshape(c, *f.shape)  # cotangent j: u_nj on sample n
        keys = list(self.ys)
        factors = backward_batched(f, [self.ys[k] for k in keys], cot)
        self.num_matvecs += 2 * c
        return {
            k: (lam, s.detach().reshape(c, -1, self.ys[k].shape[-1]).to(torch.float64))
            for k, s in zip(keys, factors)
        }
