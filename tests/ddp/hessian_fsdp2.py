"""Run by tests/test_hessian_monitor.py: HessianMonitor under ModelParallelStrategy (FSDP2), 2 gloo processes.

Usage: python hessian_fsdp2.py OUT_DIR

1. A fit with the monitor: every rank must get the UnsupportedStrategyError at ``setup``, before
   ``configure_model`` shards anything and before any training step.
2. What the refusal says to do instead: a fit without the monitor under
   ``ModelParallelStrategy(save_distributed_checkpoint=False)``, a full checkpoint, and on rank 0 the
   statistics computed offline from it on the unsharded model.
Each rank saves what it saw to OUT_DIR/rank{r}.pt.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_gradmask import HessianMonitor, UnsupportedStrategyError
from lightning_gradmask.curvature import HessianOperator, hessian_statistics

from utils import TinyRegressor, loader, regression_data, run_distributed, snapshot, trainer


def mse(module, batch):
    x, y = batch
    return F.mse_loss(module(x), y)


class Sharded(TinyRegressor):
    """TinyRegressor with every Linear and then the whole net ``fully_shard``-ed in ``configure_model``."""

    def __init__(self) -> None:
        super().__init__(optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        self.training_steps = 0

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        return super().training_step(batch, batch_idx)


def fsdp2(**options) -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **options)


def main() -> None:
    out = Path(sys.argv[1])
    record = {}

    refused = Sharded()
    before = snapshot(refused)
    try:
        trainer(strategy=fsdp2(), devices=2, max_steps=2, callbacks=[HessianMonitor(mse, max_overhead=None)]).fit(refused, loader())
    except UnsupportedStrategyError as err:
        record["refusal"] = str(err)
    record["training_steps"] = refused.training_steps
    record["untouched"] = all(type(p) is nn.Parameter and torch.equal(p, before[n]) for n, p in refused.named_parameters())

    # the offline route: a full checkpoint of a sharded run, the statistics on the unsharded model
    model = Sharded()
    fit = trainer(strategy=fsdp2(save_distributed_checkpoint=False), devices=2, max_steps=2)
    fit.fit(model, loader())
    record["trained"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}  # a collective
    path = fit.strategy.broadcast(str(out / "full.ckpt"))
    fit.save_checkpoint(path)
    if fit.is_global_zero:
        plain = TinyRegressor()
        plain.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
        x, y = regression_data().tensors
        operator = HessianOperator.from_module(plain, lambda: F.mse_loss(plain(x), y))
        stats = hessian_statistics(operator, ("trace", "eigenvalues"), top_k=2, seed=0)
        operator.release()
        record["offline"] = {"state": snapshot(plain), "trace": stats.trace.trace, "eigenvalues": stats.eigen.eigenvalues}
    torch.save(record, out / f"rank{fit.global_rank}.pt")


if __name__ == "__main__":
    run_distributed(main)
