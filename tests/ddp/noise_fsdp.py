"""Run by tests/test_noise_callbacks.py: GradientNoise and WeightNoise under FSDP2 against DDP.

Usage: python noise_fsdp.py OUT_DIR
Trains the same model, data and seeds twice with 2 gloo processes: under ``strategy="ddp"`` and under
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with every ``Linear`` and the
network ``fully_shard``-ed in ``configure_model``. The hidden layer's weight (4500 x 16) spans two noise
chunks and its shards cut one; the output layer's weight (1 x 4500) is held whole by rank 0 and not
at all by rank 1. Each rank saves OUT_DIR/{ddp,fsdp}_rank{r}.pt: the whole parameters at the start,
the weights its first training step saw (perturbed), the state dict taken then, the gradients before and after the noise at
the first optimizer step, and the final parameters (gathered with ``full_tensor()`` under FSDP2).
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_gradmask.callbacks.gradient_noise import GradientNoise
from lightning_gradmask.callbacks.weight_noise import WeightNoise
from lightning_gradmask.functional.sharding import is_sharded

from utils import TinyRegressor, loader, regression_data, run_distributed, trainer


def whole(tensors):
    """``{name: tensor}`` with every DTensor gathered whole (a collective: every rank calls it in the same order)."""
    return {n: (t.full_tensor() if is_sharded(t) else t).detach().clone() for n, t in tensors.items()}


class Recorder(TinyRegressor):
    def __init__(self) -> None:
        super().__init__(features=16, hidden=4500, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def on_train_start(self) -> None:
        self.initial = whole(dict(self.named_parameters()))
        self.perturbed = None

    def training_step(self, batch, batch_idx):
        if self.perturbed is None:
            self.perturbed = whole(dict(self.named_parameters()))
            self.state_while_perturbed = whole(self.state_dict())  # WeightNoise writes the clean values
        return super().training_step(batch, batch_idx)


class NoisedGradients(Callback):
    """The gradients of the first optimizer step before (last ``on_after_backward``) and after the noise."""

    def __init__(self) -> None:
        self.clean = self.grads = None

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.grads is None:
            self.clean = whole({n: p.grad for n, p in pl_module.named_parameters()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = whole({n: p.grad for n, p in pl_module.named_parameters()})


def fit(strategy, out: Path, label: str) -> None:
    model = Recorder()
    probe = NoisedGradients()
    gradient_noise = GradientNoise(std=0.05, offset={"net.2.bias": 0.25}, seed=1)  # a bias rank 1 holds none of
    callbacks = [gradient_noise, WeightNoise(std=0.1, relative=True, seed=2), probe]
    run = trainer(strategy=strategy, devices=2, max_epochs=2, accumulate_grad_batches=2, callbacks=callbacks)
    run.fit(model, loader(regression_data(n=64, features=16, seed=1), batch_size=8))
    record = {
        "initial": model.initial,
        "perturbed": model.perturbed,
        "state_while_perturbed": model.state_while_perturbed,
        "clean_grads": probe.clean,
        "noised_grads": probe.grads,
        "final": whole(dict(model.named_parameters())),
    }
    torch.save(record, out / f"{label}_rank{run.global_rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    fit("ddp", out, "ddp")
    fit(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), out, "fsdp")


if __name__ == "__main__":
    run_distributed(main)
