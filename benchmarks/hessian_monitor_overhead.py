"""What HessianMonitor costs inside a training run, as a fraction of training time.

Each section trains the same model with and without the monitor in one process (interleaved rounds,
the same data and seed) and prints the monitor's share of the fit's training time (the sum of epoch
times, every callback's epoch-end work included), plus how many evaluations ran and what one cost.

    python benchmarks/hessian_monitor_overhead.py                       # every section
    python benchmarks/hessian_monitor_overhead.py --sections mlp warm   # mlp, resnet, transformer, warm

Sections:
    mlp          the 100k-parameter MLP, 200 batches of 128 per epoch, HessianMonitor() at its defaults
    resnet       a ResNet-18-sized CNN (11.2M parameters), one short epoch of 8 batches of 16, at the
                 defaults (the budget skips) and with max_overhead=None (one evaluation)
    transformer  a small GPT-2 (Hugging Face, SDPA attention), HessianMonitor() at its defaults
    warm         Hessian-vector products per tracked step (every_n_steps) with and without the
                 Lanczos warm start, on a fixed probe batch and on the latest training batch
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradmask import HessianMonitor


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self.hessian_loss(batch)

    def hessian_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class LanguageModel(Classifier):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=ids).logits

    def hessian_loss(self, batch):
        (ids,) = batch
        logits = self(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 64), nn.Tanh(), nn.Linear(64, 10))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


def resnet18(classes: int = 10) -> nn.Module:
    """The ResNet-18 layout (BasicBlocks 2-2-2-2, widths 64-512) for 32x32 inputs: 11.2M parameters."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def small_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


class EpochTimer(Callback):
    """Epoch wall time including every callback's on_train_epoch_end (this one runs last)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self.start)


def fit(module: L.LightningModule, data: DataLoader, epochs: int, callbacks: list[Any]) -> list[float]:
    timer = EpochTimer()
    trainer = L.Trainer(
        default_root_dir=tempfile.mkdtemp(prefix="hessian-overhead-"),  # the monitor's result files go here
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer],
    )
    trainer.fit(module, data)
    return timer.times


def compare(name: str, build, data_fn, epochs: int, rounds: int, monitor_kwargs: dict[str, Any]) -> None:
    """Interleaved rounds without and with the monitor; the monitor's share of total training time."""
    plain, monitored, last = [], [], None
    for _ in range(rounds):
        torch.manual_seed(0)
        plain.append(sum(fit(build(), data_fn(), epochs, [])))
        torch.manual_seed(0)
        last = HessianMonitor(**monitor_kwargs)
        monitored.append(sum(fit(build(), data_fn(), epochs, [last])))
    base, with_monitor = statistics.median(plain), statistics.median(monitored)
    budget = last._overhead
    params = sum(p.numel() for p in build().parameters())
    print(f"\n[{name}] {params:,} parameters, {epochs} epoch(s), {rounds} round(s), monitor {monitor_kwargs or 'defaults'}")
    print(f"  training time without monitor : {base:.2f} s (median)")
    print(f"  training time with monitor    : {with_monitor:.2f} s (median)")
    print(f"  monitor cost                  : {with_monitor / base - 1:+.1%} of training time")
    print(f"  evaluations run               : {budget.evaluations} ({'last one' if budget.evaluations else 'estimated'} {budget.last_cost:.2f} s, "
          f"{last.latest.num_matvecs if last.latest else 0} products); monitor's own share {budget.overhead():.1%}")


def classification_data(batches: int, batch_size: int, shape: tuple[int, ...], seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, *shape, generator=g)
    y = torch.randint(0, 10, (batches * batch_size,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def token_data(batches: int, batch_size: int = 16, length: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (batches * batch_size, length), generator=g)
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


class Tracked(Callback):
    def __init__(self, monitor: HessianMonitor) -> None:
        self.monitor, self.products, self.last = monitor, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        latest = self.monitor.latest
        if latest is not None and latest is not self.last:
            self.last = latest
            self.products.append(latest.num_matvecs)


class ColdMonitor(HessianMonitor):
    """The same monitor without the warm start (for the comparison only)."""

    def _warm_vector(self, operator):
        return None


def warm_versus_cold(steps: int, every: int) -> None:
    print(f"\n[warm] MLP, stats=eigenvalues, every_n_steps={every}, {steps} steps, lanczos_tol 1e-4 (default)")
    for probe_name, probe in (("fixed probe batch (dataloader=)", classification_data(1, 128, (64,), seed=9)), ("latest training batch", None)):
        row = []
        for cls in (ColdMonitor, HessianMonitor):
            torch.manual_seed(0)
            monitor = cls(stats="eigenvalues", every_n_steps=every, dataloader=probe, max_overhead=None, save=False)
            tracked = Tracked(monitor)
            module = Classifier(mlp())
            trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, tracked])
            trainer.fit(module, classification_data(200, 128, (64,)))
            later = tracked.products[1:]
            row.append(statistics.mean(later))
            print(f"  {probe_name:32s} {'cold' if cls is ColdMonitor else 'warm'}: first {tracked.products[0]}, "
                  f"later mean {statistics.mean(later):.1f} (min {min(later)}, max {max(later)}) over {len(later)} tracked steps")
        print(f"  {probe_name:32s} warm / cold products per tracked step: {row[1] / row[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["mlp", "resnet", "transformer", "warm"])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if "mlp" in args.sections:
        compare("mlp", lambda: Classifier(mlp()), lambda: classification_data(args.batches, 128, (64,)), args.epochs, args.rounds, {})
        compare("mlp, max_overhead=None", lambda: Classifier(mlp()), lambda: classification_data(args.batches, 128, (64,)),
                args.epochs, 1, {"max_overhead": None})
    if "resnet" in args.sections:
        resnet, images = (lambda: Classifier(resnet18(), lr=1e-3)), (lambda: classification_data(8, 16, (3, 32, 32)))
        compare("resnet18", resnet, images, 1, 1, {})
        compare("resnet18, max_overhead=None: one evaluation", resnet, images, 1, 1, {"max_overhead": None})
    if "transformer" in args.sections:
        compare("gpt2-small-config", lambda: LanguageModel(small_gpt2()), lambda: token_data(args.batches // 2), max(args.epochs // 2, 2), 1, {})
    if "warm" in args.sections:
        warm_versus_cold(steps=400, every=20)


if __name__ == "__main__":
    main()
