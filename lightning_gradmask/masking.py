"""The one mask mechanism: zero frozen gradients, and restore frozen values exactly after a step.

Zeroing the gradient of an entry does not freeze it: momentum built up earlier and weight decay
still move it (see the design notes). :class:`FrozenEntries` therefore does two things:

* :meth:`FrozenEntries.mask_gradients_` zeroes the gradient of frozen entries, so clipping,
  gradient statistics and the optimizer's state see only trainable entries;
* :meth:`FrozenEntries.restore_` writes the values captured by :meth:`FrozenEntries.capture_`
  back into the frozen entries after an optimizer step, which makes them bit-identical to their
  captured values whatever the optimizer did.

It is pure tensor code, usable without Lightning:

    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(2, 2)
    >>> trainable = torch.tensor([[True, False], [False, True]])
    >>> frozen = FrozenEntries({"weight": (layer.weight, trainable)})
    >>> frozen.capture_()
    >>> before = layer.weight.detach().clone()
    >>> opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    >>> layer(torch.ones(1, 2)).sum().backward()
    >>> frozen.mask_gradients_()
    >>> opt.step()
    >>> frozen.restore_()
    >>> bool(torch.equal(layer.weight[~trainable], before[~trainable]))
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["FrozenEntries", "combine_trainable"]


def combine_trainable(masks: Iterable[torch.Tensor]) -> torch.Tensor:
    """An entry is trainable only if every mask lets it train (logical AND of ``bool`` masks)."""
    combined: torch.Tensor | None = None
    for mask in masks:
        combined = mask.clone() if combined is None else combined.logical_and(mask.to(combined.device))
    if combined is None:
        raise ValueError("combine_trainable needs at least one mask")
    return combined


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory seen as signed integers of the same width (no copy)."""
    return tensor.view(_INT_OF_SIZE[tensor.element_size()])


@dataclass
class _Entry:
    param: torch.Tensor
    frozen: torch.Tensor  # bool, True where the entry must not change
    all_frozen: bool
    keep_bits: torch.Tensor | None = None  # all ones where trainable, 0 where frozen (param's width)
    snapshot: torch.Tensor | None = None  # frozen values, +0.0 at trainable positions


class FrozenEntries:
    """Frozen entries of several parameters, with gradient masking and exact restore.

    Args:
        masks: ``{name: (parameter, trainable)}`` where ``trainable`` is a ``bool`` tensor of the
            parameter's shape, ``True`` where the entry may be updated. Parameters whose entries
            are all trainable are dropped: they need no work.

    Masks are moved to each parameter's device once, here. Call :meth:`capture_` before the
    first optimizer step, then :meth:`restore_` after every step.

    Memory per masked entry (float32): a ``bool`` mask (1 byte), the integer "keep" pattern used by
    the bitwise kernels (4 bytes) and the snapshot (4 bytes).
    """

    def __init__(self, masks: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._entries: dict[str, _Entry] = {}
        for name, (param, trainable) in masks.items():
            if trainable.dtype != torch.bool:
                raise TypeError(f"trainable mask for {name!r} must be bool, got {trainable.dtype}")
            if tuple(trainable.shape) != tuple(param.shape):
                raise ValueError(
                    f"trainable mask for {name!r} has shape {list(trainable.shape)}, "
                    f"parameter has {list(param.shape)}"
                )
            frozen = trainable.logical_not().to(param.device)
            if not bool(frozen.any()):
                continue
            entry = _Entry(param=param, frozen=frozen, all_frozen=bool(frozen.all()))
            if not entry.all_frozen:
                int_dtype = _INT_OF_SIZE[param.element_size()]
                entry.keep_bits = torch.zeros(param.shape, dtype=int_dtype, device=param.device).masked_fill_(~frozen, -1)
            self._entries[name] = entry

    # ------------------------------------------------------------------ inspection
    @property
    def names(self) -> list[str]:
        """Names of the parameters that have at least one frozen entry."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def frozen_mask(self, name: str) -> torch.Tensor | None:
        """The ``bool`` frozen mask of one parameter (on its device), or ``None`` if none is frozen."""
        entry = self._entries.get(name)
        return None if entry is None else entry.frozen

    def count(self) -> tuple[int, int]:
        """``(frozen entries, entries)`` over the parameters held here."""
        frozen = sum(int(e.frozen.sum()) for e in self._entries.values())
        total = sum(e.frozen.numel() for e in self._entries.values())
        return frozen, total

    @property
    def captured(self) -> bool:
        return all(e.snapshot is not None for e in self._entries.values())

    # ------------------------------------------------------------------ the mechanism
    @torch.no_grad()
    def capture_(self) -> None:
        """Record the current values of the frozen entries: :meth:`restore_` writes these back."""
        for entry in self._entries.values():
            data = entry.param.detach()
            if entry.all_frozen:
                entry.snapshot = data.clone()
            else:
                entry.snapshot = data.masked_fill(entry.frozen.logical_not(), 0)

    @torch.no_grad()
    def mask_gradients_(self, *, measure: bool = False) -> torch.Tensor | None:
        """Zero the gradient of every frozen entry, in place.

        Args:
            measure: also return the L2 norm of the gradient that was removed (one extra
                reduction per parameter; leave off on steps that do not log it).
        """
        removed_sq: torch.Tensor | None = None
        for entry in self._entries.values():
            grad = entry.param.grad
            if grad is None:
                continue
            if measure:
                part = grad.masked_select(entry.frozen) if not entry.all_frozen else grad
                sq = part.float().square().sum()
                removed_sq = sq if removed_sq is None else removed_sq + sq.to(removed_sq.device)
            if entry.all_frozen:
                grad.zero_()
            elif grad.dtype == entry.param.dtype and grad.layout == torch.strided:
                _bits(grad).bitwise_and_(entry.keep_bits)  # type: ignore[arg-type]  # frozen bits -> 0, i.e. +0.0
            else:
                grad.masked_fill_(entry.frozen, 0)
        if measure:
            return torch.zeros(()) if removed_sq is None else removed_sq.sqrt()
        return None

    @torch.no_grad()
    def restore_(self, params: set[int] | None = None) -> None:
        """Write the captured values back into the frozen entries, exactly.

        Args:
            params: if given, only parameters whose ``id`` is in this set (the ones an optimizer
                just stepped).
        """
        for name, entry in self._entries.items():
            if params is not None and id(entry.param) not in params:
                continue
            if entry.snapshot is None:
                raise RuntimeError(f"restore_ called before capture_ for parameter {name!r}")
            data = entry.param.detach()
            if entry.all_frozen:
                data.copy_(entry.snapshot)
            else:
                # Bitwise, not arithmetic: (w AND keep) OR snapshot keeps every bit of a trainable
                # entry and writes every bit of a frozen one back, inf/NaN/-0.0 included. It is also
                # an order of magnitude faster on CPU than masked_fill_ or torch.where with a
                # scattered mask (benchmarks/README.md).
                _bits(data).bitwise_and_(entry.keep_bits).bitwise_or_(_bits(entry.snapshot))  # type: ignore[arg-type]  # keep_bits is set for every entry that is not all frozen

    @torch.no_grad()
    def zero_frozen_(self) -> None:
        """Set every frozen entry to 0 (used to sever weights before capturing them)."""
        for entry in self._entries.values():
            entry.param.detach().masked_fill_(entry.frozen, 0)
