"""Products with the Hessian of the loss w.r.t. an intermediate output ``y`` (a layer's, the model's).

Shared by the exact diagonal rules (:mod:`.layerwise`, :mod:`.piecewise`): which rows of ``y`` the rest
of the network couples (:class:`Grouping`, :func:`decoupled`), batched backward passes from ``dL/dy``
(:func:`batched_grad`) and the tolerance a rebuilt gradient must meet (:func:`close`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradmask.curvature._random import gaussian

__all__ = [
    "Grouping",
    "ModelCall",
    "backward_batched",
    "batched_grad",
    "capture_model_calls",
    "close",
    "decoupled",
    "output_hessian_blocks",
]

COUPLING_TOL = 1e-6
"""Relative size of a cross-group product entry still counted as zero."""
GRADIENT_TOL = 1e-4
"""Relative agreement a rebuilt gradient must have with autograd's."""


@dataclass
class Grouping:
    """Rows split into ``groups`` non-interacting groups of ``size`` rows each."""

    name: str
    group: Tensor  # (rows,) group index of each row
    position: Tensor  # (rows,) position of each row within its group
    groups: int
    size: int

    def table(self) -> Tensor:
        """``(groups, size)``: the row at each position of each group."""
        table = torch.empty(self.groups, self.size, dtype=torch.long)
        table[self.group, self.position] = torch.arange(self.group.numel())
        return table

    def partner(self, c: int) -> Tensor:
        """For each row, the row at position ``c`` of the same group."""
        return self.table()[self.group, c]


def decoupled(g: Tensor, y: Tensor, grouping: Grouping, gen: torch.Generator) -> tuple[bool, int]:
    """Whether the Hessian w.r.t. ``y`` has no entry across groups; and the products spent."""
    flat_shape = (grouping.group.numel(), y.numel() // grouping.group.numel())  # y's rows may have several dimensions
    bits = math.ceil(math.log2(grouping.groups)) if grouping.groups > 1 else 0
    for bit in range(bits):
        clear = ((grouping.group >> bit) & 1) == 0
        v = gaussian(flat_shape, gen, y.dtype, y.device) * clear.to(y.device, y.dtype).unsqueeze(1)
        (h,) = torch.autograd.grad(g, y, grad_outputs=v.reshape(y.shape), retain_graph=True, materialize_grads=True)
        h = h.reshape(flat_shape)
        across = h[~clear.to(h.device)]
        if across.numel() and float(across.abs().max()) > COUPLING_TOL * max(float(h.abs().max()), 1e-300):
            return False, bit + 1
    return True, bits


def batched_grad(g: Tensor, y: Tensor, probes: Tensor) -> Tensor:
    """Products of the Hessian w.r.t. ``y`` with each slice of ``probes`` (vmapped, loop fallback)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (h,) = torch.autograd.grad(g, y, grad_outputs=probes, retain_graph=True, is_grads_batched=True)
        return h
    except RuntimeError:
        return torch.stack(
            [
                torch.autograd.grad(g, y, grad_outputs=p, retain_graph=True, allow_unused=True, materialize_grads=True)[
                    0
                ]
                for p in probes
            ]
        )


def close(a: Tensor, b: Tensor) -> bool:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) <= GRADIENT_TOL * scale


@dataclass
class ModelCall:
    """The root module's call inside one closure."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Tensor


@contextlib.contextmanager
def capture_model_calls(module: nn.Module, calls: list[ModelCall]) -> Iterator[None]:
    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if isinstance(output, Tensor):
            calls.append(ModelCall(args, kwargs, output))
            return output.clone()  # in-place ops in the loss must not touch the captured output
        return output

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def output_hessian_blocks(g_f: Tensor, f: Tensor) -> Tensor:
    """``(N, C, C)`` blocks of the Hessian of the loss w.r.t. the output (rows already decoupled)."""
    n = f.shape[0]
    c = f[0].numel()
    probes = torch.zeros(c, n, c, dtype=f.dtype, device=f.device)
    probes[torch.arange(c), :, torch.arange(c)] = 1.0
    h = batched_grad(g_f, f, probes.reshape(c, *f.shape)).reshape(c, n, c)
    blocks = h.permute(1, 2, 0).to(torch.float64)  # [n, row, column]
    return 0.5 * (blocks + blocks.transpose(1, 2))


def backward_batched(f: Tensor, ys: list[Tensor], cotangents: Tensor) -> list[Tensor]:
    """``d(cot_j . f) / dy`` for every ``y`` and every slice ``j`` of ``cotangents`` (vmapped, loop fallback)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(torch.autograd.grad(f, ys, grad_outputs=cotangents, retain_graph=True,
                                            is_grads_batched=True, materialize_grads=True))
    except RuntimeError:
        rows = [torch.autograd.grad(f, ys, grad_outputs=c, retain_graph=True, materialize_grads=True) for c in cotangents]
        return [torch.stack([r[i] for r in rows]) for i in range(len(ys))]
