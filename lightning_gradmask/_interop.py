"""Warnings about Lightning's own callbacks that would change entries a mask freezes.

Measured (torch 2.13, lightning 2.6): ``StochasticWeightAveraging`` keeps frozen entries exact
(its running mean ``avg + (a - avg) / (n + 1)`` is ``a`` when ``avg == a``), while
``EMAWeightAveraging`` computes ``decay * avg + (1 - decay) * a``, which rounds away from ``a``
in float32 (about 1 entry in 6 moved, by up to 3e-7), and copies the averaged weights into the
model at the end of training. ``ModelPruning`` zeroes entries by magnitude, frozen or not.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_gradmask._namespaces import lightning_classes, trainer_callbacks


def warn_if_averaged_inexactly(trainer: pl.Trainer, owner: str) -> None:
    """Warn when an ``EMAWeightAveraging`` callback would round frozen entries."""
    ema = lightning_classes("callbacks", "EMAWeightAveraging")
    if ema and any(isinstance(callback, ema) for callback in trainer_callbacks(trainer)):
        rank_zero_warn(
            f"{owner}: EMAWeightAveraging averages every entry as `decay * avg + (1 - decay) * current`, which "
            "in floating point is not exactly the value of an entry that never changes; the averaged weights "
            "it validates with, saves as the checkpoint's state_dict and copies into the model at the end of "
            "training differ from the frozen values by rounding (about 1e-7). For bit-identical frozen "
            "entries use StochasticWeightAveraging, or WeightAveraging(avg_fn=lambda avg, current, n: "
            "torch.lerp(avg, current, 1 - decay)), which return an unchanged entry exactly."
        )


def warn_if_pruned(trainer: pl.Trainer, pl_module: pl.LightningModule, frozen: Iterable[str], owner: str) -> None:
    """Warn when a ``ModelPruning`` callback prunes a parameter named in ``frozen``.

    Call it once every callback's ``setup`` has run (``ModelPruning`` resolves its parameters there).
    """
    pruning = lightning_classes("callbacks", "ModelPruning")
    if not pruning:
        return
    names = {id(module): name for name, module in pl_module.named_modules()}
    frozen = set(frozen)
    for callback in trainer_callbacks(trainer):
        if not isinstance(callback, pruning):
            continue
        pruned = {
            f"{names[id(module)]}.{attr}".lstrip(".")
            for module, attr in getattr(callback, "_parameters_to_prune", None) or ()
            if id(module) in names
        }
        hit = sorted(pruned & frozen)
        if hit:
            rank_zero_warn(
                f"{owner}: ModelPruning prunes {', '.join(repr(n) for n in hit)}, which have frozen entries: "
                "pruning zeroes entries by magnitude whether they are frozen or not, so those frozen entries "
                "will not keep their values. Leave them out of `parameters_to_prune`."
            )
