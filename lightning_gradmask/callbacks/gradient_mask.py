"""``GradientMask``: train only chosen entries ("edges") of chosen weight tensors, exactly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from typing_extensions import override

from lightning_gradmask._distributed import assert_same_on_all_ranks, check_strategy
from lightning_gradmask._interop import warn_if_averaged_inexactly, warn_if_pruned
from lightning_gradmask._namespaces import Callback, module_overrides, trainer_callbacks
from lightning_gradmask.errors import MaskSpecError
from lightning_gradmask.functional.constraints import parameter_constraints
from lightning_gradmask.functional.masks import resolve_masks

__all__ = ["GradientMask"]

#: Fewest frozen entries stepped by a non-fused Adam/AdamW on CPU that earn the speed hint: below this
#: the slow ``sqrt`` costs well under a millisecond per step (figures in benchmarks/README.md).
SPEED_HINT_MIN_FROZEN = 100_000


class GradientMask(Callback):
    r"""Update only the chosen entries of chosen parameters; every other entry of them stays exact.

    ``trainable`` maps parameter names (as in ``named_parameters()``) or ``re:`` regular
    expressions to masks, ``True`` where an entry may be updated. Accepted per key: a dense tensor
    (``bool`` or 0/1 numbers) of the parameter's shape, a ``torch.sparse_coo_tensor`` (its stored
    nonzero entries are trainable), a list of index tuples, a ``bool`` for the whole parameter, or a
    callable ``(name, param) -> bool tensor``. The whole spec may instead be the path of a
    ``.safetensors`` or ``.pt`` file mapping names to masks (``.pt`` is read with
    ``weights_only=True``). Parameters named by no key are left alone.

    Frozen entries are bit-identical to their values when training started, whatever the optimizer
    (momentum, Adam, weight decay), precision, accumulation, clipping, manual optimization or resume:
    their gradient is zeroed after every backward, and their values are restored after every
    optimizer step. The model is never reparametrized; the masks live in this callback's
    ``state_dict`` (so ``checkpoint["callbacks"]``).

    Args:
        trainable: the mask spec, or a mask file path.
        log_stats: log ``gradient_mask/frozen_fraction`` (frozen share of the named parameters'
            entries) and ``gradient_mask/removed_grad_norm`` (L2 norm of the frozen entries'
            gradient removed at the last backward, unscaled; with ``SensitiveColumnBlinding`` in
            the same Trainer its blinded entries count too) on the Trainer's logging steps.

    Example::

        import lightning as L
        from lightning_gradmask import GradientMask

        mask = GradientMask(trainable={
            "net.0.weight": edge_mask,                 # bool or 0/1 tensor, parameter's shape
            "net.2.weight": [[0, 0], [1, 0], [1, 1]],  # coordinates of the trainable entries
            "re:encoder\\..*\\.bias": False,           # regex over names; a bool broadcasts
        })
        trainer = L.Trainer(callbacks=[mask])

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_gradmask.GradientMask
              init_args:
                trainable:
                  net.2.weight: [[0, 0], [1, 0]]
                  "re:net\\.0\\..*": false
            # or: trainable: masks.safetensors

    Raises (when ``fit`` starts, before any step, model untouched):
        MaskSpecError: unknown names, regexes matching nothing, shape mismatches, values other
            than 0/1, coordinates out of range, keys claiming the same parameter, bad files
            (in ``on_fit_start``, so after ``configure_model``: layers built there can be named).
        UnsupportedStrategyError: FSDP, DeepSpeed or another sharding strategy (at ``setup``).
        RuntimeError: the masks differ between DDP ranks.

    Warns (at the start of training):
        PossibleUserWarning: a non-fused Adam/AdamW steps ``SPEED_HINT_MIN_FROZEN`` (100,000) or
            more frozen CPU entries; ``fused=True`` is much faster there, results are exact either way.
    """

    def __init__(self, trainable: Union[Mapping[str, Any], str, os.PathLike], *, log_stats: bool = True) -> None:
        if not isinstance(trainable, (Mapping, str, os.PathLike)):
            raise MaskSpecError(
                "GradientMask(trainable=...) must be a mapping from parameter names (or 're:' patterns) "
                f"to masks, or a mask file path; got {type(trainable).__name__}"
            )
        if isinstance(trainable, Mapping):
            bad = [key for key in trainable if not isinstance(key, str)]
            if bad:
                raise MaskSpecError(f"GradientMask(trainable=...) keys must be strings; got {bad[0]!r}")
        self.trainable = trainable
        self.log_stats = log_stats
        self._masks: dict[str, torch.Tensor] | None = None
        self._loaded_masks: dict[str, torch.Tensor] | None = None
        self._training = False
        self._remask_before_step = False
        self._frozen_fraction = 0.0

    # ------------------------------------------------------------------ public read-only state
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The resolved trainable masks, ``{parameter name: bool tensor}`` (once ``fit`` has started)."""
        if self._masks is None:
            raise RuntimeError("GradientMask.masks is available once Trainer.fit has started (on_fit_start)")
        return self._masks

    @property
    @override
    def state_key(self) -> str:
        # several GradientMask callbacks may share a Trainer, each with its own checkpoint entry
        spec = sorted(self.trainable) if isinstance(self.trainable, Mapping) else os.fspath(self.trainable)
        return self._generate_state_key(trainable=spec)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "GradientMask")
        warn_if_averaged_inexactly(trainer, "GradientMask")
        # a resumed checkpoint's masks (loaded before on_fit_start) are compared with this fit's spec
        self._masks = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after configure_model (layers built there exist now) and before any step: the model is untouched
        masks = resolve_masks(self.trainable, pl_module, parameter="GradientMask(trainable=...)")
        assert_same_on_all_ranks(trainer, masks, "GradientMask masks")
        self._masks = masks
        if self._loaded_masks is not None:
            self._warn_if_changed()
        frozen = sum(m.numel() - int(m.sum()) for m in masks.values())  # no temporary mask
        total = sum(m.numel() for m in masks.values())
        self._frozen_fraction = frozen / total if total else 0.0
        parameter_constraints(pl_module).set_masks(self, masks)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        parameter_constraints(pl_module).attach(trainer.optimizers)
        self._training = True
        # the module's own on_after_backward runs after every callback's: if it may write gradients,
        # mask them again before clipping and the optimizer see them
        self._remask_before_step = module_overrides(pl_module, "on_after_backward")
        warn_if_pruned(trainer, pl_module, [n for n, mask in self.masks.items() if not mask.all()], "GradientMask")
        slow = _unfused_adam_on_frozen_cpu_entries(trainer.optimizers, pl_module, self.masks)
        frozen = sum(slow.values())
        if frozen >= SPEED_HINT_MIN_FROZEN:
            rank_zero_warn(
                f"GradientMask: {frozen:,} frozen entries on CPU (in {', '.join(repr(n) for n in slow)}) are "
                "stepped by Adam/AdamW without `fused=True`. Their zero gradients keep a zero second moment, "
                "and the non-fused kernels' `sqrt` is much slower on scattered zeros than with `fused=True` (figures "
                "in benchmarks/README.md). Pass "
                "`fused=True` to the optimizer for speed; results are exact either way.",
                category=PossibleUserWarning,
            )

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._training:
            return
        measure = self.log_stats and _is_logging_step(trainer)
        # the constraints' combined masks: one copy of the mask tensors, shared with the exact restore
        removed = parameter_constraints(pl_module).frozen.mask_gradients_(measure=measure)
        if removed is not None:
            scale = _loss_scale(trainer)
            pl_module.log("gradient_mask/removed_grad_norm", removed / scale, on_step=True, on_epoch=False)
            pl_module.log("gradient_mask/frozen_fraction", self._frozen_fraction, on_step=True, on_epoch=False)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._training and self._remask_before_step:
            parameter_constraints(pl_module).frozen.mask_gradients_()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._release(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls on_exception, not teardown, after a failed fit: a later fit must not find
        # these masks on the module (another GradientMask, or GradientNoise alone, would apply them)
        self._release(pl_module)

    def _release(self, pl_module: pl.LightningModule) -> None:
        parameter_constraints(pl_module).remove(self)
        self._training = False

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._masks is None:
            return {}
        return {"masks": {name: mask.to("cpu") for name, mask in self._masks.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "masks" not in state_dict:
            return
        self._loaded_masks = dict(state_dict["masks"])
        if self._masks is not None:
            self._warn_if_changed()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # a changed spec changes the state_key: with one GradientMask on each side, still compare the masks
        states = checkpoint.get("callbacks", {})
        if self.state_key in states or self._legacy_state_key in states:
            return
        saved = [key for key in states if key.startswith(f"{type(self).__qualname__}{{")]
        if len(saved) == 1 and sum(isinstance(cb, GradientMask) for cb in trainer_callbacks(trainer)) == 1:
            self.load_state_dict(states[saved[0]])

    def _warn_if_changed(self) -> None:
        assert self._masks is not None and self._loaded_masks is not None
        saved, current = self._loaded_masks, self._masks
        changed = [
            name
            for name in sorted(set(saved) | set(current))
            if name not in saved or name not in current or not torch.equal(saved[name], current[name])
        ]
        self._loaded_masks = None
        if changed:
            rank_zero_warn(
                "GradientMask: the masks in the checkpoint differ from the spec given now for "
                f"{', '.join(repr(n) for n in changed)}; the new spec applies (entries frozen now keep "
                "the values they have in the checkpoint)."
            )


def _unfused_adam_on_frozen_cpu_entries(
    optimizers: list[torch.optim.Optimizer], module: torch.nn.Module, masks: Mapping[str, torch.Tensor]
) -> dict[str, int]:
    """``{name: frozen entries}`` of the masked CPU parameters that a non-fused Adam/AdamW steps with
    zero gradients at their frozen entries (no L2 weight decay adding to them), in
    ``named_parameters()`` order."""
    frozen = {
        id(param): (name, masks[name].numel() - int(masks[name].sum()))
        for name, param in module.named_parameters()
        if name in masks and param.device.type == "cpu"
    }
    found: set[int] = set()
    for optimizer in optimizers:
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):  # AdamW is no Adam subclass on older torch (2.6)
            continue
        for group in optimizer.param_groups:
            zero_gradient = group.get("decoupled_weight_decay", False) or not group.get("weight_decay", 0)
            if group.get("fused") or not zero_gradient:
                continue
            found.update(id(p) for p in group["params"] if id(p) in frozen)
    return {name: count for key, (name, count) in frozen.items() if key in found and count}


def _is_logging_step(trainer: pl.Trainer) -> bool:
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", False)) and trainer.logger is not None


def _loss_scale(trainer: pl.Trainer) -> float:
    """The GradScaler's current scale under fp16 mixed precision, else 1."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())
