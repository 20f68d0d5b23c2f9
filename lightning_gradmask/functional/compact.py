"""Compact trainable entries: the optimizer holds only the entries that may change.

A dense mask keeps every entry of a masked parameter in the optimizer and undoes the update of the
frozen ones after each step. :class:`CompactEntries` instead gives the optimizer, for each masked
parameter, a 1-D tensor of its trainable entries only:

* :meth:`CompactEntries.swap_in` puts each compact tensor into the optimizer's ``param_groups`` in
  the place of its parameter (same group, same position, so learning rates, weight decay, LR
  schedulers and the optimizer's ``state_dict`` layout stay as they are) and moves the optimizer
  state over (a state tensor of the parameter's shape is gathered, one already compact is kept);
* :meth:`CompactEntries.gather_grad_` adds the trainable part of a parameter's gradient to its
  compact tensor's ``.grad`` and frees the dense gradient (``.grad = None``);
* :meth:`CompactEntries.refresh_` copies the parameter's trainable values into the compact tensors
  (before a step: the parameter stays the source of truth), :meth:`CompactEntries.scatter_` writes
  the stepped values back into the parameter (after a step). Frozen entries are never written, so
  they are exact by construction, whatever the optimizer does;
* :meth:`CompactEntries.swap_out` puts the parameters back, their state re-expanded to their shape
  (zeros at frozen entries).

The model is never reparametrized: the parameters keep their names, shapes and identity.

It is pure tensor code, usable without Lightning:

    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(3, 2)
    >>> trainable = torch.tensor([[True, False, False], [False, False, True]])
    >>> before = layer.weight.detach().clone()
    >>> opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    >>> compact = CompactEntries({"weight": (layer.weight, trainable)})
    >>> compact.swap_in([opt])
    >>> layer(torch.ones(1, 3)).sum().backward()
    >>> compact.gather_grad_(layer.weight)
    >>> compact.refresh_()
    >>> opt.step()
    >>> compact.scatter_()
    >>> opt.state[compact.compact("weight")]["exp_avg"].shape
    torch.Size([2])
    >>> bool(torch.equal(layer.weight[~trainable], before[~trainable]))
    True
    >>> compact.swap_out()
    >>> opt.state[layer.weight]["exp_avg"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["CompactEntries", "expand_compact_state_"]

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: Positions per slice of the write-back: its one buffer (int64 positions) stays small, 512 KiB.
_SCATTER_SLICE = 1 << 16


@dataclass
class _Compact:
    param: torch.Tensor
    indices: torch.Tensor  # flat (row-major) positions of the trainable entries, int32 (int64 if huge), param's device
    tensor: nn.Parameter  # the trainable values, 1-D, what the optimizer steps
    grad_buffer: torch.Tensor | None = None  # reused as tensor.grad step after step (zero_grad drops it)


class CompactEntries:
    """The trainable entries of several parameters as compact 1-D tensors for an optimizer.

    Args:
        masks: ``{name: (parameter, trainable)}``, ``trainable`` a ``bool`` tensor of the
            parameter's shape with at least one trainable and one frozen entry.

    Memory, on the parameters' devices, per trainable entry: its position (int32, 4 bytes; int64 for a
    parameter of 2**31 entries or more), the compact value and, from the first gathered gradient on,
    the compact gradient (one buffer reused step after step; each the parameter's element size); the
    optimizer's state covers the trainable entries only. Nothing is kept per frozen entry. Besides:
    one 512 KiB buffer per device for :meth:`scatter_`, and while :meth:`gather_grad_` runs, the dense
    gradient it frees.
    """

    def __init__(self, masks: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._entries: dict[str, _Compact] = {}
        self._by_param: dict[int, _Compact] = {}
        for name, (param, trainable) in masks.items():
            if trainable.dtype != torch.bool or tuple(trainable.shape) != tuple(param.shape):
                raise ValueError(
                    f"trainable mask for {name!r} must be a bool tensor of shape {list(param.shape)}, "
                    f"got {trainable.dtype} {list(trainable.shape)}"
                )
            indices = trainable.reshape(-1).nonzero().squeeze(1)
            # int32 positions where they fit: half the bytes of int64, and index_select reads them faster
            indices = indices.to(device=param.device, dtype=torch.int32 if param.numel() < 2**31 else torch.int64)
            if indices.numel() in (0, trainable.numel()):
                raise ValueError(f"trainable mask for {name!r} must have trainable and frozen entries")
            values = param.detach().reshape(-1).index_select(0, indices)
            entry = _Compact(param=param, indices=indices, tensor=nn.Parameter(values))
            self._entries[name] = entry
            self._by_param[id(param)] = entry
        # (optimizer, param group, position in it, entry) of every swapped-in compact tensor
        self._swapped: list[tuple[torch.optim.Optimizer, dict[str, Any], int, _Compact]] = []
        self._positions: dict[torch.device, torch.Tensor] = {}  # scatter_'s int64 slice buffer, per device

    # ------------------------------------------------------------------ inspection
    @property
    def names(self) -> list[str]:
        """Names of the parameters represented compactly."""
        return list(self._entries)

    def compact(self, name: str) -> nn.Parameter:
        """The compact tensor (trainable values, 1-D) of parameter ``name``."""
        return self._entries[name].tensor

    def holds(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is represented compactly here."""
        return id(param) in self._by_param

    @property
    def swapped_in(self) -> bool:
        """Whether some compact tensor is in an optimizer now."""
        return bool(self._swapped)

    # ------------------------------------------------------------------ optimizer swap
    def swap_in(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Replace each held parameter in the ``param_groups`` of ``optimizers`` by its compact tensor.

        A state tensor of the parameter's shape (a checkpoint of a dense run, or state built
        before) is gathered to the trainable entries; a state tensor already of the compact shape (a
        checkpoint of a compact run, restored before training starts) is kept as it is.

        Raises:
            ValueError: a held parameter is in two optimizers (nothing is swapped then).
        """
        optimizers = list(optimizers)
        found: dict[int, list[tuple[torch.optim.Optimizer, dict[str, Any], int]]] = {}
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for index, param in enumerate(group["params"]):
                    if id(param) in self._by_param:
                        found.setdefault(id(param), []).append((optimizer, group, index))
        for key, places in found.items():
            if len(places) > 1:
                name = next(n for n, e in self._entries.items() if id(e.param) == key)
                raise ValueError(
                    f"parameter {name!r} is in {len(places)} optimizer parameter groups; compact masking "
                    "needs each masked parameter in exactly one"
                )
        for key, ((optimizer, group, index),) in found.items():
            entry = self._by_param[key]
            # a new list, not an element replaced in place: caches keyed by the list (the restore's
            # OptimizerParamIds) see the change
            group["params"] = [*group["params"][:index], entry.tensor, *group["params"][index + 1 :]]
            state = optimizer.state.pop(entry.param, None)
            if state is not None:
                optimizer.state[entry.tensor] = {k: self._to_compact(entry, v) for k, v in state.items()}
            self._swapped.append((optimizer, group, index, entry))

    def swap_out(self) -> None:
        """Put the parameters back where :meth:`swap_in` put their compact tensors, their state
        re-expanded to the parameter's shape (zeros at the frozen entries). Idempotent."""
        for optimizer, group, index, entry in self._swapped:
            if index < len(group["params"]) and group["params"][index] is entry.tensor:
                group["params"] = [*group["params"][:index], entry.param, *group["params"][index + 1 :]]
            state = optimizer.state.pop(entry.tensor, None)
            if state is not None:
                optimizer.state[entry.param] = {k: self._to_dense(entry, v) for k, v in state.items()}
        self._swapped.clear()

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def gather_grad_(self, param: torch.Tensor) -> None:
        """Add the trainable part of ``param.grad`` to its compact tensor's gradient, then free
        ``param.grad``. A parameter not held here, or without a gradient, is left alone."""
        entry = self._by_param.get(id(param))
        grad = param.grad
        if entry is None or grad is None:
            return
        if grad.layout != torch.strided:
            grad = grad.to_dense()
        flat = grad.reshape(-1)
        compact = entry.tensor
        if compact.grad is not None:
            compact.grad.add_(flat.index_select(0, entry.indices).to(compact.dtype))
        elif flat.dtype == compact.dtype:
            # the same buffer every step: a fresh one of this size each step fragments the CPU allocator
            buffer = entry.grad_buffer
            if buffer is None or buffer.device != flat.device:
                buffer = entry.grad_buffer = torch.empty_like(compact)
            compact.grad = torch.index_select(flat, 0, entry.indices, out=buffer)
        else:
            compact.grad = flat.index_select(0, entry.indices).to(compact.dtype)
        param.grad = None

    def gather_grads_(self) -> None:
        """:meth:`gather_grad_` for every held parameter."""
        for entry in self._entries.values():
            self.gather_grad_(entry.param)

    @torch.no_grad()
    def frozen_grad_norm(self, param: torch.Tensor) -> torch.Tensor | None:
        """L2 norm (float64) of the frozen part of ``param.grad``, the part :meth:`gather_grad_` drops
        (``None`` without a gradient).

        Computed in slices through one 512 KiB buffer: no copy of the gradient, whatever its size.
        """
        entry = self._by_param.get(id(param))
        if entry is None or param.grad is None:
            return None
        grad = param.grad.to_dense() if param.grad.layout != torch.strided else param.grad
        flat = grad.reshape(-1)
        buffer = torch.empty(min(_SCATTER_SLICE, flat.numel()), dtype=torch.float64, device=flat.device)
        total = torch.zeros((), dtype=torch.float64, device=flat.device)
        trainable = torch.zeros_like(total)
        for start in range(0, flat.numel(), buffer.numel()):
            part = flat[start : start + buffer.numel()]
            wide = buffer[: part.numel()]
            wide.copy_(part)
            total += torch.dot(wide, wide)
        for start in range(0, entry.indices.numel(), buffer.numel()):
            where = entry.indices[start : start + buffer.numel()]
            wide = buffer[: where.numel()]
            wide.copy_(flat.index_select(0, where))
            trainable += torch.dot(wide, wide)
        return (total - trainable).clamp_min(0).sqrt()

    @torch.no_grad()
    def refresh_(self) -> None:
        """Copy each parameter's trainable values into its compact tensor (before a step), so
        anything that wrote the parameter since the last step is seen by the optimizer."""
        for entry in self._entries.values():
            torch.index_select(entry.param.detach().reshape(-1), 0, entry.indices, out=entry.tensor.data)

    @torch.no_grad()
    def scatter_(self, params: set[int] | None = None) -> None:
        """Write the compact values back into their parameters' trainable entries (after a step).

        Args:
            params: if given, only compact tensors whose ``id`` is in this set (the ones an
                optimizer just stepped).
        """
        for entry in self._entries.values():
            if params is not None and id(entry.tensor) not in params:
                continue
            data, values = entry.param.detach(), entry.tensor.detach().to(entry.param.dtype)
            if not data.is_contiguous():  # (index_put_ rather than put_: it has a deterministic kernel)
                data.index_put_(torch.unravel_index(entry.indices.long(), data.shape), values)
                continue
            # a copy of the values' bits (inf, NaN payloads and -0.0 exact); index_copy_ takes int64
            # positions only, so int32 ones are widened a slice at a time into one small reused buffer
            bits = data.view(-1).view(_INT_OF_SIZE[data.element_size()])
            new = values.view(bits.dtype)
            if entry.indices.dtype == torch.int64:
                bits.index_copy_(0, entry.indices, new)
                continue
            positions = self._positions_buffer(entry.indices.device)
            for start in range(0, entry.indices.numel(), _SCATTER_SLICE):
                where = entry.indices[start : start + _SCATTER_SLICE]
                wide = positions[: where.numel()]
                wide.copy_(where)
                bits.index_copy_(0, wide, new[start : start + _SCATTER_SLICE])

    def _positions_buffer(self, device: torch.device) -> torch.Tensor:
        """The int64 slice buffer of :meth:`scatter_` on ``device``, allocated once: a fresh one every
        step would leave holes in the CPU allocator's heap that later, larger allocations cannot use."""
        buffer = self._positions.get(device)
        if buffer is None:
            buffer = self._positions[device] = torch.empty(_SCATTER_SLICE, dtype=torch.int64, device=device)
        return buffer

    # ------------------------------------------------------------------ state conversion
    @staticmethod
    def _to_compact(entry: _Compact, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) == tuple(entry.param.shape):
            return value.reshape(-1).index_select(0, entry.indices.to(value.device))
        return value

    @staticmethod
    def _to_dense(entry: _Compact, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) == tuple(entry.tensor.shape):
            dense = value.new_zeros(entry.param.numel())
            dense.index_copy_(0, entry.indices.to(device=value.device, dtype=torch.int64), value)
            return dense.reshape(entry.param.shape)
        return value


@torch.no_grad()
def expand_compact_state_(
    optimizers: Iterable[torch.optim.Optimizer], masks: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> list[str]:
    """Re-expand optimizer state saved by a compact run for parameters now stepped densely.

    A checkpoint of a ``GradientMask(compact=True)`` run holds, for a masked parameter, state tensors
    of its trainable entries only; loaded into an optimizer that steps the parameter itself, they do
    not fit it. Each 1-D state tensor with as many entries as ``trainable`` has ``True`` ones (and not
    of the parameter's shape) is scattered into zeros of the parameter's shape.

    Args:
        masks: ``{name: (parameter, trainable bool mask)}``.

    Returns:
        The names whose state was expanded.
    """
    expanded: list[str] = []
    for name, (param, trainable) in masks.items():
        count = int(trainable.sum())
        for optimizer in optimizers:
            state = optimizer.state.get(param)
            if not state:
                continue
            changed = False
            for key, value in state.items():
                if (
                    isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == count
                    and tuple(value.shape) != tuple(param.shape)
                ):
                    positions = trainable.reshape(-1).nonzero().squeeze(1).to(value.device)
                    dense = value.new_zeros(param.numel())
                    dense.index_copy_(0, positions, value)
                    state[key] = dense.reshape(param.shape)
                    changed = True
            if changed:
                expanded.append(name)
    return expanded
