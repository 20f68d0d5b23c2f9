"""What ``GradientNoise`` and ``WeightNoise`` share: a seed, the parameter table, the seeded draws.

Both draw their noise with :func:`lightning_gradmask.functional.noise.noise_like` from a generator seeded
with ``(seed, optimizer step, parameter index)``, so every DDP rank adds the same numbers and a
resumed run adds what an uninterrupted run would have added. Neither is differential privacy:
see ``docs/noise.md``.
"""

from __future__ import annotations

import numbers
import weakref
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_gradmask._namespaces import Callback
from lightning_gradmask.errors import GradmaskConfigError, GradmaskConfigTypeError
from lightning_gradmask.functional.noise import draw_dtype, draw_noise_, noise_seeds
from lightning_gradmask.functional.selection import SelectorItem

GRADIENT_STREAM = "gradient"
WEIGHT_STREAM = "weight"


class SeededNoise(Callback):
    """What both noise callbacks share: a seed, the selected parameters, the seeded draws."""

    seed: int
    params: Optional[list[SelectorItem]]
    _twin: int = 0
    _key_settled: bool = False
    _draw_buffers: dict[int, torch.Tensor]  # id(param) -> CPU draw buffer, reused across steps
    _generator: torch.Generator

    #: every live noise callback, to tell apart instances built with the same seed and params
    _instances: "weakref.WeakSet[SeededNoise]" = weakref.WeakSet()

    def _register(self) -> None:
        """Call at the end of ``__init__``: a provisional number among live instances of the same configuration.

        Lightning refuses two stateful callbacks with the same ``state_key`` when the Trainer is built
        (before any hook runs), with a RuntimeError that says nothing about noise. The noise callbacks
        are stateful (their checkpoint entry holds the seed), and a ``pytorch_lightning`` Trainer treats
        every callback of our dual-namespace base as stateful anyway (see ``_namespaces``). Until
        ``setup``, twins (same type, seed and params) therefore carry a provisional ``twin`` number in
        their key, so that Lightning's check lets ``setup`` refuse them with the documented
        ``GradmaskConfigError``. That number depends on what else lives in the process, so it never
        reaches a checkpoint: see :meth:`_settle_key`.
        """
        twins = [other for other in SeededNoise._instances if type(other) is type(self) and other._config() == self._config()]
        self._twin = max((other._twin for other in twins), default=-1) + 1
        SeededNoise._instances.add(self)

    def _settle_key(self) -> None:
        """Call in ``setup`` once :func:`refuse_same_seed` has passed: no other instance of this type in
        the Trainer shares the seed, so the plain key (type, seed, params) is unique in it. From now on
        the key is that plain one, the same in every process: checkpoints are written and read with it."""
        self._key_settled = True

    def _config(self) -> tuple[int, Optional[tuple[str, ...]]]:
        return self.seed, None if self.params is None else tuple(_item_key(item) for item in self.params)

    @property
    @override
    def state_key(self) -> str:
        # several instances may share a Trainer (different seeds or params); the checkpoint key is
        # always the plain one (settled at setup), the twin number only exists before that
        if self._twin and not self._key_settled:
            return self._generate_state_key(seed=self.seed, params=self._config()[1], twin=self._twin)
        return self._generate_state_key(seed=self.seed, params=self._config()[1])

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

    @override
    def state_dict(self) -> dict[str, Any]:
        # the step index comes from trainer.global_step, which the checkpoint's loop state restores
        return {"seed": self.seed}


# --------------------------------------------------------------------------- helpers


def check_seed(seed: Any, owner: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise GradmaskConfigTypeError(f"{owner}(seed=...) must be an integer; got {type(seed).__name__} {seed!r}")
    return int(seed)


def seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor(list(str(seed).encode()), dtype=torch.uint8)


def refuse_same_seed(trainer: pl.Trainer, owner: Callback) -> None:
    for other in trainer.callbacks:  # type: ignore[attr-defined]  # Trainer sets callbacks at run time
        if other is not owner and type(other) is type(owner) and other.seed == owner.seed:  # type: ignore[attr-defined]
            raise GradmaskConfigError(
                f"two {type(owner).__name__} callbacks use seed={owner.seed}: they would draw the same "  # type: ignore[attr-defined]
                "noise; give each its own seed (or merge them)"
            )


def _item_key(item: SelectorItem) -> str:
    return item if isinstance(item, str) else f"{item.__module__}.{item.__qualname__}"
