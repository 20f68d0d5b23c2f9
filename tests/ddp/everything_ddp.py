"""Run by tests/test_integration.py: every callback at once, 2 gloo processes, then a resume.

Usage: python everything_ddp.py OUT_DIR
Phase 1 trains 2 epochs with a ModelCheckpoint; phase 2 resumes from last.ckpt with fresh callbacks
for 2 more. bf16-mixed, AdamW, accumulate_grad_batches=2, gradient clipping. Each rank saves what
the test compares to OUT_DIR/rank{r}.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lightning_gradmask import (
    GradientMask,
    GradientNoise,
    HessianMonitor,
    MaskedL1Mixin,
    SensitiveColumnBlinding,
    WeightNoise,
    verify_independence,
)

from utils import regression_data, run_distributed

SEVERED = [0, 1]
TRAINABLE = torch.ones(16, 6, dtype=torch.bool)
TRAINABLE[::2, 2:] = False  # half of the rows may not read columns 2..5


class Everything(MaskedL1Mixin, L.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.out = out
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.register_masked_l1("net.0.weight", strength=1e-3)
        self.register_masked_l1("net.2.weight", strength=2.0, proximal=True)

    def forward(self, x):
        return self.net(x)

    def hessian_loss(self, batch):
        x, y = batch
        return F.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        return self.hessian_loss(batch)

    def train_dataloader(self):
        data = regression_data(n=64, seed=2)
        sampler = DistributedSampler(data, num_replicas=2, rank=self.global_rank, shuffle=False)
        return DataLoader(data, batch_size=8, sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.02)

    def on_train_start(self):
        if self.trainer.ckpt_path is None:  # the very start of training
            start = {k: v.detach().clone() for k, v in self.named_parameters()}
            torch.save(start, self.out / f"start_rank{self.global_rank}.pt")


def callbacks(out: Path, monitor: HessianMonitor) -> list:
    return [
        WeightNoise(std=1e-2, relative=True, seed=3),
        monitor,
        GradientNoise(std=1e-3, seed=5),
        SensitiveColumnBlinding(columns=SEVERED, layer="net.0"),
        GradientMask({"net.0.weight": TRAINABLE, "net.2.bias": False}),
        ModelCheckpoint(dirpath=out / "checkpoints", save_last=True),
    ]


def main() -> None:
    out = Path(sys.argv[1])
    settings = dict(
        accelerator="cpu", devices=2, strategy="ddp", precision="bf16-mixed", accumulate_grad_batches=2,
        gradient_clip_val=0.5, use_distributed_sampler=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1,
    )
    model = Everything(out)
    first_monitor = HessianMonitor(stats=("trace", "eigenvalues"), top_k=2, max_overhead=None)
    first = L.Trainer(max_epochs=2, logger=CSVLogger(out, name="phase1"), callbacks=callbacks(out, first_monitor), **settings)
    first.fit(model)

    monitor = HessianMonitor(stats=("trace", "eigenvalues"), top_k=2, max_overhead=None)
    resumed = Everything(out)
    second = L.Trainer(max_epochs=4, logger=CSVLogger(out, name="phase2"), callbacks=callbacks(out, monitor), **settings)
    second.fit(resumed, ckpt_path=out / "checkpoints" / "last.ckpt")

    x = regression_data(n=64, seed=9).tensors[0]
    report = verify_independence(resumed, x, SEVERED)
    torch.save(
        {
            "final": {k: v.detach().clone() for k, v in resumed.named_parameters()},
            "independent": report.independent,
            "trace": monitor.latest.trace.trace,
            "eigenvalues": monitor.latest.eigen.eigenvalues,
            "log_dir": second.log_dir,
            "epochs": second.current_epoch,
        },
        out / f"rank{second.global_rank}.pt",
    )


if __name__ == "__main__":
    run_distributed(main)
