"""Seeded Gaussian noise and noise-std schedules: pure tensor code, no Lightning.

Noise for one parameter at one optimizer step is drawn from a CPU :class:`torch.Generator`
seeded from ``(stream, seed, step, parameter index)``. The numbers therefore depend on nothing
else: not on the process (every DDP rank draws the same), not on the device the parameter lives
on (the draw is made on the CPU and then moved), not on how many draws happened before (a resumed
run draws what an uninterrupted run would have drawn).

    >>> import torch

    >>> w = torch.zeros(2, 3)
    >>> a = noise_like(w, seed=0, step=5, index=1)
    >>> b = noise_like(w, seed=0, step=5, index=1)
    >>> bool(torch.equal(a, b)), tuple(a.shape), a.dtype
    (True, (2, 3), torch.float32)
    >>> bool(torch.equal(a, noise_like(w, seed=1, step=5, index=1)))
    False

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
from collections.abc import Callable
from typing import Any, Union

import torch

from lightning_gradmask.errors import GradmaskConfigError, GradmaskConfigTypeError, NoiseStdError

__all__ = [
    "AnnealedStd",
    "CallableStd",
    "ConstantStd",
    "StdSchedule",
    "StdValue",
    "check_std",
    "make_schedule",
    "draw_dtype",
    "draw_noise_",
    "noise_generator",
    "noise_like",
    "noise_seed",
    "noise_seeds",
]

StdValue = Union[float, Callable[[int], Any]]
"""A noise std: a non-negative number, or a callable ``step -> std`` (Python only)."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- seeding


def noise_seed(seed: int, step: int, index: int, *, stream: str = "") -> int:
    """A 64-bit generator seed derived from ``(stream, seed, step, index)`` by a hash.

    Neighbouring inputs (step 4 and 5, parameter 0 and 1) give unrelated seeds. ``stream`` keeps
    two users of the same ``seed`` apart (``GradientNoise`` and ``WeightNoise`` draw
    independent noise even when both use ``seed=0``).
    """
    for label, value in (("seed", seed), ("step", step), ("index", index)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"noise {label} must be an integer, got {type(value).__name__} {value!r}")
    text = f"lightning_gradmask.functional.noise|{stream}|{int(seed)}|{int(step)}|{int(index)}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def noise_seeds(seed: int, step: int, indices: list[int], *, stream: str = "") -> list[int]:
    """:func:`noise_seed` for many parameter indices at once (the same numbers, hashed faster)."""
    noise_seed(seed, step, 0, stream=stream)  # the same argument checks
    prefix = hashlib.blake2b(f"lightning_gradmask.functional.noise|{stream}|{int(seed)}|{int(step)}|".encode(), digest_size=8)
    seeds = []
    for index in indices:
        digest = prefix.copy()
        digest.update(str(int(index)).encode())
        seeds.append(int.from_bytes(digest.digest(), "big"))
    return seeds


def draw_noise_(out: list[torch.Tensor], seeds: list[int], generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Fill CPU tensors with standard normal noise, ``out[k]`` from a generator seeded with ``seeds[k]``.

    ``out[k]`` then holds exactly what ``torch.randn(out[k].shape, generator=...)`` draws, which is
    what :func:`noise_like` draws before moving the noise (``out`` in the draw dtype: ``float32``
    for ``float16``/``bfloat16`` parameters). One generator is reseeded for every tensor.
    """
    generator = generator if generator is not None else torch.Generator(device="cpu")
    for tensor, value in zip(out, seeds):
        generator.manual_seed(value)
        torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype, out=tensor)
    return out


def draw_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype noise for a tensor of ``dtype`` is drawn in (``float32`` for 16-bit floats)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def noise_generator(seed: int, step: int, index: int, *, stream: str = "") -> torch.Generator:
    """A fresh CPU generator seeded with :func:`noise_seed`."""
    return torch.Generator(device="cpu").manual_seed(noise_seed(seed, step, index, stream=stream))


def noise_like(param: torch.Tensor, seed: int, step: int, index: int, *, stream: str = "") -> torch.Tensor:
    """Standard normal noise with ``param``'s shape, dtype and device, fixed by the arguments.

    The draw is made on the CPU with a generator seeded from ``(stream, seed, step, index)``, so
    it is the same on every process and every device. ``float32`` and ``float64`` parameters get
    noise drawn in their own dtype; ``float16``/``bfloat16`` parameters get noise drawn in
    ``float32`` and rounded to their dtype.

    Args:
        param: the tensor whose shape, dtype and device the noise takes (it is not read or changed).
        seed: the user's seed.
        step: the optimizer step the noise belongs to.
        index: the parameter's position in the module's parameter list.
        stream: a label that separates independent uses of the same seed.

    Raises:
        TypeError: ``param`` is not a floating-point tensor, or an index is not an integer.
    """
    if not param.is_floating_point():
        raise TypeError(f"noise needs a floating-point tensor, got dtype {param.dtype}")
    generator = noise_generator(seed, step, index, stream=stream)
    draw_dtype = torch.float32 if param.dtype in _LOW_PRECISION else param.dtype
    noise = torch.randn(tuple(param.shape), generator=generator, dtype=draw_dtype, device="cpu")
    return noise.to(device=param.device, dtype=param.dtype)


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
