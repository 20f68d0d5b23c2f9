"""Run by tests/test_gradient_mask.py: GradientMask under a 2-process gloo strategy.

Usage: python gradient_mask_ddp.py STRATEGY OUT_DIR [--differing-masks] [--compact] [--accumulate]
Each rank saves its final and initial parameters and its mask to OUT_DIR/rank{r}.pt at train end.
"""

import sys
from pathlib import Path

import torch

from lightning_gradmask import GradientMask

from utils import TinyRegressor, loader, regression_data, run_distributed, snapshot, trainer


class Recorder(TinyRegressor):
    """Saves what the test compares from inside each worker (ddp_spawn trains in child processes)."""

    def __init__(self, out: Path, callback: GradientMask) -> None:
        super().__init__(optimizer=adamw)
        self.out, self.callback = out, callback

    def on_train_start(self) -> None:
        self.initial = snapshot(self)

    def on_train_end(self) -> None:
        torch.save(
            {"final": snapshot(self), "initial": self.initial, "mask": self.callback.masks["net.0.weight"]},
            self.out / f"rank{self.global_rank}.pt",
        )


def adamw(params):
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


TRAINABLE = torch.zeros(8, 6, dtype=torch.bool)
TRAINABLE[:, :3] = True


def same_mask(name, param):
    return TRAINABLE


def rank_dependent_mask(name, param):
    import torch.distributed as dist

    return TRAINABLE if dist.get_rank() == 0 else ~TRAINABLE


def main() -> None:
    strategy, out = sys.argv[1], Path(sys.argv[2])
    differing = "--differing-masks" in sys.argv
    spec = rank_dependent_mask if differing else same_mask
    compact = "--compact" in sys.argv
    callback = GradientMask(trainable={"net.0.weight": spec, "net.2.bias": False}, compact=compact)
    model = Recorder(out, callback)
    # each rank sees a different half of the data, so the gradients differ before all-reduce
    accumulate = 2 if "--accumulate" in sys.argv else 1
    fit_trainer = trainer(
        strategy=strategy, devices=2, max_epochs=2, callbacks=[callback], accumulate_grad_batches=accumulate
    )
    fit_trainer.fit(model, loader(regression_data(n=64, seed=1), batch_size=8))


if __name__ == "__main__":
    run_distributed(main)
