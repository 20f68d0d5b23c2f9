"""Run by tests/test_hessian_monitor.py: evaluations that fail on ONE of 2 gloo processes.

Usage: python hessian_failure_ddp.py OUT_DIR
Two monitors (prefixes "hessian" and "probe") over 4 epochs. The first one's loss_fn raises on rank 1
only at epoch 1; the second one's probe dataloader raises on rank 1 only at epoch 2 and yields nothing
on rank 1 at epoch 3 (uneven data). Without agreement between the ranks the run hangs in an all-reduce.
Each rank saves every value it logged to OUT_DIR/rank{r}.pt.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lightning_gradmask import HessianMonitor

from utils import TinyRegressor, regression_data, run_distributed, trainer


class Recorder(TinyRegressor):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.records: list[tuple[int, str, float]] = []

    def log(self, name, value, *args, **kwargs):  # every value a monitor logs, per epoch
        if name.startswith(("hessian/", "probe/")):
            self.records.append((self.current_epoch, name, float(value)))
        return super().log(name, value, *args, **kwargs)

    def train_dataloader(self):
        data = regression_data(n=32, seed=3)
        sampler = DistributedSampler(data, num_replicas=2, rank=self.global_rank, shuffle=False)
        return DataLoader(data, batch_size=16, sampler=sampler)

    def on_train_end(self) -> None:
        torch.save(self.records, self.out / f"rank{self.global_rank}.pt")


class FlakyProbe:
    """The probe set: raises on rank 1 at epoch 2, empty on rank 1 at epoch 3."""

    def __init__(self, module: Recorder) -> None:
        self.module = module
        self.data = DataLoader(regression_data(n=16, seed=5), batch_size=8)

    def __iter__(self):
        rank, epoch = self.module.global_rank, self.module.current_epoch
        if rank == 1 and epoch == 2:
            raise OSError("the probe file vanished")
        if rank == 1 and epoch == 3:
            return iter(())
        return iter(self.data)


def main() -> None:
    out = Path(sys.argv[1])
    model = Recorder(out)

    def flaky_loss(module, batch):
        if module.global_rank == 1 and module.current_epoch == 1:
            raise RuntimeError("CUDA out of memory (simulated on rank 1)")
        x, y = batch
        return F.mse_loss(module(x), y)

    def mse(module, batch):
        x, y = batch
        return F.mse_loss(module(x), y)

    monitors = [
        HessianMonitor(loss_fn=flaky_loss, stats=("trace", "eigenvalues"), max_overhead=None, save=False),
        HessianMonitor(loss_fn=mse, dataloader=FlakyProbe(model), prefix="probe", max_overhead=None, save=False),
    ]
    fit = trainer(strategy="ddp", devices=2, max_epochs=4, use_distributed_sampler=False, callbacks=monitors)
    fit.fit(model)


if __name__ == "__main__":
    run_distributed(main)
