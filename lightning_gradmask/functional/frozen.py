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
from typing import Any, cast

import torch

from lightning_gradmask.functional.sharding import is_sharded, local_part, local_tensor, sharded_sum

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

    Sharded parameters (FSDP2 ``DTensor`` parameters) take a whole mask of their global shape, like any other;
    each process keeps the keep pattern and snapshot of its local shard only, and works on the local
    shards of the parameter and its gradient (so 8 bytes per masked entry *of the shard*).
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
            local = local_tensor(param)
            entry = _Entry(param=param, all_frozen=num_frozen == trainable.numel(), num_frozen=num_frozen)
            if not entry.all_frozen:
                int_dtype = _INT_OF_SIZE[param.element_size()]
                entry.keep = local_part(trainable, like=param).to(device=local.device, dtype=int_dtype)
            self._entries[name] = entry
        self._last_selection: tuple[object, Any] | None = None
        self._captured = not self._entries
        self._grouped: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], bool] | None = None

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
        positions of a tensor, :meth:`zero_frozen_in_` needs no mask at all. For a sharded parameter,
        the mask of this process's local shard.
        """
        entry = self._entries.get(name)
        if entry is None:
            return None
        if entry.all_frozen:
            local = local_tensor(entry.param)
            return torch.ones(local.shape, dtype=torch.bool, device=local.device)
        assert entry.keep is not None
        return entry.keep.eq(0)

    def count(self) -> tuple[int, int]:
        """``(frozen entries, entries)`` over the parameters held here."""
        frozen = sum(e.num_frozen for e in self._entries.values())
        total = sum(e.param.numel() for e in self._entries.values())
        return frozen, total

    @property
    def captured(self) -> bool:
        """Whether :meth:`capture_` has run (checked before every optimizer step: a flag, not a scan)."""
        return self._captured

    # ------------------------------------------------------------------ the mechanism
    @torch.no_grad()
    def capture_(self) -> None:
        """Record the current values of the frozen entries: :meth:`restore_` writes these back."""
        for entry in self._entries.values():
            data = local_tensor(entry.param).detach()
            entry.snapshot = data.clone()
            if not entry.all_frozen:
                assert entry.keep is not None
                # snapshot bits * (1 - keep): frozen bits stay, trainable ones become 0 (+0.0)
                bits = _bits(entry.snapshot)
                torch.addcmul(bits, bits, entry.keep, value=-1, out=bits)  # one pass, no temporary
                entry.param_bits = _bits(data)
                entry.snapshot_bits = bits
        self._last_selection = None
        self._captured = True

    @torch.no_grad()
    def zero_frozen_in_(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Set the frozen positions of ``tensor`` (parameter ``name``'s shape and dtype) to +0.0, in place.

        For a sharded parameter, ``tensor`` is a ``DTensor`` placed like it, or the tensor of its local
        shard's shape. A parameter with no frozen entry leaves ``tensor`` unchanged. Returns ``tensor``.
        """
        entry = self._entries.get(name)
        if entry is None:
            return tensor
        if is_sharded(tensor):
            self.zero_frozen_in_(name, local_tensor(tensor))
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

        Sparse COO gradients (``nn.Embedding(sparse=True)``) stay sparse: the gradient is
        coalesced (``param.grad`` is replaced by its coalesced form, duplicates summed) and the
        frozen part of its stored values is zeroed. For a hybrid gradient whose indices pick rows,
        value ``[k, ...]`` belongs to the parameter's entries ``[index_k, ...]``.
        """
        if not measure and self._mask_grouped():
            return None
        removed_sq: torch.Tensor | None = None
        sharded_sq: list[tuple[torch.Tensor, torch.Tensor]] = []  # (square sum of a local shard, its parameter)
        grouped: list[torch.Tensor] = []
        keeps: list[torch.Tensor] = []
        for entry in self._entries.values():
            grad = entry.param.grad
            if grad is None:
                continue
            if grad.layout == torch.sparse_coo:
                sq = _mask_sparse_gradient_(entry, measure=measure)
                if sq is not None:
                    removed_sq = sq if removed_sq is None else removed_sq + sq.to(removed_sq.device)
                continue
            grad = local_tensor(grad)
            if measure:
                sq = _frozen_square_sum(grad, entry)
                if is_sharded(entry.param):
                    sharded_sq.append((sq, entry.param))
                else:
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
            if sharded_sq:  # every process has the same sharded parameters, so all take part in the sums
                device = sharded_sq[0][0].device
                total = sharded_sum([sq for sq, _ in sharded_sq], [param for _, param in sharded_sq])
                removed_sq = total if removed_sq is None else removed_sq.to(device) + total
            return torch.zeros(()) if removed_sq is None else removed_sq.sqrt().float()
        return None

    @torch.no_grad()
    def restore_(self, params: set[int] | None = None, *, skip_gradless_whole: bool = False) -> None:
        """Write the captured values back into the frozen entries, exactly.

        Args:
            params: if given, only parameters whose ``id`` is in this set (the ones an optimizer
                just stepped). The selection is remembered for the set object last passed, so a
                caller that passes the same set every step pays for it once.
            skip_gradless_whole: leave out wholly frozen parameters whose ``.grad`` is ``None``; only
                for a step that cannot have written them (a ``torch.optim`` optimizer skips such
                parameters, and nothing else ran after it).
        """
        whole, small, large, sharded = self._restore_plan(params)
        for param, snapshot in whole:
            if skip_gradless_whole and param.grad is None:
                continue
            local_tensor(param).detach().copy_(snapshot)
        # Integer arithmetic, not float: w * keep + snapshot keeps every bit of a trainable entry
        # and writes every bit of a frozen one back, inf/NaN/-0.0 included (at each position one
        # of the two terms is 0). It is also an order of magnitude faster on CPU than masked_fill_
        # or torch.where with a scattered mask (benchmarks/README.md).
        params_, bits, keeps, snapshots = small
        if bits:
            current = [local_tensor(p) for p in params_] if sharded else params_
            if any(b.data_ptr() != p.data_ptr() for b, p in zip(bits, current)):
                self._rebind(params)  # a parameter's memory was replaced (param.data = ...)
                return self.restore_(params)
            torch._foreach_mul_(bits, keeps)
            torch._foreach_add_(bits, snapshots)
        for param, bits_one, keep, snapshot_bits in large:
            if bits_one.data_ptr() != local_tensor(param).data_ptr():
                self._rebind(params)
                return self.restore_(params)
            torch.addcmul(snapshot_bits, bits_one, keep, out=bits_one)  # one pass over the bytes
        return None

    def _restore_plan(self, params: set[int] | None) -> Any:
        last = self._last_selection
        if last is not None and last[0] is params:
            return last[1]
        whole, large = [], []
        small: tuple[list[torch.Tensor], ...] = ([], [], [], [])
        sharded = False
        for name, entry in self._entries.items():
            if params is not None and id(entry.param) not in params:
                continue
            if entry.snapshot is None:
                raise RuntimeError(f"restore_ called before capture_ for parameter {name!r}")
            sharded = sharded or is_sharded(entry.param)
            if entry.all_frozen:
                whole.append((entry.param, entry.snapshot))
                continue
            assert entry.param_bits is not None and entry.keep is not None and entry.snapshot_bits is not None
            # the parameter itself: a DTensor's local shard is looked up at each restore (it may be replaced)
            item = (entry.param, entry.param_bits, entry.keep, entry.snapshot_bits)
            if local_tensor(entry.param).numel() <= _GROUPED_MAX_NUMEL:
                for column, value in zip(small, item):
                    column.append(value)
            else:
                large.append(item)
        plan = (whole, small, large, sharded)
        self._last_selection = (params, plan)
        return plan

    def _rebind(self, params: set[int] | None) -> None:
        for entry in self._entries.values():
            if entry.param_bits is not None:
                entry.param_bits = _bits(local_tensor(entry.param).detach())
        self._last_selection = None

    @torch.no_grad()
    def zero_frozen_(self) -> None:
        """Set every frozen entry to 0 (used to sever weights before capturing them)."""
        for name, entry in self._entries.items():
            self.zero_frozen_in_(name, local_tensor(entry.param).detach())
        self._last_selection = None

    # ------------------------------------------------------------------ internals
    def _mask_grouped(self) -> bool:
        """The common case in one grouped kernel: dense gradients of the parameters' width.

        Returns ``False`` (having changed nothing that matters: masking is idempotent) when some
        gradient does not fit, for the per-parameter path to handle.
        """
        if self._grouped is None:
            partial = [e for e in self._entries.values() if not e.all_frozen]
            self._grouped = (
                [e.param for e in partial],
                [e.keep for e in partial],  # type: ignore[misc]
                [e.param for e in self._entries.values() if e.all_frozen],
                any(is_sharded(e.param) for e in self._entries.values()),
            )
        params, keeps, whole, sharded = self._grouped
        found = [p.grad for p in params]
        if any(g is None for g in found):
            pairs = [(g, k) for g, k in zip(found, keeps) if g is not None]
            grads, keeps = [g for g, _ in pairs], [k for _, k in pairs]
        else:
            grads = cast("list[torch.Tensor]", found)
        if any(g.layout != torch.strided for g in grads):
            return False
        if sharded:  # (looked up only then: this runs every step, for thousands of tensors)
            grads = [local_tensor(g) for g in grads]
        try:
            # integer multiply by 1/0 on the gradient's bits: every bit kept, or +0.0
            torch._foreach_mul_([g.view(k.dtype) for g, k in zip(grads, keeps)], keeps)
        except RuntimeError:  # a gradient of another width than its parameter: shapes differ
            return False
        for param in whole:
            if param.grad is not None:
                local_tensor(param.grad).zero_()
        return True


def _mask_sparse_gradient_(entry: _Entry, *, measure: bool) -> torch.Tensor | None:
    """Zero the frozen part of a sparse COO gradient's values, in place after coalescing it.

    Returns the squared L2 norm of what was removed when ``measure`` (else ``None``). Coalescing
    first sums duplicate indices, so every stored value is one position's whole gradient and the
    norm is the norm of the gradient, not of its pieces.
    """
    grad = entry.param.grad
    assert grad is not None
    if not grad.is_coalesced():
        grad = grad.coalesce()
        entry.param.grad = grad
    values = grad._values()  # the stored values themselves (an alias: zeroing them zeroes the gradient)
    if entry.all_frozen:
        removed = _square_sum(values) if measure else None
        values.zero_()
        return removed
    assert entry.keep is not None
    # value [k, ...] sits at the parameter's entries [indices[:, k], ...]: the keep pattern there
    keep = entry.keep[tuple(grad._indices())]
    removed = None
    if measure:
        removed = _masked_square_sum(values if values.dtype == entry.param.dtype else values.to(entry.param.dtype), keep)
    if values.dtype == entry.param.dtype:
        _bits(values).mul_(keep)
    else:
        values.masked_fill_(keep.eq(0), 0)
    return removed


def _square_sum(values: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(values.float() if values.dtype in (torch.float16, torch.bfloat16) else values).square()


def _frozen_square_sum(grad: torch.Tensor, entry: _Entry) -> torch.Tensor:
    """Sum of squares of ``grad`` at the frozen entries (float32 or wider), without copying them."""
    if entry.all_frozen:
        return _square_sum(grad)
    assert entry.keep is not None
    if grad.layout != torch.strided:
        grad = grad.to_dense()
    if grad.dtype != entry.param.dtype:
        grad = grad.to(entry.param.dtype)
    return _masked_square_sum(grad, entry.keep)


def _masked_square_sum(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sum of squares of ``grad`` where ``keep`` (integers of ``grad``'s width) is 0, slice by slice."""
    flat_bits = _bits(grad.contiguous()).reshape(-1)
    keep = keep.reshape(-1)
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
