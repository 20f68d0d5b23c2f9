"""What HessianMonitor costs inside a training run, as a fraction of epoch time.

Trains the same MLP (about 100k parameters) for a few epochs twice in one process, interleaved:
without the monitor and with ``HessianMonitor`` at its default settings (every epoch, trace and
top eigenvalue). Prints the median epoch time of each and the monitor's share.

    python benchmarks/hessian_monitor_overhead.py            # defaults: 200 batches of 128 per epoch
    python benchmarks/hessian_monitor_overhead.py --batches 50
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradmask import HessianMonitor


class MLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 64), nn.Tanh(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self.hessian_loss(batch)

    def hessian_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class EpochTimer(Callback):
    """Epoch wall time including every callback's on_train_epoch_end (this one runs last)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self.start)


def run(batches: int, batch_size: int, epochs: int, monitor: bool) -> tuple[list[float], HessianMonitor | None]:
    torch.manual_seed(0)
    x = torch.randn(batches * batch_size, 64)
    y = torch.randint(0, 10, (batches * batch_size,))
    data = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    timer = EpochTimer()
    hessian = HessianMonitor() if monitor else None
    callbacks = ([hessian] if hessian else []) + [timer]
    trainer = L.Trainer(
        default_root_dir=tempfile.mkdtemp(prefix="hessian-overhead-"),  # the monitor's result files go here
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(MLP(), data)
    return timer.times[1:], hessian  # the first epoch warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    plain, monitored, hessian = [], [], None
    for _ in range(args.rounds):
        plain += run(args.batches, args.batch_size, args.epochs, monitor=False)[0]
        times, hessian = run(args.batches, args.batch_size, args.epochs, monitor=True)
        monitored += times
    base, with_monitor = statistics.median(plain), statistics.median(monitored)
    params = sum(p.numel() for p in MLP().parameters())
    print(f"MLP with {params} parameters, {args.batches} batches of {args.batch_size} per epoch, {args.threads} thread(s)")
    print(f"epoch without monitor : {base:.3f} s (median of {len(plain)})")
    print(f"epoch with monitor    : {with_monitor:.3f} s (median of {len(monitored)})")
    print(f"monitor cost          : {with_monitor / base - 1:+.1%} of epoch time")
    latest = hessian.latest
    print(f"last evaluation       : {latest.num_products} Hessian-vector products, trace {latest.trace:.4g} "
          f"+- {latest.trace_stderr:.2g}, top eigenvalue {float(latest.eigenvalues[0]):.4g}")


if __name__ == "__main__":
    main()
