"""Train a small MLP with chosen edges frozen, then show that they did not move.

Plain run (prints a report)::

    python examples/frozen_edges.py

As a LightningCLI command; each callback has a config in ``examples/configs/``, and every run ends
with a summary (final metrics, frozen entries checked bit for bit, where the logs are)::

    python examples/frozen_edges.py fit --config examples/configs/gradient_mask.yaml
    python examples/frozen_edges.py fit --config examples/configs/masked_l1.yaml
    python examples/frozen_edges.py fit --config examples/configs/hessian_monitor.yaml
    python examples/frozen_edges.py fit --config examples/configs/noise.yaml
"""

from __future__ import annotations

import sys
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradmask import GradientMask, MaskedL1Mixin

# a deprecation notice raised inside Lightning itself (its pytree helper on recent torch), not about this example
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class EdgeMLP(MaskedL1Mixin, L.LightningModule):
    """``net``: Linear(inputs, hidden) -> ReLU -> Linear(hidden, 1); MSE loss; AdamW.

    ``l1_strength > 0`` puts a masked L1 term on ``l1_target`` (every entry), as a loss term or,
    with ``l1_proximal``, as soft-thresholding after each step.
    """

    def __init__(
        self,
        inputs: int = 8,
        hidden: int = 16,
        lr: float = 0.01,
        weight_decay: float = 0.01,
        l1_target: str = "net.0.weight",
        l1_strength: float = 0.0,
        l1_proximal: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        if l1_strength > 0:
            self.register_masked_l1(l1_target, strength=l1_strength, proximal=l1_proximal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def hessian_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The loss HessianMonitor differentiates (it never calls training_step)."""
        x, y = batch
        return F.mse_loss(self(x), y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.hessian_loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fused=True: the non-fused AdamW is slow on the frozen entries' zero second moments on CPU
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True
        )


class SyntheticRegression(L.LightningDataModule):
    """A seeded regression task: ``y = sin(x @ w)`` plus noise."""

    def __init__(self, inputs: int = 8, samples: int = 512, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(self.hparams.seed)
        x = torch.randn(self.hparams.samples, self.hparams.inputs, generator=g)
        w = torch.randn(self.hparams.inputs, 1, generator=g)
        self.data = TensorDataset(x, torch.sin(x @ w) + 0.05 * torch.randn(self.hparams.samples, 1, generator=g))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.hparams.batch_size, shuffle=True)


def report() -> None:
    L.seed_everything(0, verbose=False)
    model = EdgeMLP()
    # Only the first four hidden units may read the first half of the inputs; the output bias is fixed.
    trainable = torch.zeros(16, 8, dtype=torch.bool)
    trainable[:4, :4] = True
    mask = GradientMask(trainable={"net.0.weight": trainable, "net.2.bias": False})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = L.Trainer(max_epochs=20, callbacks=[mask], logger=False, enable_checkpointing=False)
    trainer.fit(model, SyntheticRegression())

    weight, start = model.net[0].weight.detach(), before["net.0.weight"]
    frozen = ~trainable
    print("\nGradientMask report")
    print(f"  net.0.weight: {int(frozen.sum())} of {frozen.numel()} entries frozen")
    print(f"    frozen entries bit-identical to their start : {torch.equal(weight[frozen], start[frozen])}")
    print(f"    trainable entries that moved                : {int((weight[trainable] != start[trainable]).sum())} of {int(trainable.sum())}")
    print(f"  net.2.bias frozen, bit-identical              : {torch.equal(model.net[2].bias, before['net.2.bias'])}")
    print(f"  final training loss                           : {trainer.callback_metrics['train_loss']:.4f}")


class EdgeCLI(LightningCLI):
    """``fit`` as configured, then a summary of what each gradmask callback did."""

    def before_fit(self) -> None:
        self._start = {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        print("\nfit summary")
        for name, value in sorted(self.trainer.callback_metrics.items()):
            print(f"  {name:<38}: {float(value):.6g}")
        params = dict(self.model.named_parameters())
        for callback in self.trainer.callbacks:
            if isinstance(callback, GradientMask):
                for name, trainable in callback.masks.items():
                    frozen = ~trainable.to(params[name].device)
                    same = torch.equal(params[name].detach()[frozen], self._start[name][frozen])
                    print(f"  GradientMask {name}: {int(frozen.sum())} of {frozen.numel()} entries frozen, "
                          f"bit-identical to their start: {same}")
        for logger in self.trainer.loggers:
            print(f"  logs: {logger.log_dir}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        EdgeCLI(EdgeMLP, SyntheticRegression, seed_everything_default=0)
    else:
        report()
