"""Which strategies ``HessianMonitor`` runs under, and what to do under the one it cannot (FSDP2)."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_gradmask._distributed import check_strategy, is_model_parallel
from lightning_gradmask.errors import UnsupportedStrategyError

MODEL_PARALLEL_REFUSAL = (
    "HessianMonitor does not support ModelParallelStrategy (FSDP2): FSDP2 gathers each sharded parameter outside "
    "autograd and frees the gathered copy after the backward, so torch.autograd.grad cannot reach the parameters "
    "and no Hessian-vector product can be taken (measured; see docs/hessian.md, 'Sharded training (FSDP2)'). "
    "Instead, run HessianMonitor under strategy='ddp' (or on one device) with a model that fits on one device, or "
    "compute the statistics offline from a full checkpoint: train with "
    "ModelParallelStrategy(save_distributed_checkpoint=False), load torch.load(path, weights_only=False)"
    "['state_dict'] into the unsharded model, and call lightning_gradmask.curvature.hessian_statistics("
    "HessianOperator.from_module(model, closure), stats)."
)


def check_hessian_strategy(trainer: pl.Trainer) -> None:
    """Refuse, at ``setup``, the strategies under which the monitor cannot take Hessian-vector products.

    Raises:
        UnsupportedStrategyError: ``ModelParallelStrategy`` (FSDP2, with or without tensor parallelism),
            with the measured reason and the two ways to get the statistics instead; FSDP1, DeepSpeed
            and other strategies, as :func:`~lightning_gradmask._distributed.check_strategy` says.
    """
    if is_model_parallel(trainer):
        raise UnsupportedStrategyError(MODEL_PARALLEL_REFUSAL)
    check_strategy(trainer, "HessianMonitor", sharded=False)
