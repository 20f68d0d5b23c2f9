"""The reference every curvature test compares against: torch.func.hessian over all parameters."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

LossOf = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def reference_hessian(model: nn.Module, loss_of: LossOf, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.func.hessian`` of ``loss_of(model, params)`` w.r.t. every parameter, flattened in
    ``named_parameters()`` order (each parameter row-major), optionally evaluated in ``dtype``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if dtype is not None:
        flat0 = flat0.to(dtype)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = math.prod(shape)
            params[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        return loss_of(model, params)

    return hessian(loss)(flat0)


def cross_entropy_of(x: torch.Tensor, y: torch.Tensor) -> LossOf:
    """``loss_of`` for ``cross_entropy(model(x), y)``."""
    return lambda model, params: F.cross_entropy(functional_call(model, params, (x,)), y)
