"""Run by tests/test_pytorch_lightning.py: GradientMask, GradientNoise and MaskedL1Mixin under a
2-process gloo ``ddp`` run of the standalone ``pytorch_lightning`` Trainer.

Usage: python pytorch_lightning_ddp.py OUT_DIR
Each rank saves its initial and final parameters to OUT_DIR/rank{r}.pt at train end.
"""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradmask import GradientMask, GradientNoise, MaskedL1Mixin

from utils import loader, regression_data, run_distributed, snapshot
from utils import trainer as quiet_trainer

TRAINABLE = torch.zeros(8, 6, dtype=torch.bool)
TRAINABLE[:, :3] = True


class Model(MaskedL1Mixin, pl.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.out = out
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        self.register_masked_l1("net.2.weight", strength=0.01, proximal=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)

    def on_train_start(self) -> None:
        self.initial = snapshot(self)

    def on_train_end(self) -> None:
        torch.save({"final": snapshot(self), "initial": self.initial}, self.out / f"rank{self.global_rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    callbacks = [GradientMask({"net.0.weight": TRAINABLE, "net.2.bias": False}), GradientNoise(std=0.05, seed=3)]
    trainer = quiet_trainer(trainer_class=pl.Trainer, strategy="ddp", devices=2, callbacks=callbacks)
    trainer.fit(Model(out), loader(regression_data(n=64, seed=1), batch_size=8))


if __name__ == "__main__":
    run_distributed(main)
