"""Seeded Gaussian noise and noise-std schedules: pure tensor code, no Lightning.

The noise of one optimizer step for a fixed, ordered list of tensors (the parameters a callback
perturbs) is read from flat standard-normal *streams*, one per dtype: the tensors of a dtype,
flattened and laid end to end in list order, take consecutive entries of their stream. A stream is
cut into chunks of :data:`NOISE_CHUNK` entries; chunk ``c`` is drawn on the CPU by a
:class:`torch.Generator` seeded from a hash of ``(stream label, seed, step, dtype, c)``. The
numbers therefore depend on the seed, the step and the list's shapes and dtypes, and on nothing
else: not on the process (every DDP rank draws the same), not on the device the tensors live on
(the draw is made on the CPU and then moved), not on how many draws happened before (a resumed
run draws what an uninterrupted run would have drawn). A process holding only a shard of a tensor
(FSDP2) draws the chunks its shard covers and gets the same numbers as a process holding it whole.

    >>> import torch

    >>> w, b = torch.zeros(2, 3), torch.zeros(3)
    >>> first = noise_for([w, b], seed=0, step=5)
    >>> again = noise_for([w, b], seed=0, step=5)
    >>> all(torch.equal(x, y) for x, y in zip(first, again)), tuple(first[0].shape), first[0].dtype
    (True, (2, 3), torch.float32)
    >>> torch.equal(first[0], noise_for([w, b], seed=1, step=5)[0])
    False
    >>> torch.equal(torch.cat([first[0].flatten(), first[1]]), noise_for([torch.zeros(9)], seed=0, step=5)[0])
    True

A *std schedule* maps the optimizer step ``t`` (0 for the first step) to a standard deviation:

    >>> schedule = make_schedule(eta=0.3, gamma=0.55)   # std_t = sqrt(eta / (1 + t) ** gamma)
    >>> round(schedule(0), 6), round(schedule(99), 6)
    (0.547723, 0.154369)
    >>> make_schedule(std=1e-3)(10)
    0.001

Every value a schedule returns is checked (a real number, finite, not negative); a bad value
raises :class:`NoiseStdError` naming the step.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch

from lightning_gradmask.errors import GradmaskConfigError, GradmaskConfigTypeError, NoiseStdError

__all__ = [
    "NOISE_CHUNK",
    "AnnealedStd",
    "CallableStd",
    "ConstantStd",
    "NoiseLayout",
    "StdSchedule",
    "StdValue",
    "check_std",
    "make_schedule",
    "draw_dtype",
    "noise_for",
]

StdValue = Union[float, Callable[[int], Any]]
"""A noise std: a non-negative number, or a callable ``step -> std`` (Python only)."""

NOISE_CHUNK = 1 << 16
"""Entries of a noise stream drawn by one seeded generator (the last chunk of a stream may be shorter)."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)

Part = tuple[int, int, tuple[int, ...]]
"""``(start, stop, shape)``: the entries ``[start, stop)`` of a tensor's flattened (row-major) whole
that a process needs, viewed as ``shape`` (``stop - start`` entries)."""


# --------------------------------------------------------------------------- drawing


def draw_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype noise for a tensor of ``dtype`` is drawn in (``float32`` for 16-bit floats)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _check_integer(label: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"noise {label} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


class NoiseLayout:
    """Where each tensor of a fixed, ordered list finds its noise in a step's streams; draws it.

    Built once per run (the list, its shapes, dtypes and devices do not change between steps);
    :meth:`draw_` then fills reused buffers with one generator reseeding and one ``normal_`` call
    per chunk of :data:`NOISE_CHUNK` entries, one copy to the tensors' device and dtype and one
    multiplication per contiguous span, whatever the number of tensors.

    Args:
        shapes: the (global) shape of every tensor, in the fixed order.
        dtypes: their dtypes (floating point); each dtype has its own stream.
        devices: the device each tensor's noise is returned on (default: the CPU).
        parts: per tensor, the part of its whole this process needs (see :data:`Part`), default the
            whole (``(0, numel, shape)``); a shard of an FSDP2 parameter is a contiguous range of rows.

    >>> layout = NoiseLayout([(4, 2)], [torch.float32], parts=[(2, 6, (2, 2))])   # rows 1 and 2
    >>> whole = noise_for([torch.zeros(4, 2)], seed=3, step=0)[0]
    >>> torch.equal(layout.draw_(3, 0)[0], whole[1:3])
    True

    Raises:
        TypeError: a dtype that is not floating point.
        ValueError: lists of different lengths, or a part outside its tensor.
    """

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        dtypes: Sequence[torch.dtype],
        *,
        devices: Optional[Sequence[Union[torch.device, str]]] = None,
        parts: Optional[Sequence[Part]] = None,
    ) -> None:
        count = len(shapes)
        placed: list[torch.device] = [torch.device("cpu")] * count if devices is None else [torch.device(d) for d in devices]
        sizes = [math.prod(shape) for shape in shapes]
        parts = [(0, size, tuple(shape)) for size, shape in zip(sizes, shapes)] if parts is None else list(parts)
        if not len(dtypes) == len(placed) == len(parts) == count:
            raise ValueError("NoiseLayout: shapes, dtypes, devices and parts must have one entry per tensor")
        for dtype in dtypes:
            if not dtype.is_floating_point:
                raise TypeError(f"noise needs a floating-point tensor, got dtype {dtype}")
        self._out: list[Optional[torch.Tensor]] = [None] * count
        # per stream (dtype): its length and its spans (runs of chunks some part needs)
        self._streams: list[tuple[torch.dtype, list[_Span]]] = []
        offsets: dict[torch.dtype, int] = {}
        wanted: dict[torch.dtype, list[tuple[int, int, int]]] = {}  # dtype -> (begin, end, tensor) in its stream
        for k, (size, dtype, (start, stop, shape)) in enumerate(zip(sizes, dtypes, parts)):
            if not 0 <= start <= stop <= size or math.prod(shape) != stop - start:
                raise ValueError(f"NoiseLayout: part {(start, stop, tuple(shape))} does not fit tensor {k} of {size} entries")
            offset = offsets.get(dtype, 0)
            offsets[dtype] = offset + size
            wanted.setdefault(dtype, []).append((offset + start, offset + stop, k))
        for dtype, pieces in wanted.items():
            spans: list[_Span] = []
            for begin, end, k in sorted(pieces):
                if begin == end:
                    self._out[k] = torch.empty(parts[k][2], dtype=dtype, device=placed[k])
                    continue
                first, last = begin // NOISE_CHUNK, (end - 1) // NOISE_CHUNK + 1
                if spans and first <= spans[-1].last:
                    spans[-1].last = max(spans[-1].last, last)
                else:
                    spans.append(_Span(first, last))
                spans[-1].members.append((begin, end, k))
            for span in spans:
                span.build(dtype, offsets[dtype], [(parts[k][2], placed[k]) for _, _, k in span.members])
                for view, (_, _, k) in zip(span.views, span.members):
                    self._out[k] = view
            self._streams.append((dtype, spans))

    def draw_(self, seed: int, step: int, *, stream: str = "", scale: float = 1.0) -> list[torch.Tensor]:
        """``scale`` times each tensor's part of the standard normal noise of ``(stream, seed, step)``.

        Returns one tensor per tensor of the layout, of its part's shape, on its device, in its
        dtype. They are reused buffers, refilled by the next call: use them before drawing again.
        """
        seed, step = _check_integer("seed", seed), _check_integer("step", step)
        generator = torch.Generator(device="cpu")
        for dtype, spans in self._streams:
            label = f"lightning_gradmask.functional.noise|{stream}|{seed}|{step}|{str(dtype).removeprefix('torch.')}|"
            prefix = hashlib.blake2b(label.encode(), digest_size=8)
            for span in spans:
                span.draw_(prefix, generator, scale)
        return self._out  # type: ignore[return-value]  # every entry was set in __init__


class _Span:
    """Chunks ``[first, last)`` of one stream, drawn into one CPU buffer, and the parts they serve."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.members: list[tuple[int, int, int]] = []  # (begin, end, tensor) in stream entries
        self.views: list[torch.Tensor] = []

    def build(self, dtype: torch.dtype, length: int, targets: list[tuple[tuple[int, ...], torch.device]]) -> None:
        base = self.first * NOISE_CHUNK
        self.bounds = [(c * NOISE_CHUNK - base, min((c + 1) * NOISE_CHUNK, length) - base) for c in range(self.first, self.last)]
        self.draw = torch.empty(self.bounds[-1][1], dtype=draw_dtype(dtype))
        devices = {device for _, device in targets}
        # one copy to the device and dtype for the span when its tensors share a device, else one per tensor
        self.out: Optional[torch.Tensor] = None
        if len(devices) == 1:
            device = next(iter(devices))
            self.out = self.draw if (device.type, dtype) == ("cpu", self.draw.dtype) else torch.empty(
                self.draw.shape, dtype=dtype, device=device
            )
            source = self.out
            self.views = [source[b - base : e - base].view(shape) for (b, e, _), (shape, _) in zip(self.members, targets)]
        else:
            self.views = [torch.empty(shape, dtype=dtype, device=device) for shape, device in targets]
        self._cuts = [self.draw[b - base : e - base].view(shape) for (b, e, _), (shape, _) in zip(self.members, targets)]

    def draw_(self, prefix: Any, generator: torch.Generator, scale: float) -> None:
        for chunk, (start, stop) in enumerate(self.bounds, start=self.first):
            digest = prefix.copy()
            digest.update(str(chunk).encode())
            generator.manual_seed(int.from_bytes(digest.digest(), "big"))
            self.draw[start:stop].normal_(generator=generator)
        if self.out is not None:
            if self.out is not self.draw:
                self.out.copy_(self.draw)
            if scale != 1.0:
                self.out.mul_(scale)
            return
        for view, cut in zip(self.views, self._cuts):
            view.copy_(cut)
            if scale != 1.0:
                view.mul_(scale)


def noise_for(tensors: Sequence[torch.Tensor], seed: int, step: int, *, stream: str = "") -> list[torch.Tensor]:
    """The standard normal noise of ``(stream, seed, step)`` for ``tensors``, in their order.

    One new tensor per input, of its shape, dtype and device (inputs are not read or changed).
    ``float32`` and ``float64`` tensors get noise drawn in their own dtype; ``float16``/``bfloat16``
    tensors get noise drawn in ``float32`` and rounded to their dtype. This is what
    ``GradientNoise`` and ``WeightNoise`` add (times the std) for their list of target parameters.

    Args:
        tensors: the tensors whose shapes, dtypes and devices the noise takes, in a fixed order.
        seed: the user's seed.
        step: the optimizer step the noise belongs to.
        stream: a label that separates independent uses of the same seed.

    Raises:
        TypeError: a tensor is not floating point, or ``seed``/``step`` is not an integer.
    """
    layout = NoiseLayout([t.shape for t in tensors], [t.dtype for t in tensors], devices=[t.device for t in tensors])
    return layout.draw_(seed, step, stream=stream)


# --------------------------------------------------------------------------- std schedules


def check_std(value: Any, *, step: int | None = None, where: str = "std") -> float:
    """Return ``value`` as a float, or raise :class:`NoiseStdError` if it is not a finite number >= 0.

    Accepts Python and NumPy real numbers and one-element tensors (not ``bool``).
    """
    at = "" if step is None else f" at optimizer step {step}"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise NoiseStdError(
                f"{where}{at} must be a real number; got a tensor of shape {list(value.shape)} and dtype {value.dtype}"
            )
        value = value.detach().to("cpu").item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise NoiseStdError(f"{where}{at} must be a real number; got {type(value).__name__} {value!r}")
    number = float(value)
    if math.isnan(number):
        raise NoiseStdError(f"{where}{at} is NaN; a noise std must be a finite number >= 0")
    if math.isinf(number):
        raise NoiseStdError(f"{where}{at} is infinite; a noise std must be a finite number >= 0")
    if number < 0:
        raise NoiseStdError(f"{where}{at} is negative ({number:g}); a noise std must be >= 0")
    return number


class StdSchedule:
    """Base of the std schedules: ``schedule(step) -> std`` (a checked float)."""

    where = "std"

    def __call__(self, step: int) -> float:
        return check_std(self.value(step), step=step, where=self.where)

    def value(self, step: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class ConstantStd(StdSchedule):
    """The same std at every step.

    >>> ConstantStd(0.01)(1000)
    0.01
    """

    def __init__(self, std: float, *, where: str = "std") -> None:
        self.where = where
        self.std = check_std(std, where=where)

    def value(self, step: int) -> float:
        return self.std

    def __repr__(self) -> str:
        return f"ConstantStd({self.std!r})"


class AnnealedStd(StdSchedule):
    """Annealed noise: variance ``eta / (1 + t) ** gamma``, so ``std_t = sqrt(eta / (1 + t) ** gamma)``.

    ``t`` is the optimizer step, 0 for the first. ``eta`` in 0.01 to 1 and ``gamma = 0.55`` are
    the values usually tried.

    >>> round(AnnealedStd(eta=1.0, gamma=1.0)(3), 6)   # sqrt(1 / 4)
    0.5
    """

    def __init__(self, eta: float, gamma: float = 0.55, *, where: str = "eta") -> None:
        self.where = where
        self.eta = check_std(eta, where=where)
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(float(gamma)):
            raise NoiseStdError(f"gamma must be a finite real number >= 0; got {gamma!r}")
        if float(gamma) < 0:
            raise NoiseStdError(f"gamma is negative ({float(gamma):g}); the annealed std would grow with the step")
        self.gamma: float = float(gamma)

    def value(self, step: int) -> float:
        return math.sqrt(self.eta / (1.0 + step) ** self.gamma)

    def __repr__(self) -> str:
        return f"AnnealedStd(eta={self.eta!r}, gamma={self.gamma!r})"


class CallableStd(StdSchedule):
    """A user function ``step -> std``; every value it returns is checked.

    >>> CallableStd(lambda step: 0.1 if step < 100 else 0.0)(150)
    0.0
    """

    def __init__(self, fn: Callable[[int], Any], *, where: str = "std") -> None:
        if not callable(fn):
            raise GradmaskConfigTypeError(f"{where} must be a number or a callable step -> std; got {type(fn).__name__}")
        self.fn = fn
        self.where = where

    def value(self, step: int) -> Any:
        try:
            return self.fn(step)
        except Exception as err:
            raise NoiseStdError(
                f"{self.where} schedule raised {type(err).__name__} at optimizer step {step}: {err}"
            ) from err

    def __repr__(self) -> str:
        return f"CallableStd({self.fn!r})"


def make_schedule(
    std: StdValue | None = None,
    *,
    eta: float | None = None,
    gamma: float = 0.55,
    owner: str = "noise",
    required: bool = True,
) -> StdSchedule | None:
    """Build the schedule for ``std`` (a number or a callable) or ``eta``/``gamma`` (annealed).

    Args:
        std: a constant std, or a callable ``step -> std``.
        eta: annealed schedule instead of ``std``: variance ``eta / (1 + t) ** gamma``.
        gamma: decay exponent of the annealed schedule.
        owner: how error messages name the caller (``"GradientNoise"``).
        required: if ``False``, giving neither returns ``None``.

    Raises:
        GradmaskConfigError: both or (with ``required``) neither of ``std`` and ``eta`` are given.
        NoiseStdError: a negative or non-finite number.
        GradmaskConfigTypeError: ``std`` is neither a number nor a callable.
    """
    if std is not None and eta is not None:
        raise GradmaskConfigError(f"{owner}: give either std=... or eta=... (annealed), not both")
    if std is None and eta is None:
        if required:
            raise GradmaskConfigError(f"{owner}: give std=... (a number or a callable step -> std) or eta=... (annealed)")
        return None
    if eta is not None:
        return AnnealedStd(eta, gamma, where=f"{owner}(eta=...)")
    where = f"{owner}(std=...)"
    if callable(std) and not isinstance(std, torch.Tensor):
        return CallableStd(std, where=where)
    if isinstance(std, (numbers.Real, torch.Tensor)):
        return ConstantStd(std, where=where)
    raise GradmaskConfigTypeError(f"{where} must be a number or a callable step -> std; got {type(std).__name__} {std!r}")
