"""Sharded parameters (FSDP2 ``DTensor`` parameters): the local shard of a whole tensor, and global sums.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, which Lightning's ``ModelParallelStrategy`` uses)
every parameter is a ``DTensor``: its ``shape`` is the global one, and each process holds a local
shard of it (``to_local()``), cut along dimension 0 like :func:`torch.chunk` (the last shards may be
smaller, or empty). The masks, snapshots and noise of this package are *whole* tensors, the same on
every process; this module cuts the local shard out of them, and turns per-shard sums into global
ones. Plain tensors pass through unchanged, so the same code serves one device, DDP and FSDP2.

Pure torch, no Lightning. Example (one process, a plain tensor: nothing to cut)::

    >>> import torch
    >>> whole = torch.arange(6.0).reshape(3, 2)
    >>> local_part(whole, like=torch.zeros(3, 2)) is whole
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

__all__ = [
    "is_sharded",
    "local_of",
    "local_part",
    "local_tensor",
    "placement_key",
    "replicated_like",
    "shard_like",
    "sharded_sum",
    "summing_placements",
]


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` (a parameter or a gradient) is a ``DTensor``."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (an alias of its memory: in-place changes reach it), else ``tensor``."""
    if is_sharded(tensor):
        return tensor._local_tensor  # type: ignore[attr-defined]  # to_local() goes through autograd
    return tensor


def local_part(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of ``whole`` (``like``'s global shape) that this process holds of ``like``.

    ``like`` a plain tensor: ``whole`` itself. ``like`` a ``DTensor`` whose placements are ``Shard``
    and ``Replicate``: the slice of ``whole`` its local shard covers (a view, no communication),
    cut as ``DTensor`` cuts (:func:`torch.chunk` along the sharded dimension, mesh dimensions in
    order). Other placements (strided shards of FSDP2 over tensor parallelism): through
    ``distribute_tensor``, which on a torch whose ``distribute_tensor`` has no ``src_data_rank`` (2.6)
    scatters from rank 0 (every rank must call it, in the same order).

    Raises:
        ValueError: ``whole`` does not have ``like``'s global shape.
    """
    if not is_sharded(like):
        return whole
    if tuple(whole.shape) != tuple(like.shape):
        raise ValueError(f"local_part: a tensor of shape {list(whole.shape)} for a parameter of shape {list(like.shape)}")
    from torch.distributed.tensor import Shard

    mesh = like.device_mesh  # type: ignore[attr-defined]
    placements = like.placements  # type: ignore[attr-defined]
    if _plain_placements(placements):
        part = whole
        for mesh_dim, placement in enumerate(placements):
            if isinstance(placement, Shard):
                part = _chunk(part, placement.dim, mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim))
        expected = tuple(local_tensor(like).shape)
        if tuple(part.shape) != expected:  # pragma: no cover - a placement rule this code does not know
            raise RuntimeError(f"local_part: cut a shard of shape {list(part.shape)}, the parameter holds {list(expected)}")
        return part
    return local_tensor(shard_like(whole, like))


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` as a ``DTensor`` placed like ``like`` (``like`` a plain tensor: ``whole`` itself).

    For arithmetic with a sharded parameter inside autograd (the masked L1 penalty).
    """
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh, placements = like.device_mesh, like.placements  # type: ignore[attr-defined]
    device = local_tensor(like).device
    if _plain_placements(placements):  # cut where the whole is (the CPU, usually): only the shard moves
        local = local_part(whole, like).to(device)
        # its own memory, the shard's size (a view of the whole would keep the whole alive)
        local = local.clone() if local.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr() else local.contiguous()
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=like.shape, stride=like.stride())
    whole = whole.to(device)
    if _distribute_takes_src_data_rank():
        return distribute_tensor(whole, mesh, placements, src_data_rank=None)
    return distribute_tensor(whole, mesh, placements)


def replicated_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the same on every process) as a replicated ``DTensor`` on ``like``'s mesh, else itself.

    For elementwise work between a ``DTensor`` activation (tensor parallelism turns a layer's input
    into one) and a small whole tensor that broadcasts against it.
    """
    if not is_sharded(like):
        return tensor
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh  # type: ignore[attr-defined]
    return DTensor.from_local(tensor, mesh, [Replicate()] * mesh.ndim, run_check=False)


def sharded_sum(values: Sequence[torch.Tensor], likes: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum(values)``, where ``values[k]`` was computed on ``likes[k]``'s local shard: a global sum.

    A value computed on a sharded tensor is summed over the processes that hold the other shards
    (not over replicas, which hold the same numbers); a value of a plain tensor counts once. All
    values must have one shape and be on one device. One all-reduce per distinct mesh and placement.
    """
    if not values:
        raise ValueError("sharded_sum needs at least one value")
    plain: torch.Tensor | None = None
    groups: dict[tuple[Any, ...], tuple[Any, Any, torch.Tensor]] = {}
    for value, like in zip(values, likes):
        if not is_sharded(like):
            plain = value if plain is None else plain + value
            continue
        mesh, placements = like.device_mesh, like.placements  # type: ignore[attr-defined]
        key = (id(mesh), tuple(placements))
        if key in groups:
            groups[key] = (mesh, placements, groups[key][2] + value)
        else:
            groups[key] = (mesh, placements, value)
    total = plain
    for mesh, placements, partial_sum in groups.values():
        reduced = _sum_over_shards(partial_sum, mesh, placements)
        total = reduced if total is None else total + reduced.to(total.device)
    assert total is not None
    return total


def _sum_over_shards(value: torch.Tensor, mesh: Any, placements: Sequence[Any]) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, mesh, summing_placements(placements), run_check=False).full_tensor()


def summing_placements(placements: Sequence[Any]) -> list[Any]:
    """Per mesh dimension: ``Partial`` (sum) where the tensor is cut (``Shard`` and the strided shards of
    FSDP2 over tensor parallelism, which are no ``Shard`` subclass in every torch), ``Replicate`` where
    every process holds the same numbers."""
    from torch.distributed.tensor import Partial, Replicate

    return [Replicate() if p.is_replicate() else Partial() for p in placements]


def placement_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What a tensor placed like ``tensor`` depends on: its device, and for a ``DTensor`` its mesh and placements."""
    if not is_sharded(tensor):
        return (tensor.device,)
    return (tensor.device, id(tensor.device_mesh), tuple(tensor.placements))  # type: ignore[attr-defined]


def local_of(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's part of ``mask`` for parameter ``like``: the local shard of a ``DTensor`` mask
    placed like ``like``, or :func:`local_part` of a whole one."""
    return local_tensor(mask) if is_sharded(mask) else local_part(mask, like)


def _plain_placements(placements: Sequence[Any]) -> bool:
    """Whether every placement is a plain ``Shard`` or ``Replicate`` (cut here without communication)."""
    from torch.distributed.tensor import Replicate, Shard

    return all(type(p) in (Shard, Replicate) for p in placements)


def _chunk(tensor: torch.Tensor, dim: int, pieces: int, index: int) -> torch.Tensor:
    """Piece ``index`` of ``torch.chunk(tensor, pieces, dim)``, empty where chunk gives fewer pieces."""
    size = tensor.shape[dim]
    step = -(-size // pieces)  # ceil: the size torch.chunk gives every piece but the last
    start = min(index * step, size)
    return tensor.narrow(dim, start, min(step, size - start))


@lru_cache(maxsize=1)
def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch built without distributed
        return None
    return DTensor


@lru_cache(maxsize=1)
def _distribute_takes_src_data_rank() -> bool:
    from torch.distributed.tensor import distribute_tensor

    return "src_data_rank" in inspect.signature(distribute_tensor).parameters
