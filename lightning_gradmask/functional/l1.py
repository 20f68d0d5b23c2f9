"""Masked L1: the penalty, its proximal step, and the share of exact zeros, as pure tensor math.

No Lightning here: these functions work on any tensors and are what
:class:`~lightning_gradmask.mixins.masked_l1.MaskedL1Mixin` calls. A *mask* selects the entries an L1 term
applies to and may weight them:

* ``None``: every entry, weight 1;
* a ``bool`` tensor of the parameter's shape: the ``True`` entries, weight 1;
* a real tensor of the parameter's shape: entry ``j`` has weight ``|mask[j]|``; entries where the
  mask is 0 are not selected.

Example:
    >>> import torch

    >>> w = torch.tensor([[0.5, -2.0], [0.05, 1.0]], requires_grad=True)
    >>> mask = torch.tensor([[True, True], [True, False]])
    >>> masked_l1_penalty([w], [mask], [0.1])  # 0.1 * (0.5 + 2.0 + 0.05)
    tensor(0.2550, grad_fn=<MulBackward0>)
    >>> _ = proximal_l1_step_(w, mask, threshold=0.1)
    >>> w.detach()
    tensor([[ 0.4000, -1.9000],
            [ 0.0000,  1.0000]])
    >>> masked_zero_fraction([w], [mask])  # one of the three selected entries is 0
    tensor(0.3333)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch

from lightning_gradmask.errors import GradmaskConfigError
from lightning_gradmask.functional.sharding import is_sharded, local_of, local_tensor, shard_like, sharded_sum

__all__ = [
    "check_strength",
    "masked_l1_penalty",
    "mask_support",
    "masked_zero_fraction",
    "proximal_l1_step_",
]


def check_strength(strength: float, where: str) -> float:
    """Return ``strength`` as a float, or raise ``ValueError`` naming ``where``.

    A strength must be a finite real number ``>= 0`` (``bool`` is refused).
    """
    if isinstance(strength, bool) or not isinstance(strength, Real):
        raise GradmaskConfigError(f"{where}: strength must be a real number >= 0; got {type(strength).__name__} {strength!r}")
    value = float(strength)
    if not math.isfinite(value) or value < 0:
        raise GradmaskConfigError(f"{where}: strength must be a finite number >= 0; got {value!r}")
    return value


def mask_support(mask: torch.Tensor) -> torch.Tensor:
    """The entries a mask selects: the mask itself if ``bool``, else where it is nonzero."""
    return mask if mask.dtype == torch.bool else mask.ne(0)


def masked_l1_penalty(
    params: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    strengths: Sequence[float],
) -> torch.Tensor:
    """``sum_i strengths[i] * sum(|masks[i] * params[i]|)``, differentiable in the parameters.

    The gradient of term ``i`` with respect to ``params[i]`` is ``strengths[i] * mask * sign(W)``:
    exactly 0 at entries the mask does not select. Masks must already be on their parameter's
    device. A parameter may appear in several terms; its terms add up.

    A sharded (FSDP2 ``DTensor``) parameter takes a whole mask of its global shape, or a ``DTensor``
    mask placed like it; its term is the global one (summed over the shards, the same on every
    process, its gradient reaching each process's own shard), so the penalty equals the unsharded one.

    Returns:
        A 0-dim tensor on the first parameter's device (a CPU zero when there are no terms).

    Example:
        >>> w = torch.tensor([1.0, -3.0])
        >>> masked_l1_penalty([w, w], [None, torch.tensor([0.0, 0.5])], [1.0, 2.0])  # 4 + 2 * 1.5
        tensor(7.)
    """
    if not len(params) == len(masks) == len(strengths):
        raise ValueError(
            f"masked_l1_penalty needs one mask and one strength per parameter; got {len(params)} "
            f"parameters, {len(masks)} masks, {len(strengths)} strengths"
        )
    total: torch.Tensor | None = None
    for param, mask, strength in zip(params, masks, strengths):
        if mask is not None and is_sharded(param) and not is_sharded(mask):
            mask = shard_like(mask, like=param)
        selected = param if mask is None else param * mask
        term = selected.abs().sum() * strength
        if is_sharded(term):
            term = term.full_tensor()  # type: ignore[attr-defined]  # a differentiable sum over the shards
        total = term if total is None else total + term
    return torch.zeros(()) if total is None else total


@torch.no_grad()
def proximal_l1_step_(param: torch.Tensor, mask: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """Soft-threshold the selected entries of ``param`` in place and return it.

    ``W <- sign(W) * max(|W| - threshold * |mask|, 0)`` on the entries the mask selects; the other
    entries are left bit-identical. This is the proximal operator of
    ``threshold * sum(|mask * W|)``: after an SGD step with learning rate ``lr``, use
    ``threshold = lr * strength``. Entries whose magnitude is at most their threshold become exactly 0.

    Args:
        param: the tensor to update (a ``Parameter`` is updated through ``.detach()``, outside autograd;
            a sharded ``DTensor`` through its local shard).
        mask: ``None`` (every entry), a ``bool`` tensor, or real per-entry weights, on ``param``'s device
            (for a sharded ``param``, a whole mask of its global shape or a ``DTensor`` placed like it).
        threshold: a number ``>= 0``.
    """
    data = local_tensor(param.detach())
    if mask is not None:
        mask = local_of(mask, like=param)
    if mask is None:
        data.copy_(data.abs().sub_(threshold).clamp_min_(0).mul_(data.sign()))
        return param
    if mask.dtype == torch.bool:
        shrunk = data.abs().sub_(threshold)
    else:
        shrunk = data.abs().sub_(mask.abs() * threshold)
    shrunk.clamp_min_(0).mul_(data.sign())
    data.copy_(torch.where(mask_support(mask), shrunk, data))
    return param


@torch.no_grad()
def masked_zero_fraction(params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The fraction of selected entries that are exactly 0, over all ``(param, mask)`` pairs.

    Each pair counts its own selected entries: pass each parameter once, with the union of its
    masks, to count an entry once. Returns a 0-dim float tensor (0 when nothing is selected).
    Sharded (FSDP2) parameters take whole masks or ``DTensor`` masks placed like them; their counts are
    summed over the shards.
    """
    counts: list[torch.Tensor] = []  # per parameter: (exact zeros, selected entries) of its local shard
    for param, mask in zip(params, masks):
        local = local_tensor(param.detach())
        is_zero = local.eq(0)
        if mask is None:
            support_size = torch.tensor(local.numel(), device=local.device)
        else:
            support = mask_support(local_of(mask, like=param)).to(local.device)
            is_zero.logical_and_(support)
            support_size = support.sum()
        counts.append(torch.stack([is_zero.sum(), support_size]))
    if not counts:
        return torch.zeros(())
    device = counts[0].device
    # both sums in one all-reduce per placement of sharded parameters (this runs every training step)
    zeros, selected = sharded_sum([count.to(device) for count in counts], params)
    # no host sync: when nothing is selected, zeros is 0 too and the result is 0
    return zeros.to(torch.float32) / selected.clamp_min(1)
