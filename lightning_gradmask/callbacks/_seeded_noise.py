"""What ``GradientNoise`` and ``WeightNoise`` share: a seed, the parameter table, the seeded draws.

Both draw their noise with :class:`lightning_gradmask.functional.noise.NoiseLayout` (what
:func:`~lightning_gradmask.functional.noise.noise_for` returns for their list of targets) from generators
seeded with ``(seed, optimizer step)``, so every rank adds the same numbers (a rank holding an FSDP2
shard adds that shard's part) and a resumed run adds what an uninterrupted run would have added.
Neither is differential privacy: see ``docs/noise.md``.
"""

from __future__ import annotations

import numbers
import weakref
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_gradmask._distributed import check_strategy
from lightning_gradmask._namespaces import Callback
from lightning_gradmask.errors import GradmaskConfigError, GradmaskConfigTypeError
from lightning_gradmask.functional.noise import NoiseLayout, Part
from lightning_gradmask.functional.selection import SelectorItem
from lightning_gradmask.functional.sharding import is_sharded, local_part, local_tensor

GRADIENT_STREAM = "gradient"
WEIGHT_STREAM = "weight"


class SeededNoise(Callback):
    """What both noise callbacks share: a seed, the selected parameters, the seeded draws."""

    seed: int
    params: Optional[list[SelectorItem]]
    _twin: int = 0
    _key_settled: bool = False
    _layout: Optional[NoiseLayout] = None  # built at on_train_start
    _layout_params: list[torch.Tensor]
    _cut_whole: list[bool]

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

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__, sharded=True)
        refuse_same_seed(trainer, self)
        self._settle_key()

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

    def _lay_out(self, params: list[torch.Tensor]) -> None:
        """Call once the targets are live (``on_train_start``): where each finds its noise, drawn whole or
        (a ``DTensor`` shard) only for the part this process holds, on its device, in its dtype."""
        parts, self._cut_whole = [], []
        for param in params:
            part = _local_range(param)
            parts.append(part if part is not None else (0, param.numel(), tuple(param.shape)))
            self._cut_whole.append(part is None)
        self._devices = [local_tensor(p).device for p in params]
        self._layout = NoiseLayout(
            [tuple(p.shape) for p in params],
            [p.dtype for p in params],
            # a shard cut from the whole noise: the whole stays on the CPU, only the shard's part moves
            devices=[torch.device("cpu") if cut else device for device, cut in zip(self._devices, self._cut_whole)],
            parts=parts,
        )
        self._layout_params = list(params)

    def _draw(self, step: int, std: float, stream: str) -> list[torch.Tensor]:
        """``std`` times the noise of every target at ``step``: the local shard's part for a ``DTensor``.

        The returned tensors are reused buffers: use them before the next draw.
        """
        assert self._layout is not None, "_lay_out runs at on_train_start"
        noises = self._layout.draw_(self.seed, step, stream=stream, scale=std)
        if any(self._cut_whole):  # shards that are not a contiguous range of their whole (tensor parallel)
            noises = [
                local_part(n, like=p).to(device) if cut else n
                for n, p, cut, device in zip(noises, self._layout_params, self._cut_whole, self._devices)
            ]
        return noises

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


def _local_range(param: torch.Tensor) -> Optional[Part]:
    """The entries of ``param``'s flattened whole that this process holds, if they are one contiguous
    range (a plain tensor, an FSDP2 ``Shard(0)`` shard); ``None`` otherwise (cut from the whole)."""
    if not is_sharded(param):
        return 0, int(param.numel()), tuple(param.shape)
    if not all(type(p).__name__ in ("Shard", "Replicate") for p in param.placements):  # type: ignore[attr-defined]
        return None
    part = local_part(torch.empty(tuple(param.shape), device="meta"), like=param)
    if part.numel() and not part.is_contiguous():
        return None
    start = int(part.storage_offset()) if part.numel() else 0
    return start, start + int(part.numel()), tuple(part.shape)
