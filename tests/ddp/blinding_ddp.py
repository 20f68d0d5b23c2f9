"""Run by tests/test_blinding_callback.py: SensitiveColumnBlinding under 2 gloo processes.

Usage: python blinding_ddp.py STRATEGY OUT_DIR
Trains two models from the same initial weights on data that differ only in the sensitive
columns (ordinary noise in one run, inf/NaN/huge values in the other), each rank seeing its own
shard. Each rank saves both final parameter sets to OUT_DIR/rank{r}.pt.
"""

import math
import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from lightning_gradmask.callbacks.sensitive_column_blinding import SensitiveColumnBlinding

from utils import TinyRegressor, loader, regression_data, run_distributed, snapshot, trainer

SENSITIVE = [1, 4]


def fit(x: torch.Tensor, y: torch.Tensor, strategy: str) -> tuple[dict, int]:
    model = TinyRegressor(optimizer=lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1))
    blind = SensitiveColumnBlinding(columns=SENSITIVE)
    fit_trainer = trainer(strategy=strategy, devices=2, max_epochs=2, callbacks=[blind])
    fit_trainer.fit(model, loader(TensorDataset(x, y), batch_size=8))
    return snapshot(model), fit_trainer.global_rank


def main() -> None:
    strategy, out = sys.argv[1], Path(sys.argv[2])
    x, y = regression_data(n=64, seed=1).tensors
    wild = x.clone()
    wild[0::3, SENSITIVE[0]] = math.nan
    wild[1::3, SENSITIVE[0]] = math.inf
    wild[2::3, SENSITIVE[0]] = -1e30
    wild[:, SENSITIVE[1]] = torch.arange(64, dtype=torch.float32) * 1e6
    plain, rank = fit(x, y, strategy)
    perturbed, _ = fit(wild, y, strategy)
    torch.save({"plain": plain, "perturbed": perturbed}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    run_distributed(main)
