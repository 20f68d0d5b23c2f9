"""The few collectives the callbacks need, and the strategy check they share.

Everything here goes through ``trainer.strategy`` so it works the same on one device, under
``ddp``, ``ddp_spawn`` and ``ModelParallelStrategy``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import Strategy

from lightning_gradmask._namespaces import lightning_classes
from lightning_gradmask.errors import UnsupportedStrategyError

#: What to use instead, for an owner that needs every parameter whole.
_USE_DDP = "Use strategy='ddp' (or 'ddp_spawn') for multi-device training, or a single device."


def check_strategy(trainer: pl.Trainer, owner: str, *, sharded: bool, model_parallel_refusal: str | None = None) -> None:
    """Refuse the strategies ``owner`` cannot work under, with what to use instead.

    Supported: single device, the DDP family (``ddp``, ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``)
    and, where ``sharded`` is true, ``ModelParallelStrategy`` (FSDP2: each parameter a ``DTensor``
    sharded on dimension 0), from ``lightning.pytorch`` or ``pytorch_lightning``.

    Args:
        model_parallel_refusal: where ``sharded`` is false, the whole message for
            ``ModelParallelStrategy`` (the owner's own reason and advice), instead of the generic one.

    Raises:
        UnsupportedStrategyError: FSDP1 (``FSDPStrategy``: flat shards; the message points to
            ``ModelParallelStrategy``), DeepSpeed, ``ModelParallelStrategy`` where ``sharded`` is
            false, and any other strategy.
    """
    strategy: Strategy = trainer.strategy
    name = type(strategy).__name__
    model_parallel = lightning_classes("strategies", "ModelParallelStrategy")
    if isinstance(strategy, model_parallel):
        if sharded:
            return
        if model_parallel_refusal is not None:
            raise UnsupportedStrategyError(model_parallel_refusal)
    supported = lightning_classes("strategies", "SingleDeviceStrategy") + lightning_classes("strategies", "DDPStrategy")
    hidden = "DeepSpeed" in name or "FSDP" in name or isinstance(strategy, model_parallel)
    if not hidden and isinstance(strategy, supported):
        return
    if "FSDP" in name:
        instead = (
            "Use ModelParallelStrategy (FSDP2: `fully_shard` in configure_model, parameters kept whole-shaped as "
            "DTensors), which it supports, or strategy='ddp'."
            if sharded
            else _USE_DDP
        )
        why = "FSDP1 flattens parameters into flat shards, so a mask no longer lines up with its parameter"
    elif isinstance(strategy, model_parallel):
        why = "it needs each parameter whole on every process"
        instead = _USE_DDP
    else:
        why = "it needs each parameter and its gradient on every process (DeepSpeed keeps .grad empty)"
        instead = "Use strategy='ddp', ModelParallelStrategy (FSDP2) or a single device." if sharded else _USE_DDP
    raise UnsupportedStrategyError(f"{owner} does not support the {name} strategy: {why}. {instead}")


def is_model_parallel(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` runs Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallel)."""
    return isinstance(trainer.strategy, lightning_classes("strategies", "ModelParallelStrategy"))


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A 4-number fingerprint of named tensors (names, shapes, dtypes and bytes), as int64."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        cpu = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{list(cpu.shape)}|{cpu.dtype}|".encode())
        digest.update(cpu.view(torch.uint8).numpy().tobytes() if cpu.numel() else b"")
    raw = digest.digest()
    # four 7-byte chunks: positive numbers that fit an int64 on every backend
    return torch.tensor([int.from_bytes(raw[i : i + 7], "big") for i in range(0, 28, 7)], dtype=torch.int64)


def assert_same_on_all_ranks(trainer: pl.Trainer, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise on every rank at once if ``tensors`` differ between ranks (a no-op on one process).

    Raises:
        RuntimeError: naming ``what`` and the ranks that disagree with rank 0.
    """
    if trainer.world_size <= 1:
        return
    local = tensor_digest(tensors).to(trainer.strategy.root_device)
    if dist.is_available() and dist.is_initialized():
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        gathered = torch.stack(parts)  # (world_size, 4), the same on every rank
    else:  # pragma: no cover - a multi-process strategy without torch.distributed
        gathered = trainer.strategy.all_gather(local)
    differing = [rank for rank in range(gathered.shape[0]) if not torch.equal(gathered[rank], gathered[0])]
    if differing:
        raise RuntimeError(
            f"{what} differ between processes: rank(s) {differing} disagree with rank 0. "
            "Every rank must build the same masks (seed any random mask identically, or load it from a file)."
        )


def all_reduce_mean(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks (returns ``tensor`` itself on one process)."""
    if trainer.world_size <= 1:
        return tensor
    return trainer.strategy.reduce(tensor, reduce_op="mean")
