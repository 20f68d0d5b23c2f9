"""Run by tests/test_hessian_monitor.py: HessianMonitor under 2 gloo processes.

Usage: python hessian_ddp.py OUT_DIR
Each rank saves the statistics it computed and the batch it cached to OUT_DIR/rank{r}.pt.
The ranks are given different budgets (rank 0 none, rank 1 a vanishing one): rank 0 decides for both,
so they evaluate together every epoch (a rank evaluating alone would wait forever in an all-reduce).
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lightning_gradmask import GradientMask, HessianMonitor

from utils import TinyRegressor, regression_data, run_distributed, trainer


def mse(module, batch):
    x, y = batch
    return F.mse_loss(module(x), y)


class Saver(TinyRegressor):
    def __init__(self, out: Path, monitor: HessianMonitor) -> None:
        super().__init__(optimizer=lambda p: torch.optim.SGD(p, lr=0.0))  # the same Hessian every epoch
        self.out, self.monitor = out, monitor

    def setup(self, stage: str) -> None:
        self.monitor._overhead.max_overhead = None if self.global_rank == 0 else 1e-9

    def train_dataloader(self):
        data = regression_data(n=32, seed=3)
        # fixed, different halves per rank (Lightning's own sampler would shuffle)
        sampler = DistributedSampler(data, num_replicas=2, rank=self.global_rank, shuffle=False)
        return DataLoader(data, batch_size=16, sampler=sampler)

    def on_train_end(self) -> None:
        latest = self.monitor.latest
        torch.save(
            {
                "trace": latest.trace.trace,
                "eigenvalues": latest.eigen.eigenvalues,
                "diagonal": latest.diagonal.per_parameter,
                "batch": self.monitor._batches[0],
                "state": {k: v.detach().clone() for k, v in self.state_dict().items()},
                "evaluations": self.monitor._overhead.evaluations,
                "logged": {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("hessian/")},
            },
            self.out / f"rank{self.global_rank}.pt",
        )


def main() -> None:
    out = Path(sys.argv[1])
    monitor = HessianMonitor(loss_fn=mse, stats=("trace", "eigenvalues", "diagonal"), top_k=2)
    edges = torch.ones(8, 6, dtype=torch.bool)
    edges[:, 0] = False
    model = Saver(out, monitor)
    fit = trainer(
        strategy="ddp",
        devices=2,
        max_epochs=3,
        use_distributed_sampler=False,
        callbacks=[GradientMask({"net.0.weight": edges}), monitor],
    )
    fit.fit(model)


if __name__ == "__main__":
    run_distributed(main)
