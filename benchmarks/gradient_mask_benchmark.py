"""How much does ``GradientMask`` cost per training step? (issue #2, "Speed")

Three ways of training the same MLP (about 4.2M parameters, AdamW, half of every weight's entries
frozen at random) are timed through ``lightning.Trainer.fit``, interleaved over several rounds:

* ``plain``         -- no mask at all;
* ``gradient_mask`` -- ``GradientMask(trainable=masks)`` attached as a callback, as users run it;
* ``prune``         -- ``torch.nn.utils.prune.custom_from_mask`` with the same masks (it zeroes
  the pruned entries; what is compared is the cost of the mechanism, not the model);
* ``compact``       -- ``GradientMask(trainable=masks, compact=True)``, only with ``--variants``.

A callback records ``time.perf_counter()`` and ``time.process_time()`` in ``on_train_batch_start``
and ``on_train_batch_end``, so one step is forward, backward, every callback hook, the optimizer
step and its step hooks (``GradientMask``'s exact restore runs in one); data loading and epoch
boundaries are outside. The first ``--warmup`` steps of each run are dropped. The variants run in
a rotated, alternately reversed order in every round. Reported for wall and CPU time: the median
step of every variant and its ratio to ``plain`` from the same invocation, three ways (pooled
medians; median of the per-round ratios; best round against best round). On a shared machine
the CPU-time figures are the steadier ones: time spent descheduled is not counted.

Usage::

    python benchmarks/gradient_mask_benchmark.py                # train steps, 1-2 minutes
    python benchmarks/gradient_mask_benchmark.py --profile      # + where GradientMask's time goes
    python benchmarks/gradient_mask_benchmark.py --fused        # AdamW(fused=True)
    python benchmarks/gradient_mask_benchmark.py --optimizer sgd   # SGD momentum + weight decay
    python benchmarks/gradient_mask_benchmark.py --mechanism    # restore / mask kernels only, 15 s
    python benchmarks/gradient_mask_benchmark.py --floor --fused   # the least any exact mask can cost here, 5 s
    python benchmarks/gradient_mask_benchmark.py --fused --variants plain,gradient_mask,compact   # + compact=True
    python benchmarks/gradient_mask_benchmark.py --memory --rounds 3   # peak RSS per masked entry, 1 min
    python benchmarks/gradient_mask_benchmark.py --blocks 1000 --rounds 4   # 2,000 small tensors: mask, gradient and weight noise
    python benchmarks/gradient_mask_benchmark.py --steps 60 --rounds 4 --width 1024 --threads 2

``--threads`` defaults to 1: on a shared 2-core machine a two-thread kernel waits for its slower
thread whenever another process holds a core, which made per-round ratios swing from 0.2x to 26x.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import prune

from lightning_gradmask.callbacks.gradient_mask import GradientMask
from lightning_gradmask.functional.constraints import ParameterConstraints
from lightning_gradmask.functional.frozen import FrozenEntries

VARIANTS = ("plain", "gradient_mask", "prune")
#: also available with ``--variants``: ``GradientMask(trainable=masks, compact=True)``
EXTRA_VARIANTS = ("compact",)


# ---------------------------------------------------------------------------- model and data
class MLP(L.LightningModule):
    """``depth`` x (Linear(width, width) + ReLU), then Linear(width, classes); AdamW, cross-entropy."""

    def __init__(
        self, width: int, depth: int, classes: int = 10, seed: int = 0, fused: bool = False, optimizer: str = "adamw"
    ) -> None:
        super().__init__()
        self.fused = fused
        self.optimizer = optimizer
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=self.fused or None)


class Batches(torch.utils.data.Dataset):
    """A few ready-made synthetic batches (use with ``DataLoader(batch_size=None)``)."""

    def __init__(self, count: int, batch_size: int, width: int, classes: int = 10, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = [
            (torch.randn(batch_size, width, generator=g), torch.randint(0, classes, (batch_size,), generator=g))
            for _ in range(count)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[index]


def weight_masks(model: nn.Module, frozen_fraction: float, seed: int = 2) -> dict[str, torch.Tensor]:
    """``{name: trainable bool mask}`` for every ``*.weight``: a random ``frozen_fraction`` is frozen."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(p.shape, generator=g) >= frozen_fraction
        for name, p in model.named_parameters()
        if name.endswith("weight")
    }


# ---------------------------------------------------------------------------- timing
class StepTimer(Callback):
    """Wall and process CPU time of every step, from ``on_train_batch_start`` to ``on_train_batch_end``."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def build(variant: str, args: argparse.Namespace) -> tuple[MLP, list[Callback]]:
    model = MLP(args.width, args.depth, seed=args.seed, fused=args.fused, optimizer=args.optimizer)
    masks = weight_masks(model, args.frozen_fraction)
    if variant == "plain":
        return model, []
    if variant == "gradient_mask":
        return model, [GradientMask(trainable=masks)]
    if variant == "compact":
        return model, [GradientMask(trainable=masks, compact=True)]
    if variant == "prune":
        modules = dict(model.named_modules())
        for name, trainable in masks.items():
            module_name, _, param_name = name.rpartition(".")
            prune.custom_from_mask(modules[module_name], param_name, mask=trainable.float())
        return model, []
    raise ValueError(f"unknown variant {variant!r}")


def fit(variant: str, args: argparse.Namespace) -> StepTimer:
    """One ``Trainer.fit`` of ``warmup + steps`` steps; the timer holds only the timed steps."""
    model, callbacks = build(variant, args)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.warmup + args.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer, *callbacks],
    )
    data = torch.utils.data.DataLoader(Batches(8, args.batch_size, args.width), batch_size=None)
    trainer.fit(model, data)
    del timer.wall[: args.warmup], timer.cpu[: args.warmup]
    return timer


def round_order(r: int, variants: tuple[str, ...]) -> list[str]:
    """Rotate the variants every round and reverse every other round, so no variant always runs first."""
    k = r % len(variants)
    order = list(variants[k:] + variants[:k])
    return order[::-1] if r % 2 else order


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def train_benchmark(args: argparse.Namespace) -> None:
    params = sum(p.numel() for p in MLP(args.width, args.depth).parameters())
    masks = weight_masks(MLP(args.width, args.depth), args.frozen_fraction)
    frozen = sum(int((~m).sum()) for m in masks.values())
    print(
        f"MLP width {args.width}, depth {args.depth}: {params / 1e6:.2f}M parameters, "
        f"{frozen / 1e6:.2f}M weight entries frozen; "
        f"{'SGD(momentum=0.9, weight_decay=1e-4)' if args.optimizer == 'sgd' else 'AdamW' + ('(fused=True)' if args.fused else '')}; "
        f"batch {args.batch_size}; {args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed) "
        "steps per variant"
    )
    if args.variants:
        variants = tuple(args.variants.split(","))
        unknown = [v for v in variants if v not in VARIANTS + EXTRA_VARIANTS]
        if args.skip_prune:
            raise SystemExit("--variants and --skip-prune: give one of them")
        if unknown or variants[0] != "plain" or len(set(variants)) != len(variants):
            raise SystemExit(
                f"--variants: start with plain, no repeats, choose from {VARIANTS + EXTRA_VARIANTS}; got {args.variants!r}"
            )
    else:
        variants = VARIANTS if not args.skip_prune else VARIANTS[:2]
    runs: dict[str, list[StepTimer]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in round_order(r, variants):
            timer = fit(variant, args)
            runs[variant].append(timer)
            print(
                f"  round {r + 1}: {variant:21s} median {statistics.median(timer.wall) * 1e3:7.2f} ms/step wall, "
                f"{statistics.median(timer.cpu) * 1e3:7.2f} ms CPU",
                flush=True,
            )
    for clock in ("wall", "cpu"):
        report(runs, clock)


def report(runs: dict[str, list[StepTimer]], clock: str) -> None:
    """Median step time per variant and its ratio to ``plain``, pooled and round by round."""

    def steps(timer: StepTimer) -> list[float]:
        return timer.wall if clock == "wall" else timer.cpu

    plain_pooled = statistics.median([t for timer in runs["plain"] for t in steps(timer)])
    plain_best = min(statistics.median(steps(timer)) for timer in runs["plain"])
    title = "wall-clock time" if clock == "wall" else "process CPU time (less sensitive to other processes)"
    print(f"\n{title}, ms per step")
    print("variant                median  (IQR)              x plain: pooled  round-wise  best rounds")
    for variant, timers in runs.items():
        pooled = [t for timer in timers for t in steps(timer)]
        q1, med, q3 = quartiles(pooled)
        per_round = [statistics.median(steps(a)) / statistics.median(steps(b)) for a, b in zip(timers, runs["plain"])]
        best = min(statistics.median(steps(timer)) for timer in timers)
        print(
            f"{variant:21s} {med * 1e3:7.2f}  ({q1 * 1e3:6.2f}-{q3 * 1e3:6.2f})"
            f"     {med / plain_pooled:6.3f}     {statistics.median(per_round):6.3f}     {best / plain_best:6.3f}"
            f"    rounds: {' '.join(f'{x:.2f}' for x in per_round)}"
        )


# ---------------------------------------------------------------------------- profile
@contextlib.contextmanager
def timed_methods(targets: list[tuple[type, str]], calls: dict[str, list[float]]) -> Iterator[None]:
    """Wrap class methods so that the wall time of every call lands in ``calls[label]``."""
    originals = [(cls, name, cls.__dict__[name]) for cls, name in targets]

    def wrap(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                calls.setdefault(label, []).append(time.perf_counter() - start)

        return timed

    for cls, name, fn in originals:
        setattr(cls, name, wrap(f"{cls.__name__}.{name}", fn))
    try:
        yield
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)


def profile(args: argparse.Namespace) -> None:
    """Hook-level and operator-level breakdown of one run of each variant."""
    print("\n== where the time goes (one extra run per variant) ==")
    calls: dict[str, list[float]] = {}
    targets = [
        (GradientMask, "on_after_backward"),
        (FrozenEntries, "mask_gradients_"),
        (ParameterConstraints, "_before_step"),
        (FrozenEntries, "capture_"),
        (ParameterConstraints, "_after_step"),
        (FrozenEntries, "restore_"),
    ]
    with timed_methods(targets, calls):
        timer = fit("gradient_mask", args)
    print(
        f"GradientMask run: median step {statistics.median(timer.wall) * 1e3:.2f} ms; "
        "its hooks (ms per call; _before_step captures once, at the first step):"
    )
    for label, seconds in calls.items():
        print(
            f"  {label:40s} median {statistics.median(seconds) * 1e3:7.2f}   max {max(seconds) * 1e3:7.2f}"
            f"   ({len(seconds)} calls)"
        )

    profile_steps = min(args.steps, 20)
    for variant in VARIANTS:
        quick = argparse.Namespace(**{**vars(args), "steps": profile_steps})
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fit(variant, quick)
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        total_steps = quick.warmup + quick.steps
        print(f"\n{variant}: top operators by self CPU time, ms per step ({total_steps} steps, profiler on)")
        for e in rows:
            per_step = e.self_cpu_time_total / 1e3 / total_steps
            print(f"  {e.key:40s} {per_step:7.2f}  ({e.count / total_steps:.1f} calls/step)")


# ---------------------------------------------------------------------------- mechanism
def int_view(t: torch.Tensor) -> torch.Tensor:
    """The same memory reinterpreted as a signed integer of the element's size."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@dataclass
class Frozen:
    """One parameter's mask in every form the kernels below use, and the values to restore."""

    frozen: torch.Tensor  # bool, True where frozen
    values: torch.Tensor  # the parameter's captured values

    def __post_init__(self) -> None:
        self.trainable = self.frozen.logical_not()
        self.keep = self.trainable.float()
        self.keep_bits = self.trainable.to(torch.int32).neg_()  # all ones where trainable, 0 where frozen
        self.snapshot = self.values.masked_fill(self.trainable, 0)  # frozen values, +0 elsewhere
        self.snapshot_bits = int_view(self.snapshot)
        self.compact = self.values[self.frozen]


Kernel = Callable[[torch.Tensor, Frozen], Any]

RESTORES: dict[str, Kernel] = {
    "(a) masked_fill_(frozen, 0).add_(snapshot) [now]": lambda w, f: w.masked_fill_(f.frozen, 0).add_(f.snapshot),
    "(b) mul_(keep_float).add_(snapshot)": lambda w, f: w.mul_(f.keep).add_(f.snapshot),
    "(c1) torch.where(frozen, snapshot, w, out=w)": lambda w, f: torch.where(f.frozen, f.snapshot, w, out=w),
    "(c2) w.copy_(torch.where(frozen, snapshot, w))": lambda w, f: w.copy_(torch.where(f.frozen, f.snapshot, w)),
    "(d) masked_scatter_(frozen, compact)": lambda w, f: w.masked_scatter_(f.frozen, f.compact),
    "(e) w[frozen] = compact": lambda w, f: w.__setitem__(f.frozen, f.compact),
    "(f1) int view: &= keep_bits, |= snapshot_bits": lambda w, f: (
        int_view(w).bitwise_and_(f.keep_bits).bitwise_or_(f.snapshot_bits)
    ),
    "(f2) as (f1), keep_bits made from bool per call": lambda w, f: (
        int_view(w).bitwise_and_(f.frozen.to(torch.int32).sub_(1)).bitwise_or_(f.snapshot_bits)
    ),
}

GRAD_MASKS: dict[str, Kernel] = {
    "(g1) grad.masked_fill_(frozen, 0) [now]": lambda g, f: g.masked_fill_(f.frozen, 0),
    "(g2) grad.mul_(keep_float)": lambda g, f: g.mul_(f.keep),
    "(g3) grad.mul_(trainable_bool)": lambda g, f: g.mul_(f.trainable),
    "(g4) int view: &= keep_bits": lambda g, f: int_view(g).bitwise_and_(f.keep_bits),
    "(g5) as (g4), keep_bits made from bool per call": lambda g, f: int_view(g).bitwise_and_(
        f.frozen.to(torch.int32).sub_(1)
    ),
}


def restore_exactness(kernel: Kernel, case: Frozen, stepped: torch.Tensor) -> str:
    """Frozen entries must come back bit for bit; trainable entries must not be touched."""
    w = stepped.clone()
    kernel(w, case)
    bits = int_view(w)
    frozen, trainable = case.frozen, case.trainable
    if torch.equal(bits[frozen], int_view(case.values)[frozen]):
        frozen_note = "frozen bit-identical"
    elif torch.equal(w[frozen], case.values[frozen]):
        frozen_note = "frozen equal values but -0.0 -> +0.0"
    else:
        frozen_note = "frozen WRONG (inf/NaN stay or spread)"
    if torch.equal(bits[trainable], int_view(stepped)[trainable]):
        train_note = "trainable untouched"
    elif torch.allclose(w[trainable], stepped[trainable], rtol=0, atol=0, equal_nan=True):
        train_note = "trainable equal values but -0.0 -> +0.0"
    else:
        train_note = "trainable CHANGED"
    return f"{frozen_note}; {train_note}"


def grad_exactness(kernel: Kernel, case: Frozen, stepped: torch.Tensor) -> str:
    """Frozen gradient entries must become exactly +0 (also inf/NaN); trainable ones untouched."""
    g = stepped.clone()
    kernel(g, case)
    bits = int_view(g)
    zero = bool((bits[case.frozen] == 0).all())
    untouched = torch.equal(bits[case.trainable], int_view(stepped)[case.trainable])
    return (
        f"{'frozen exactly +0' if zero else 'frozen NOT ZERO (inf/NaN -> NaN)'}; "
        f"{'trainable untouched' if untouched else 'trainable CHANGED'}"
    )


def floor_benchmark(args: argparse.Namespace) -> None:
    """The least any exact mask that runs outside the optimizer's and autograd's kernels can cost here.

    With frozen entries scattered at random, every cache line of every masked gradient holds frozen entries
    to zero, and every cache line of every masked weight holds frozen entries to write back after the step:
    whatever the encoding of the mask, one pass must read and write each gradient and one pass must read
    and write each weight (16 bytes per entry of float32, the mask itself not counted). This times those
    two bare passes (no mask read at all: an in-place grouped multiply by 1 of the integer views) next to
    the package's two kernels, on the MLP's weights, with 256 MiB written before each call, and puts them
    against a plain step of the same model measured in the same run. This bounds a *dense* mask (the
    optimizer steps every entry); ``compact=True`` steps only the trainable entries and is not bounded by it.
    """
    model = MLP(args.width, args.depth, seed=args.seed)
    masks = weight_masks(model, args.frozen_fraction)
    params = dict(model.named_parameters())
    weights = [params[name] for name in masks]
    for weight in weights:
        weight.grad = torch.randn_like(weight)
    frozen = FrozenEntries({name: (params[name], mask) for name, mask in masks.items()})
    frozen.capture_()
    flush = torch.zeros(2**26)  # 256 MiB written before every call: what a step's other work leaves in the caches
    entries = sum(w.numel() for w in weights)

    # each reads and writes every byte and changes none, one grouped call per pass; the gradients' integer
    # views are made at each call (a step's gradients are new tensors), the weights' once (as the restore does)
    weight_bits = [int_view(w.detach()) for w in weights]

    def bare_gradient_pass() -> None:
        torch._foreach_mul_([int_view(w.grad) for w in weights if w.grad is not None], 1)

    def bare_weight_pass() -> None:
        torch._foreach_mul_(weight_bits, 1)

    def timed(fn: Callable[[], Any]) -> float:
        runs = []
        for i in range(args.mechanism_reps + 3):
            flush.add_(1)
            start = time.perf_counter()
            fn()
            if i >= 3:
                runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    rows: list[tuple[str, int, Callable[[], Any]]] = [  # (what, bytes moved per entry, call)
        ("GradientMask: gradient masking", 12, lambda: frozen.mask_gradients_()),
        ("GradientMask: restore after the step", 16, lambda: frozen.restore_()),
        ("floor: one bare pass over the gradients", 8, bare_gradient_pass),
        ("floor: one bare pass over the weights", 8, bare_weight_pass),
    ]
    times = {label: timed(fn) for label, _, fn in rows}
    plain = statistics.median(fit("plain", args).cpu)
    print(
        f"MLP width {args.width}, depth {args.depth}: {entries / 1e6:.2f}M masked weight entries, "
        f"{args.frozen_fraction:.0%} frozen at random; plain step ({args.optimizer}"
        f"{', fused' if args.fused else ''}, batch {args.batch_size}): {plain * 1e3:.2f} ms CPU"
    )
    for label, size, _ in rows:
        seconds = times[label]
        print(f"  {label:42s} {size:2d} bytes/entry {seconds * 1e3:6.2f} ms ({entries * size * 1e-9 / seconds:5.1f} GB/s)")
    ours = sum(times[label] for label, _, _ in rows[:2])
    floor = sum(times[label] for label, _, _ in rows[2:])
    print(f"  package's two kernels: plain step x {1 + ours / plain:.3f}; the two bare passes: x {1 + floor / plain:.3f}")


def mechanism_benchmark(args: argparse.Namespace) -> None:
    """Restore / gradient-mask kernels on one 4M-entry float32 tensor, ``--frozen-fraction`` frozen at random."""
    side = 2048
    g = torch.Generator().manual_seed(0)
    frozen = torch.rand(side, side, generator=g) < args.frozen_fraction
    case = Frozen(frozen, torch.randn(side, side, generator=g))
    print(
        f"one float32 tensor {side}x{side} ({side * side / 1e6:.1f}M entries), "
        f"{int(frozen.sum()) / frozen.numel():.0%} frozen at random, {torch.get_num_threads()} thread(s)"
    )

    # exactness: awkward values among the captured ones and among the values an optimizer left
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    at_frozen = frozen.flatten().nonzero().squeeze(1)
    at_trainable = frozen.logical_not().flatten().nonzero().squeeze(1)
    values = case.values.clone().flatten()
    values[at_frozen[:3]] = torch.tensor([-0.0, 1e-40, -3.0])  # a frozen -0.0 and a subnormal
    awkward = Frozen(frozen, values.view(side, side))
    stepped = (awkward.values + 0.25).flatten()
    stepped[at_frozen[3:7]] = specials  # the step left inf/NaN/-0 in frozen entries
    stepped[at_trainable[:4]] = specials  # ... and in trainable ones
    stepped = stepped.view(side, side)

    def timing(kernel: Kernel) -> float:
        w = case.values.clone()
        runs = []
        for i in range(args.mechanism_reps + 3):
            w.add_(0.5)  # stands for the optimizer step between two calls; not timed
            start = time.perf_counter()
            kernel(w, case)
            if i >= 3:
                runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    for title, table, check in (
        ("restore of frozen values after a step", RESTORES, restore_exactness),
        ("gradient masking", GRAD_MASKS, grad_exactness),
    ):
        print(f"\n{title}: median ms over {args.mechanism_reps} calls, and x the current kernel")
        baseline = None
        for name, kernel in table.items():
            seconds = timing(kernel)
            baseline = baseline or seconds
            note = check(kernel, awkward, stepped)
            print(f"  {name:50s} {seconds * 1e3:7.2f} ms {seconds / baseline:6.3f}x  {note}")

    mask_patterns(side, args.mechanism_reps)
    optimizer_side(case, args.mechanism_reps)


def mask_patterns(side: int, reps: int) -> None:
    """The current kernels depend on the mask's layout: a random mask defeats branch prediction."""
    print(f"\ncurrent kernels by mask layout: median ms per call over {reps} calls")
    rows = torch.arange(side).unsqueeze(1).expand(side, side)
    g = torch.Generator().manual_seed(4)
    layouts = {
        "random 50% frozen": torch.rand(side, side, generator=g) < 0.5,
        "random 10% frozen": torch.rand(side, side, generator=g) < 0.1,
        "first half of the rows frozen": (rows < side // 2).contiguous(),
    }
    for label, frozen in layouts.items():
        case = Frozen(frozen, torch.randn(side, side, generator=g))
        w = case.values.clone()
        row = []
        for kernel in (next(iter(RESTORES.values())), next(iter(GRAD_MASKS.values()))):  # (a) and (g1)
            runs = []
            for _ in range(reps):
                start = time.perf_counter()
                kernel(w, case)
                runs.append(time.perf_counter() - start)
            row.append(statistics.median(runs) * 1e3)
        print(f"  {label:32s} restore (a) {row[0]:7.2f} ms   gradient (g1) {row[1]:7.2f} ms")


def optimizer_side(case: Frozen, reps: int) -> None:
    """AdamW's own cost when half of the gradient entries are exactly 0 (as with any mask, prune too)."""
    print(f"\noptimizer side, same tensor as one parameter: median ms per call over {reps} calls")
    v = case.values.square().add_(1e-3)  # a positive second moment everywhere ...
    v_frozen = v.masked_fill(case.frozen, 0)  # ... and the one a masked gradient leaves: 0 at frozen entries
    for label, tensor in (("sqrt, no zeros", v), ("sqrt, frozen entries exactly 0", v_frozen)):
        runs = []
        for _ in range(reps):
            start = time.perf_counter()
            tensor.sqrt()
            runs.append(time.perf_counter() - start)
        print(f"  {label:50s} {statistics.median(runs) * 1e3:7.2f} ms")
    for fused in (False, True):
        for masked in (False, True):
            param = nn.Parameter(case.values.clone())
            optimizer = torch.optim.AdamW([param], lr=1e-3, fused=fused or None)
            g = torch.Generator().manual_seed(3)
            runs = []
            for i in range(reps + 3):
                grad = torch.randn(param.shape, generator=g)
                param.grad = grad.masked_fill_(case.frozen, 0) if masked else grad
                start = time.perf_counter()
                optimizer.step()
                if i >= 3:
                    runs.append(time.perf_counter() - start)
            label = f"AdamW({'fused=True' if fused else 'default'}).step, {'masked' if masked else 'dense'} gradient"
            print(f"  {label:50s} {statistics.median(runs) * 1e3:7.2f} ms")


# ---------------------------------------------------------------------------- many small tensors
BLOCK_VARIANTS = ("plain", "gradient_mask", "gradient_noise", "weight_noise")


class Blocks(L.LightningModule):
    """``count`` x (Linear(16, 16) + Tanh): 2 tensors a block; SGD with momentum."""

    def __init__(self, count: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(count)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


def blocks_fit(variant: str, args: argparse.Namespace) -> StepTimer:
    from lightning_gradmask.callbacks.gradient_noise import GradientNoise
    from lightning_gradmask.callbacks.weight_noise import WeightNoise

    model = Blocks(args.blocks)
    callbacks: list[Callback] = []
    if variant == "gradient_mask":
        callbacks = [GradientMask(trainable=weight_masks(model, 0.5))]
    elif variant == "gradient_noise":
        callbacks = [GradientNoise(std=1e-4)]
    elif variant == "weight_noise":
        callbacks = [WeightNoise(std=1e-4)]  # the weight of every Linear: 1,000 tensors
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[timer, *callbacks],
    )
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8 * args.batch_size, 16)), batch_size=args.batch_size
    )
    trainer.fit(model, data)
    del timer.wall[: args.warmup], timer.cpu[: args.warmup]
    return timer


def blocks_benchmark(args: argparse.Namespace) -> None:
    print(f"{args.blocks} x Linear(16, 16) blocks ({2 * args.blocks} tensors), half of every weight frozen, "
          f"SGD momentum; batch {args.batch_size}; {args.rounds} rounds x ({args.warmup} + {args.steps}) steps")
    runs: dict[str, list[StepTimer]] = {v: [] for v in BLOCK_VARIANTS}
    for r in range(args.rounds):
        for variant in round_order(r, BLOCK_VARIANTS):
            runs[variant].append(blocks_fit(variant, args))
    for clock in ("wall", "cpu"):
        report(runs, clock)
    if args.profile:
        calls: dict[str, list[float]] = {}
        targets = [(FrozenEntries, "mask_gradients_"), (FrozenEntries, "restore_")]
        with timed_methods(targets, calls):
            timer = blocks_fit("gradient_mask", args)
        print(f"\nGradientMask run: median step {statistics.median(timer.cpu) * 1e3:.2f} ms CPU; ms per call:")
        for label, seconds in calls.items():
            print(f"  {label:40s} median {statistics.median(seconds[args.warmup :]) * 1e3:6.2f}")


# ---------------------------------------------------------------------------- memory
MEMORY_VARIANTS = ("plain", "gradient_mask", "gradient_mask_no_stats")


class SingleLinear(L.LightningModule):
    """One ``Linear(rows, cols, bias=False)`` trained with plain SGD (no optimizer state)."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(cols, rows, bias=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def memory_child(variant: str, entries: int) -> None:
    """One fit in this (fresh) process; prints the peak RSS in KiB above the built model and spec."""
    import resource
    import tempfile

    from lightning.pytorch.loggers import CSVLogger

    rows = 2000
    cols = entries // rows
    model = SingleLinear(rows, cols)
    g = torch.Generator().manual_seed(1)
    trainable = torch.empty(rows, cols, dtype=torch.bool)
    for row in range(0, rows, 100):  # row blocks: no full-size float temporary before the baseline
        trainable[row : row + 100] = torch.rand(100, cols, generator=g) >= 0.01
    spec = {"layer.weight": trainable}  # 1% frozen, every entry masked
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, cols)), batch_size=8)
    gc_warm = torch.randn(8, cols)  # noqa: F841 - touch the allocator before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    callbacks = {
        "plain": [],
        "gradient_mask": [GradientMask(spec)],
        "gradient_mask_no_stats": [GradientMask(spec, log_stats=False)],
    }[variant]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=4, logger=CSVLogger(tempfile.mkdtemp()), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(model, data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"PEAK_KIB {peak - base}")


def memory_benchmark(args: argparse.Namespace) -> None:
    """Peak RSS of a short fit per variant, each in a fresh subprocess, repeated; bytes per masked entry."""
    import subprocess
    import sys

    entries = args.memory_entries
    print(f"Linear with {entries / 1e6:.0f}M float32 weights, every entry masked (1% frozen), SGD, 4 steps, "
          f"logging every step; {args.rounds} fresh processes per variant")
    peaks: dict[str, list[int]] = {v: [] for v in MEMORY_VARIANTS}
    for r in range(args.rounds):
        for variant in round_order(r, MEMORY_VARIANTS):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", variant, "--memory-entries", str(entries)],
                check=True, capture_output=True, text=True,
            ).stdout
            peaks[variant].append(int(out.split("PEAK_KIB")[-1].split()[0]))
    plain = statistics.median(peaks["plain"])
    print("variant                  peak RSS above the model, MiB (median)   extra bytes per masked entry")
    for variant, values in peaks.items():
        med = statistics.median(values)
        extra = (med - plain) * 1024 / entries
        print(f"{variant:24s} {med / 1024:10.1f}   runs: {' '.join(f'{v / 1024:.0f}' for v in values)}   {extra:6.2f}")


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of every run (default 5)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds; each runs every variant once (default 8)")
    parser.add_argument("--width", type=int, default=1024, help="MLP width (default 1024: 4.2M parameters)")
    parser.add_argument("--depth", type=int, default=4, help="hidden Linear layers (default 4)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--frozen-fraction", type=float, default=0.5, help="frozen share of each weight (0.5)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fused", action="store_true", help="AdamW(fused=True) instead of the default AdamW")
    parser.add_argument(
        "--optimizer", choices=("adamw", "sgd"), default="adamw", help="adamw (default) or sgd (momentum 0.9, decay 1e-4)"
    )
    parser.add_argument("--skip-prune", action="store_true", help="time only plain and gradient_mask")
    parser.add_argument(
        "--variants", default="", help="comma-separated, plain first (default plain,gradient_mask,prune); also: compact"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also break GradientMask's cost down (the default variants, or --blocks)"
    )
    parser.add_argument("--mechanism", action="store_true", help="only the kernel micro-benchmark")
    parser.add_argument(
        "--floor", action="store_true", help="only the least cost of any exact mask outside the optimizer's kernel (the MLP)"
    )
    parser.add_argument("--mechanism-reps", type=int, default=30, help="calls per kernel (default 30)")
    parser.add_argument("--blocks", type=int, default=0, help="only the many-small-tensors case: N Linear(16, 16)")
    parser.add_argument("--memory", action="store_true", help="only peak RSS per masked entry (subprocesses)")
    parser.add_argument("--memory-entries", type=int, default=20_000_000, help="masked entries (default 20M)")
    parser.add_argument("--memory-child", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore")
        memory_child(args.memory_child, args.memory_entries)
        return
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    print(
        f"{datetime.date.today()}  torch {torch.__version__}, lightning {L.__version__}, python "
        f"{platform.python_version()}, {os.cpu_count()} CPU(s), torch threads {torch.get_num_threads()}; "
        f"load average before: {load()}"
    )
    start = time.perf_counter()
    if args.blocks:
        blocks_benchmark(args)
    elif args.memory:
        memory_benchmark(args)
    elif args.mechanism:
        mechanism_benchmark(args)
    elif args.floor:
        floor_benchmark(args)
    else:
        train_benchmark(args)
        if args.profile:
            profile(args)
    print(f"\nload average after: {load()}; took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
