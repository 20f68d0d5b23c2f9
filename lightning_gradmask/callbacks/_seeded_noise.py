"""What ``GradientNoise`` and ``WeightNoise`` share: a seed, the parameter table, the seeded draws.

Both draw their noise with :func:`lightning_gradmask.functional.noise.noise_like` from a generator seeded
with ``(seed, optimizer step, parameter index)``, so every DDP rank adds the same numbers and a
resumed run adds what an uninterrupted run would have added. Neither is differential privacy:
see ``docs/noise.md``.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_gradmask._namespaces import Callback
from lightning_gradmask.functional.masks import REGEX_PREFIX, MaskSpecError, match_parameters
from lightning_gradmask.functional.noise import draw_dtype, draw_noise_, noise_seeds

__all__ = [
    "GRADIENT_STREAM",
    "WEIGHT_STREAM",
    "ParameterTable",
    "SeededNoise",
    "check_seed",
    "normalize_targets",
    "refuse_same_seed",
    "seed_tensor",
]


GRADIENT_STREAM = "gradient"
WEIGHT_STREAM = "weight"


class SeededNoise(Callback):
    """What both noise callbacks share: a seed, targets, and the checkpoint state they need."""

    seed: int
    targets: Optional[list[str]]
    _draws: int
    _twin: int = 0
    _draw_buffers: dict[int, torch.Tensor]  # id(param) -> CPU draw buffer, reused across steps
    _generator: torch.Generator

    #: every live noise callback, to tell apart instances built with the same seed and targets
    _instances: "weakref.WeakSet[SeededNoise]" = weakref.WeakSet()

    def _register(self) -> None:
        """Call at the end of ``__init__``: number this instance among live ones of the same configuration.

        Lightning refuses two stateful callbacks with the same ``state_key`` when the Trainer is built,
        with a RuntimeError that says nothing about noise. Twins (same type, seed and targets) get
        distinct keys, so that ``setup`` can refuse them with the documented ``ValueError`` instead.
        """
        twins = [other for other in SeededNoise._instances if type(other) is type(self) and other._config() == self._config()]
        self._twin = max((other._twin for other in twins), default=-1) + 1
        SeededNoise._instances.add(self)

    def _config(self) -> tuple[int, Optional[tuple[str, ...]]]:
        return self.seed, None if self.targets is None else tuple(self.targets)

    @property
    def state_key(self) -> str:
        # several instances may share a Trainer (different seeds or targets)
        if self._twin:
            return self._generate_state_key(seed=self.seed, targets=self.targets, twin=self._twin)
        return self._generate_state_key(seed=self.seed, targets=self.targets)

    def _draw(self, step: int, like: list[tuple[int, torch.Tensor, torch.Tensor]], stream: str) -> list[torch.Tensor]:
        """``noise_like(tensor, seed, step, index, stream=stream)`` for every ``(index, param, tensor)``,
        bit for bit, with one reseeded generator, one hash prefix and CPU buffers reused across steps.

        A returned tensor may be the reused buffer itself: use it before the next draw.
        """
        seeds = noise_seeds(self.seed, step, [index for index, _, _ in like], stream=stream)
        draws = []
        for _, param, tensor in like:
            dtype = draw_dtype(tensor.dtype)
            buffer = self._draw_buffers.get(id(param))
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != dtype:
                buffer = torch.empty(tuple(tensor.shape), dtype=dtype)
                self._draw_buffers[id(param)] = buffer
            draws.append(buffer)
        draw_noise_(draws, seeds, self._generator)
        return [
            draw if draw.dtype == t.dtype and draw.device == t.device else draw.to(device=t.device, dtype=t.dtype)
            for draw, (_, _, t) in zip(draws, like)
        ]

    def state_dict(self) -> dict[str, Any]:
        # the step index comes from trainer.global_step, which the checkpoint's loop state restores
        return {"seed": self.seed, "draws": self._draws}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the state key holds the seed, so a checkpoint's state only reaches a callback of the same seed
        self._draws = int(state_dict.get("draws", 0))


# --------------------------------------------------------------------------- helpers


class ParameterTable:
    """Unique parameters of a module in ``named_parameters()`` order, with their aliases (tied weights)."""

    def __init__(self, module: nn.Module) -> None:
        self._params: dict[str, torch.Tensor] = {}
        self._index: dict[int, int] = {}
        self._canonical: dict[int, str] = {}
        self._aliases: dict[int, list[str]] = {}
        self._all: dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            self._all[name] = param
            key = id(param)
            if key not in self._index:
                self._index[key] = len(self._params)
                self._canonical[key] = name
                self._params[name] = param
                self._aliases[key] = []
            self._aliases[key].append(name)

    @property
    def names(self) -> list[str]:
        """Canonical names (the first name of each parameter)."""
        return list(self._params)

    @property
    def all_names(self) -> list[str]:
        """Every name, aliases of tied parameters included."""
        return list(self._all)

    def canonical(self, param: torch.Tensor) -> str:
        return self._canonical[id(param)]

    def param(self, name: str) -> torch.Tensor:
        return self._all[name]

    def index(self, name: str) -> int:
        return self._index[id(self._all[name])]

    def aliases(self, name: str) -> tuple[str, ...]:
        return tuple(self._aliases[id(self._all[name])])

    def select(self, keys: list[str], parameter: str, among: list[str] | None = None) -> list[str]:
        """Canonical names selected by ``keys`` (names or ``re:`` patterns), in parameter order."""
        pool = set(among) if among is not None else None
        chosen: set[str] = set()
        for key in keys:
            if pool is not None and not key.startswith(REGEX_PREFIX) and key in self._all:
                name = self.canonical(self._all[key])
                if name not in pool:
                    raise MaskSpecError(
                        f"{parameter} key {key!r}: that parameter is not among the ones chosen by "
                        f"modules/parameters ({', '.join(repr(n) for n in sorted(pool))})"
                    )
            candidates = list(self._all) if pool is None else [n for n in self._all if self.canonical(self._all[n]) in pool]
            matched = match_parameters(key, candidates, parameter=parameter)
            chosen.update(self.canonical(self._all[name]) for name in matched)
        return [name for name in self._params if name in chosen]


def normalize_targets(targets: Any, owner: str) -> list[str] | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, Sequence) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise MaskSpecError(
            f"{owner}(targets=...) must be a parameter name or 're:' pattern, or a non-empty list of them; "
            f"got {targets!r}"
        )
    return list(targets)


def check_seed(seed: Any, owner: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{owner}(seed=...) must be an integer; got {type(seed).__name__} {seed!r}")
    return int(seed)


def seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor(list(str(seed).encode()), dtype=torch.uint8)


def refuse_same_seed(trainer: pl.Trainer, owner: Callback) -> None:
    for other in trainer.callbacks:  # type: ignore[attr-defined]  # Trainer sets callbacks at run time
        if other is not owner and type(other) is type(owner) and other.seed == owner.seed:  # type: ignore[attr-defined]
            raise ValueError(
                f"two {type(owner).__name__} callbacks use seed={owner.seed}: they would draw the same "  # type: ignore[attr-defined]
                "noise; give each its own seed (or merge them)"
            )
