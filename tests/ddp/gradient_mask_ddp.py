"""Run by tests/test_gradient_mask.py: GradientMask under a 2-process gloo strategy.

Usage: python gradient_mask_ddp.py STRATEGY OUT_DIR [--differing-masks]
Each rank saves its final parameters, its initial parameters and its mask to OUT_DIR/rank{r}.pt.
"""

import sys
from pathlib import Path

import torch
from utils import TinyRegressor, loader, regression_data, snapshot, trainer

from lightning_gradmask import GradientMask


class Recorder(TinyRegressor):
    def on_train_start(self) -> None:
        self.initial = snapshot(self)


def main() -> None:
    strategy, out = sys.argv[1], Path(sys.argv[2])
    differing = "--differing-masks" in sys.argv
    model = Recorder(optimizer=lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1))
    mask = torch.zeros(8, 6, dtype=torch.bool)
    mask[:, :3] = True

    def spec(name, param):
        if differing:
            import torch.distributed as dist

            return mask if dist.get_rank() == 0 else ~mask
        return mask

    callback = GradientMask(trainable={"net.0.weight": spec, "net.2.bias": False})
    # each rank sees a different half of the data, so the gradients differ before all-reduce
    fit_trainer = trainer(strategy=strategy, devices=2, max_epochs=2, callbacks=[callback])
    fit_trainer.fit(model, loader(regression_data(n=64, seed=1), batch_size=8))
    rank = fit_trainer.global_rank
    torch.save(
        {"final": snapshot(model), "initial": model.initial, "mask": callback.masks["net.0.weight"]},
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
