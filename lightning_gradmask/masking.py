"""The one mask mechanism: zero frozen gradients, and restore frozen values exactly after a step.

Zeroing the gradient of an entry does not freeze it: momentum built up earlier and weight decay
still move it (see the design notes). :class:`FrozenEntries` therefore does two things:

* :meth:`FrozenEntries.mask_gradients_` zeroes the gradient of frozen entries, so clipping,
  gradient statistics and the optimizer's state see only trainable entries;
* :meth:`FrozenEntries.restore_` writes the values captured by :meth:`FrozenEntries.capture_`
  back into the frozen entries after an optimizer step, which makes them bit-identical to their
  captured values whatever the optimizer did.

Both are integer arithmetic on the tensors' bits, grouped across parameters (``torch._foreach_*``)
so that a model with thousands of small tensors pays for bytes rather than for calls.

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
    """An entry is trainable only if every mask lets it train (logical AND of ``bool`` masks).

    A single mask is returned as it is (no copy); several give a new tensor.
    """
    combined: torch.Tensor | None = None
    for mask in masks:
        combined = mask if combined is None else combined.logical_and(mask.to(combined.device))
    if combined is None:
        raise ValueError("combine_trainable needs at least one mask")
    return combined


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: Entries per slice when the removed gradient's norm is measured: the only transient buffer is one
#: slice (256 KiB for float32), however large the parameter.
_MEASURE_SLICE = 1 << 16

#: Parameters with at most this many entries are restored with grouped (``torch._foreach_*``) kernels,
#: larger ones with one fused ``addcmul`` pass each (fewer bytes moved, one call is cheap next to them).
_GROUPED_MAX_NUMEL = 1 << 16


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory seen as signed integers of the same width (no copy)."""
    return tensor.view(_INT_OF_SIZE[tensor.element_size()])


@dataclass
class _Entry:
    param: torch.Tensor
    all_frozen: bool
    num_frozen: int
    keep: torch.Tensor | None = None  # integers of the param's width: 1 where trainable, 0 where frozen
    snapshot: torch.Tensor | None = None  # frozen values, +0.0 at trainable positions
    # integer views of the parameter's and the snapshot's memory, made once at capture_
    param_bits: torch.Tensor | None = None
    snapshot_bits: torch.Tensor | None = None


class FrozenEntries:
    """Frozen entries of several parameters, with gradient masking and exact restore.

    Args:
        masks: ``{name: (parameter, trainable)}`` where ``trainable`` is a ``bool`` tensor of the
            parameter's shape, ``True`` where the entry may be updated. Parameters whose entries
            are all trainable are dropped: they need no work.

    The masks are turned into integer "keep" patterns on each parameter's device once, here; the
    ``bool`` masks given are not kept. Call :meth:`capture_` before the first optimizer step, then
    :meth:`restore_` after every step.

    Memory per masked entry (float32), on the parameter's device: the integer keep pattern used by the
    bit-exact kernels (4 bytes) and the snapshot (4 bytes). A fully frozen parameter needs only its
    snapshot. The caller's ``bool`` mask (1 byte) is the third part of the documented 9 bytes.
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
            num_frozen = trainable.numel() - int(trainable.sum())
            if num_frozen == 0:
                continue
            entry = _Entry(param=param, all_frozen=num_frozen == trainable.numel(), num_frozen=num_frozen)
            if not entry.all_frozen:
                int_dtype = _INT_OF_SIZE[param.element_size()]
                entry.keep = trainable.to(device=param.device, dtype=int_dtype)
            self._entries[name] = entry
        self._last_selection: tuple[object, list[_Entry]] | None = None

    # ------------------------------------------------------------------ inspection
    @property
    def names(self) -> list[str]:
        """Names of the parameters that have at least one frozen entry."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def frozen_mask(self, name: str) -> torch.Tensor | None:
        """The ``bool`` frozen mask of one parameter (on its device), or ``None`` if none is frozen.

        Built on each call from the keep pattern (no ``bool`` copy is held); to zero the frozen
        positions of a tensor, :meth:`zero_frozen_in_` needs no mask at all.
        """
        entry = self._entries.get(name)
        if entry is None:
            return None
        if entry.all_frozen:
            return torch.ones(entry.param.shape, dtype=torch.bool, device=entry.param.device)
        assert entry.keep is not None
        return entry.keep.eq(0)

    def count(self) -> tuple[int, int]:
        """``(frozen entries, entries)`` over the parameters held here."""
        frozen = sum(e.num_frozen for e in self._entries.values())
        total = sum(e.param.numel() for e in self._entries.values())
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
            entry.snapshot = data.clone()
            if not entry.all_frozen:
                assert entry.keep is not None
                # snapshot bits * (1 - keep): frozen bits stay, trainable ones become 0 (+0.0)
                bits = _bits(entry.snapshot)
                torch.addcmul(bits, bits, entry.keep, value=-1, out=bits)  # one pass, no temporary
                entry.param_bits = _bits(data)
                entry.snapshot_bits = bits
        self._last_selection = None

    @torch.no_grad()
    def zero_frozen_in_(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Set the frozen positions of ``tensor`` (parameter ``name``'s shape and dtype) to +0.0, in place.

        A parameter with no frozen entry leaves ``tensor`` unchanged. Returns ``tensor``.
        """
        entry = self._entries.get(name)
        if entry is None:
            return tensor
        if entry.all_frozen:
            return tensor.zero_()
        assert entry.keep is not None
        if tensor.dtype == entry.param.dtype and tensor.layout == torch.strided:
            _bits(tensor).mul_(entry.keep)
        else:
            tensor.masked_fill_(entry.keep.eq(0), 0)
        return tensor

    @torch.no_grad()
    def mask_gradients_(self, *, measure: bool = False) -> torch.Tensor | None:
        """Zero the gradient of every frozen entry, in place.

        Args:
            measure: also return the L2 norm of the gradient that was removed, computed slice by
                slice into one small buffer (no copy of the frozen gradients); leave off on steps
                that do not log it.
        """
        removed_sq: torch.Tensor | None = None
        grouped: list[torch.Tensor] = []
        keeps: list[torch.Tensor] = []
        for entry in self._entries.values():
            grad = entry.param.grad
            if grad is None:
                continue
            if measure:
                sq = _frozen_square_sum(grad, entry)
                removed_sq = sq if removed_sq is None else removed_sq + sq.to(removed_sq.device)
            if entry.all_frozen:
                grad.zero_()
            elif grad.dtype == entry.param.dtype and grad.layout == torch.strided:
                assert entry.keep is not None
                grouped.append(_bits(grad))  # integer multiply by 1/0: every bit kept, or +0.0
                keeps.append(entry.keep)
            else:
                assert entry.keep is not None
                grad.masked_fill_(entry.keep.eq(0), 0)
        if grouped:
            torch._foreach_mul_(grouped, keeps)
        if measure:
            return torch.zeros(()) if removed_sq is None else removed_sq.sqrt().float()
        return None

    @torch.no_grad()
    def restore_(self, params: set[int] | None = None) -> None:
        """Write the captured values back into the frozen entries, exactly.

        Args:
            params: if given, only parameters whose ``id`` is in this set (the ones an optimizer
                just stepped). The selection is remembered for the set object last passed, so a
                caller that passes the same set every step pays for it once.
        """
        entries = self._select(params)
        small_bits: list[torch.Tensor] = []
        small_keep: list[torch.Tensor] = []
        small_snap: list[torch.Tensor] = []
        for entry in entries:
            if entry.snapshot is None:
                raise RuntimeError(
                    f"restore_ called before capture_ for parameter {self._name_of(entry)!r}"
                )
            if entry.all_frozen:
                entry.param.detach().copy_(entry.snapshot)
                continue
            bits = entry.param_bits
            assert bits is not None and entry.keep is not None and entry.snapshot_bits is not None
            if bits.data_ptr() != entry.param.data_ptr():  # the parameter's memory was replaced
                bits = entry.param_bits = _bits(entry.param.detach())
            # Integer arithmetic, not float: w * keep + snapshot keeps every bit of a trainable entry
            # and writes every bit of a frozen one back, inf/NaN/-0.0 included (at each position one
            # of the two terms is 0). It is also an order of magnitude faster on CPU than
            # masked_fill_ or torch.where with a scattered mask (benchmarks/README.md).
            if bits.numel() <= _GROUPED_MAX_NUMEL:
                small_bits.append(bits)
                small_keep.append(entry.keep)
                small_snap.append(entry.snapshot_bits)
            else:
                torch.addcmul(entry.snapshot_bits, bits, entry.keep, out=bits)
        if small_bits:
            torch._foreach_mul_(small_bits, small_keep)
            torch._foreach_add_(small_bits, small_snap)

    @torch.no_grad()
    def zero_frozen_(self) -> None:
        """Set every frozen entry to 0 (used to sever weights before capturing them)."""
        for name, entry in self._entries.items():
            self.zero_frozen_in_(name, entry.param.detach())
        self._last_selection = None

    # ------------------------------------------------------------------ internals
    def _select(self, params: set[int] | None) -> list[_Entry]:
        if params is None:
            return list(self._entries.values())
        last = self._last_selection
        if last is not None and last[0] is params:
            return last[1]
        selected = [entry for entry in self._entries.values() if id(entry.param) in params]
        self._last_selection = (params, selected)
        return selected

    def _name_of(self, entry: _Entry) -> str:
        return next(name for name, other in self._entries.items() if other is entry)


def _frozen_square_sum(grad: torch.Tensor, entry: _Entry) -> torch.Tensor:
    """Sum of squares of ``grad`` at the frozen entries (float32 or wider), without copying them."""
    if entry.all_frozen:
        return torch.linalg.vector_norm(grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad).square()
    assert entry.keep is not None
    if grad.layout != torch.strided or grad.dtype != entry.param.dtype:
        grad = grad.to_dense().to(entry.param.dtype)
    flat_bits = _bits(grad.contiguous()).reshape(-1)
    keep = entry.keep.reshape(-1)
    buffer = torch.empty(min(flat_bits.numel(), _MEASURE_SLICE), dtype=flat_bits.dtype, device=grad.device)
    total = torch.zeros((), dtype=torch.float64, device=grad.device)
    for start in range(0, flat_bits.numel(), _MEASURE_SLICE):
        part = flat_bits[start : start + _MEASURE_SLICE]
        out = buffer[: part.numel()]
        torch.mul(part, keep[start : start + _MEASURE_SLICE], out=out)
        torch.sub(part, out, out=out)  # grad bits at frozen entries, 0 elsewhere
        values = out.view(grad.dtype)
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        total += torch.linalg.vector_norm(values).double().square()
    return total
