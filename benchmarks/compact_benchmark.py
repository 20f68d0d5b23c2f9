"""Sparse fine-tuning with ``GradientMask(compact=True)``, and whole-parameter freezing (issue 14).

Two parts, each measured side by side in one invocation (ratios against a baseline of the same run):

``--part memory`` (default): the 20M-parameter MLP 2000 -> 5000 -> 2000 (two weights of 10M entries),
AdamW, with 1% or 50% of each weight trainable (random entries; biases train). Variants: ``plain``
(everything trains), ``dense`` (``GradientMask(masks)``) and ``compact`` (``GradientMask(masks,
compact=True)``). Each fit runs in a fresh process (``--rounds`` times, variants in rotated order);
reported: the peak RSS above the built model and masks (``ru_maxrss`` read in ``on_train_end``, that
is, during training), and the median CPU time of a step (``on_train_batch_start`` to
``on_train_batch_end``, after warm-up steps), both as medians and as ratios to ``plain``.

``--part freeze``: a 4 x 1024 MLP whose first three Linear layers are frozen whole. Variants, in one
process, interleaved over rounds: ``manual`` (``requires_grad_(False)`` by hand, as Lightning's
``BaseFinetuning`` does), ``gradient_mask`` (``GradientMask({"re:net\\\\.[024]\\\\..*": False})``) and
``before`` (the same callback with the requires_grad switch disabled: what the spec cost before).

Options of the memory part: ``--log-stats`` logs every step (a ``CSVLogger`` in a temporary folder,
``GradientMask(log_stats=True)``), so the removed-gradient norm is measured at each step;
``--mmap-threshold BYTES`` runs every child with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at that size,
which turns off glibc's dynamic threshold: freed blocks of that size or more go back to the system at
once, so the RSS follows the live tensors instead of what the heap keeps after freeing them;
``--hidden`` sets the MLP's hidden width and ``--variants`` the variants run (ratios are to the first);
``--trace VARIANT`` runs one fit and prints, at each hook, the RSS above the baseline of the peak figure
(``ru_maxrss`` before the fit: hence negative at first) and glibc's heap
(``mallinfo2``: bytes in the brk heap, in use, free, and in mmap blocks).

Usage::

    python benchmarks/compact_benchmark.py --rounds 3              # memory and step time, 3-4 minutes
    python benchmarks/compact_benchmark.py --rounds 3 --trainable 0.5 --mmap-threshold 1048576
    python benchmarks/compact_benchmark.py --trace compact --trainable 0.5
    python benchmarks/compact_benchmark.py --rounds 5 --variants plain --hidden 2500   # plain, 20 MB weights
    python benchmarks/compact_benchmark.py --part freeze --rounds 6   # whole-parameter freezing, 1 minute

One torch thread (``--threads``): on a shared machine a two-thread kernel waits for its slower thread.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_gradmask import GradientMask
from lightning_gradmask.callbacks import gradient_mask as gradient_mask_module

MEMORY_VARIANTS = ("plain", "dense", "compact")


class MLP(L.LightningModule):
    def __init__(self, sizes: list[int], seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        self.net = nn.Sequential(*layers)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)


class StepClock(Callback):
    """CPU time of every step, and the peak RSS seen by the end of training (before teardown)."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.peak_kib = 0
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.process_time()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.cpu.append(time.process_time() - self._start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def random_masks(model: nn.Module, trainable: float, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < trainable for n, p in model.named_parameters() if n.endswith("weight")}


def batches(sizes: list[int], count: int, batch_size: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(batch_size, sizes[0], generator=g), torch.randn(batch_size, sizes[-1], generator=g)) for _ in range(count)]
    return torch.utils.data.DataLoader(data, batch_size=None)


def fit(model: L.LightningModule, callbacks: list[Callback], data: Any, steps: int, logger: Any = False) -> StepClock:
    clock = StepClock()
    L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=logger, enable_checkpointing=False, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, clock],
    ).fit(model, data)
    return clock


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
    )]


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def heap_line() -> str:
    """glibc's heap (``mallinfo2``, glibc 2.33 or later): brk heap size, in use, free; mmap blocks."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return "(no glibc mallinfo2)"
    mib = 2**20
    return (f"brk heap {info.arena / mib:6.1f} MiB (in use {info.uordblks / mib:6.1f}, free {info.fordblks / mib:5.1f}), "
            f"mmap blocks {info.hblkhd / mib:6.1f} MiB ({info.hblks})")


class MemoryTrace(Callback):
    """RSS above ``base`` and glibc's heap at each hook of a fit, and inside every optimizer step."""

    def __init__(self, base_mib: float) -> None:
        self.base = base_mib
        self.lines: list[str] = []

    def mark(self, where: str) -> None:
        self.lines.append(f"{where:16s} RSS {rss_mib() - self.base:7.1f} MiB   {heap_line()}")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark("fit start")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark("train start")
        for optimizer in trainer.optimizers:  # the closure (forward, backward) runs inside the step
            optimizer.register_step_post_hook(lambda *_: self.mark("after step"))

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark("after backward")


# ---------------------------------------------------------------------------- memory
# ---------------------------------------------------------------------------- memory
def memory_child(variant: str, trainable: float, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    sizes = [2000, args.hidden, 2000]
    model = MLP(sizes)
    masks = random_masks(model, trainable)
    data = batches(sizes, args.warmup + args.steps, args.batch_size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = args.log_stats
    callbacks: list[Callback] = {
        "plain": [],
        "dense": [GradientMask(masks, log_stats=stats)],
        "compact": [GradientMask(masks, compact=True, log_stats=stats)],
    }[variant]
    trace = MemoryTrace(base / 1024) if args.trace else None
    with tempfile.TemporaryDirectory() as folder:
        logger = L.pytorch.loggers.CSVLogger(folder) if stats else False
        clock = fit(model, [*callbacks, *([trace] if trace else [])], data, args.warmup + args.steps, logger)
    if trace is not None:
        print("\n".join(trace.lines))
        print(f"peak RSS above the model (ru_maxrss): {clock.peak_kib / 1024 - base / 1024:.1f} MiB")
    print(f"RESULT {clock.peak_kib - base} {statistics.median(clock.cpu[args.warmup:])}")


def child_command(variant: str, trainable: float, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, __file__, "--child", variant, "--child-trainable", str(trainable), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
        "--hidden", str(args.hidden), *(["--log-stats"] if args.log_stats else []), *(["--trace", variant] if args.trace else []),
    ]


def child_environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    return env


def memory_benchmark(args: argparse.Namespace) -> None:
    if args.trace:
        for trainable in args.trainable:
            print(f"--- {args.trace}, {trainable:.0%} trainable")
            subprocess.run(child_command(args.trace, trainable, args), check=True, env=child_environment(args))
        return
    threshold = "" if args.mmap_threshold is None else f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}"
    size = (2000 * args.hidden * 2 + args.hidden + 2000) / 1e6
    print(f"MLP 2000 -> {args.hidden} -> 2000 ({size:.1f}M parameters), AdamW, batch {args.batch_size}, {args.threads} thread(s), "
          f"{args.warmup} + {args.steps} steps, {args.rounds} fresh processes per variant"
          f"{', statistics logged every step' if args.log_stats else ''}{threshold}")
    for trainable in args.trainable:
        variants = tuple(args.variants)
        peaks: dict[str, list[float]] = {v: [] for v in variants}
        steps: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = list(variants[r % len(variants):] + variants[: r % len(variants)])
            for variant in order if r % 2 == 0 else order[::-1]:
                out = subprocess.run(
                    child_command(variant, trainable, args), check=True, capture_output=True, text=True,
                    env=child_environment(args),
                ).stdout
                peak, step = out.split("RESULT")[-1].split()[:2]
                peaks[variant].append(int(peak) / 1024)
                steps[variant].append(float(step))
        first = variants[0]  # plain unless --variants leaves it out
        plain_peak, plain_step = statistics.median(peaks[first]), statistics.median(steps[first])
        print(f"\n{trainable:.0%} of each weight trainable")
        print("variant   peak RSS above the model, MiB (runs)        vs plain   step CPU ms   vs plain")
        for variant in variants:
            peak, step = statistics.median(peaks[variant]), statistics.median(steps[variant])
            runs = " ".join(f"{p:.0f}" for p in peaks[variant])
            print(f"{variant:8s} {peak:8.1f} ({runs:24s}) {peak / plain_peak:10.2f}x {step * 1e3:12.1f} "
                  f"{step / plain_step:9.2f}x")


# ---------------------------------------------------------------------------- whole-parameter freezing
def freeze_benchmark(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    sizes = [1024] * 5 + [10]
    spec = {"re:net\\.[024]\\..*": False}
    data = batches(sizes, args.warmup + args.steps, args.batch_size)
    variants = ("manual", "gradient_mask", "before")
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    original = gradient_mask_module._single_device
    for r in range(args.rounds):
        order = list(variants[r % 3:] + variants[: r % 3])
        this_round: dict[str, float] = {}
        for variant in order if r % 2 == 0 else order[::-1]:
            model = MLP(sizes)
            callbacks: list[Callback] = []
            if variant == "manual":
                for name, param in model.named_parameters():
                    if name.split(".")[1] in ("0", "2", "4"):
                        param.requires_grad_(False)
            else:
                callbacks = [GradientMask(spec, log_stats=False)]
            gradient_mask_module._single_device = (lambda trainer: False) if variant == "before" else original  # type: ignore[assignment]
            try:
                clock = fit(model, callbacks, data, args.warmup + args.steps)
            finally:
                gradient_mask_module._single_device = original  # type: ignore[assignment]
            this_round[variant] = statistics.median(clock.cpu[args.warmup:])
            cpu[variant].extend(clock.cpu[args.warmup:])
        for variant in variants:
            ratios[variant].append(this_round[variant] / this_round["manual"])
    print(f"MLP 4 x 1024 (+ Linear(1024, 10)), layers 0, 2, 4 frozen whole, AdamW, batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.rounds} rounds of {args.steps} timed steps")
    print("variant          median step CPU ms   vs manual (pooled)   vs manual (median of per-round ratios)")
    manual = statistics.median(cpu["manual"])
    for variant in variants:
        med = statistics.median(cpu[variant])
        print(f"{variant:16s} {med * 1e3:12.2f} {med / manual:18.3f}x {statistics.median(ratios[variant]):18.3f}x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("memory", "freeze"), default="memory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trainable", type=float, nargs="+", default=[0.01, 0.5])
    parser.add_argument("--hidden", type=int, default=5000, help="hidden width of the MLP 2000 -> hidden -> 2000")
    parser.add_argument("--variants", nargs="+", choices=MEMORY_VARIANTS, default=list(MEMORY_VARIANTS))
    parser.add_argument("--log-stats", action="store_true", help="log GradientMask's statistics at every step")
    parser.add_argument("--mmap-threshold", type=int, help="glibc MALLOC_MMAP_THRESHOLD_ (bytes) for every child")
    parser.add_argument("--trace", choices=MEMORY_VARIANTS, help="one fit of this variant, memory at each hook")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-trainable", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.child:
        memory_child(args.child, args.child_trainable, args)
    elif args.part == "freeze":
        freeze_benchmark(args)
    else:
        memory_benchmark(args)


if __name__ == "__main__":
    main()
