"""Run by tests/test_noise_callbacks.py: GradientNoise and WeightNoise under 2-process gloo DDP.

Usage: python noise_ddp.py OUT_DIR
Each rank saves to OUT_DIR/rank{r}.pt: its initial and final parameters, the weights its first
training step saw (perturbed), the gradients after the noise at the first optimizer step, and the
loss of its first batch (it differs between ranks: each sees its own half of the data).
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradmask.callbacks.gradient_noise import GradientNoise
from lightning_gradmask.callbacks.weight_noise import WeightNoise

from utils import TinyRegressor, loader, regression_data, run_distributed, snapshot, trainer


class Recorder(TinyRegressor):
    def on_train_start(self) -> None:
        self.initial = snapshot(self)
        self.perturbed = None

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.perturbed is None:
            self.perturbed = snapshot(self)
            self.first_loss = loss.item()
        return loss


class NoisedGradients(Callback):
    def __init__(self) -> None:
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters()}


def main() -> None:
    out = Path(sys.argv[1])
    model = Recorder(optimizer=lambda p: torch.optim.AdamW(p, lr=0.05))
    probe = NoisedGradients()
    callbacks = [GradientNoise(std=0.05, seed=1), WeightNoise(std=0.1, relative=True, seed=2), probe]
    fit = trainer(strategy="ddp", devices=2, max_epochs=2, accumulate_grad_batches=2, callbacks=callbacks)
    fit.fit(model, loader(regression_data(n=64, seed=1), batch_size=8))
    torch.save(
        {
            "initial": model.initial,
            "final": snapshot(model),
            "perturbed": model.perturbed,
            "noised_grads": probe.grads,
            "first_loss": model.first_loss,
        },
        out / f"rank{fit.global_rank}.pt",
    )


if __name__ == "__main__":
    run_distributed(main)
