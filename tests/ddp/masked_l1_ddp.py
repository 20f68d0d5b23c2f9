"""Run by tests/test_masked_l1.py: MaskedL1Mixin (loss term and proximal term) under 2-process DDP.

Usage: python masked_l1_ddp.py OUT_DIR
Each rank saves its final parameters and its last logged penalty to OUT_DIR/rank{r}.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from test_masked_l1 import DDP_TERMS, L1Regressor, sgd
from torch.utils.data import DataLoader, DistributedSampler

from utils import regression_data, run_distributed, snapshot, trainer


class Interleaved(L.LightningDataModule):
    """Rank r reads samples r, r+2, ... in order: each step's two batches of 8 together are the
    single-process batch of 16 (Lightning's own sampler would shuffle the training data)."""

    def train_dataloader(self) -> DataLoader:
        data = regression_data(n=64, seed=1)
        return DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=False))


def main() -> None:
    out = Path(sys.argv[1])
    model = L1Regressor(DDP_TERMS, optimizer=sgd())
    fit_trainer = trainer(strategy="ddp", devices=2, max_epochs=2, use_distributed_sampler=False)
    fit_trainer.fit(model, datamodule=Interleaved())
    torch.save(
        {"final": snapshot(model), "penalty": fit_trainer.callback_metrics["masked_l1/penalty"]},
        out / f"rank{fit_trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    run_distributed(main)
