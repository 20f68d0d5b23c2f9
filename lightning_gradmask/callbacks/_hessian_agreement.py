"""How the ranks of a DDP run agree that a ``HessianMonitor`` evaluation failed on one of them.

A rank whose evaluation fails locally (a loss that raises on its batch, an out-of-memory error in a
product, a probe loader that raises) must not simply return to training: the other ranks would wait
forever in the next all-reduce. Instead it keeps joining the collectives the others make, with a
failure flag, so that every rank raises at the same collective:

* :class:`AgreeingReduce` is the monitor's ``reduce`` hook for the ``HessianOperator``: the flags ride
  along with the payload of every product's all-reduce (no extra collective on the success path), and
  its :meth:`~AgreeingReduce.fail` is what the operator calls on a local failure.
* :func:`agree` is one small all-reduce outside the operator (the batches at the start of an
  evaluation, the result before logging), which also carries rank 0's figures to every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NoReturn

import lightning.pytorch as pl
import torch


class PeerEvaluationError(RuntimeError):
    """The evaluation failed on another process; raised on the processes where it did not."""

    def __init__(self, ranks: Sequence[int]) -> None:
        self.ranks = list(ranks)
        super().__init__(f"the evaluation failed on rank(s) {self.ranks} (that rank's warning or traceback has the cause)")


def _flags(world_size: int, rank: int, raised: Sequence[bool], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One one-hot block of ``world_size`` entries per condition: the conditions true on this rank."""
    flags = torch.zeros(len(raised) * world_size, dtype=dtype, device=device)
    for i, on in enumerate(raised):
        if on:
            flags[i * world_size + rank] = 1
    return flags


def _ranks(block: torch.Tensor) -> list[int]:
    return [int(r) for r in (block > 0).nonzero().reshape(-1)]


class AgreeingReduce:
    """``reduce`` hook: the mean over ranks of a product, with the ranks' failure flags appended.

    Example::

        reduce = AgreeingReduce(trainer)
        HessianOperator(closures, params, reduce=reduce)   # every rank raises if one rank fails
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, None)

    def fail(self, template: torch.Tensor, error: BaseException) -> NoReturn:
        """Join the all-reduce the other ranks make on a tensor like ``template``, flagged, then raise ``error``."""
        self._reduce(torch.zeros_like(template), error)
        raise AssertionError("unreachable")  # pragma: no cover - _reduce raises

    def _reduce(self, tensor: torch.Tensor, error: BaseException | None) -> torch.Tensor:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float64
        flags = _flags(world, rank, [error is not None], dtype, tensor.device)
        payload = torch.cat([tensor.reshape(-1).to(dtype), flags])
        reduced = self.trainer.strategy.reduce(payload, reduce_op="mean")
        if error is not None:
            raise error
        failed = _ranks(reduced[-world:])
        if failed:
            raise PeerEvaluationError(failed)
        return reduced[: tensor.numel()].reshape(tensor.shape).to(tensor.dtype)


def agree(
    trainer: pl.Trainer, conditions: Mapping[str, bool], rank_zero: Sequence[float] = ()
) -> tuple[dict[str, list[int]], list[float]]:
    """The ranks on which each condition holds, and rank 0's ``rank_zero`` figures: one all-reduce.

    On one process: this process's answers, no collective.
    """
    names = list(conditions)
    if trainer.world_size <= 1:
        return {name: [0] if conditions[name] else [] for name in names}, [float(v) for v in rank_zero]
    world, rank = trainer.world_size, trainer.global_rank
    device = trainer.strategy.root_device
    flags = _flags(world, rank, [conditions[n] for n in names], torch.float64, device)
    figures = torch.tensor([float(v) for v in rank_zero] if rank == 0 else [0.0] * len(rank_zero), dtype=torch.float64, device=device)
    total = trainer.strategy.reduce(torch.cat([flags, figures]), reduce_op="sum")
    ranks = {name: _ranks(total[i * world : (i + 1) * world]) for i, name in enumerate(names)}
    return ranks, [float(v) for v in total[len(names) * world :]]
