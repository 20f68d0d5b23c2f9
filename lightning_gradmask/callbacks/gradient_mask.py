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

from lightning_gradmask._distributed import assert_same_on_all_ranks, check_strategy, is_model_parallel
from lightning_gradmask._interop import warn_if_averaged_inexactly, warn_if_pruned
from lightning_gradmask._namespaces import Callback, lightning_classes, module_overrides, trainer_callbacks
from lightning_gradmask.errors import GradmaskConfigError, MaskSpecError
from lightning_gradmask.functional.compact import CompactEntries, expand_compact_state_
from lightning_gradmask.functional.constraints import parameter_constraints
from lightning_gradmask.functional.masks import resolve_masks
from lightning_gradmask.functional.optimizer_params import OptimizerParamIds

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

    With ``compact=True`` (sparse fine-tuning) the optimizer holds only the trainable entries: each
    partly trainable parameter is replaced in the user's optimizer ``param_groups``, for the run, by a
    1-D tensor of its trainable entries; the trainable part of the gradient is gathered into it
    during backward (the dense ``.grad`` is freed: ``None`` in later hooks), its values are written
    back into the parameter after every step, and the frozen entries are never written. The
    optimizer's state holds as many entries as there are trainable ones (also in checkpoints); at
    the end of ``fit`` (or on an exception) the parameters go back into the optimizer with their
    state re-expanded (zeros at frozen entries). Not supported with ``compact=True`` (a
    ``GradmaskConfigError`` before the first step): ``GradientNoise``/``WeightNoise`` in the same
    Trainer, ``MaskedL1Mixin``'s proximal step, another mask owner (``SensitiveColumnBlinding``) on
    the same parameter, ``LBFGS``, a masked parameter in two optimizers.

    A parameter frozen whole (spec ``False``) costs what ``requires_grad_(False)`` by hand costs, on a
    single device: its ``requires_grad`` is switched off inside each training step's forward and
    backward (from the second batch; back on after the backward, at the end of ``fit`` and on an
    exception), its ``.grad`` stays ``None``, so autograd and the optimizer skip it.

    Under ``ModelParallelStrategy`` (FSDP2, tensor parallelism) parameters are ``DTensor`` objects of their
    global shape: the spec gives whole masks as usual, :attr:`masks` holds them whole in CPU memory,
    and each process masks and restores its own shard (see ``docs/gradient_mask.md``). ``compact=True``
    is not supported there yet.

    Args:
        trainable: the mask spec, or a mask file path.
        compact: hold only the trainable entries in the optimizer (see above).
        log_stats: log ``gradient_mask/frozen_fraction`` (frozen share of the named parameters'
            entries) and ``gradient_mask/removed_grad_norm`` (L2 norm of the frozen entries'
            gradient removed at the last backward, unscaled; with ``SensitiveColumnBlinding`` in
            the same Trainer its blinded entries count too; parameters frozen whole get no gradient on
            a single device, so they add nothing) on the Trainer's logging steps.

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

    Sparse fine-tuning::

        mask = GradientMask({"re:encoder\\..*\\.weight": lambda name, p: torch.rand(p.shape) < 0.01},
                            compact=True)

    Raises (when ``fit`` starts, before any step, model untouched):
        MaskSpecError: unknown names, regexes matching nothing, shape mismatches, values other
            than 0/1, coordinates out of range, keys claiming the same parameter, bad files
            (in ``on_fit_start``, so after ``configure_model``: layers built there can be named).
        UnsupportedStrategyError: FSDP1 (``FSDPStrategy``), DeepSpeed or another unsupported strategy
            (at ``setup``). ``ModelParallelStrategy`` (FSDP2) is supported; ``compact=True`` under it
            raises ``GradmaskConfigError``.
        RuntimeError: the masks differ between DDP ranks.

    Warns (at the start of training):
        PossibleUserWarning: a non-fused Adam/AdamW steps ``SPEED_HINT_MIN_FROZEN`` (100,000) or
            more frozen CPU entries; ``fused=True`` is much faster there, results are exact either way.
    """

    def __init__(
        self, trainable: Union[Mapping[str, Any], str, os.PathLike], *, compact: bool = False, log_stats: bool = True
    ) -> None:
        if not isinstance(trainable, (Mapping, str, os.PathLike)):
            raise MaskSpecError(
                "GradientMask(trainable=...) must be a mapping from parameter names (or 're:' patterns) "
                f"to masks, or a mask file path; got {type(trainable).__name__}"
            )
        if isinstance(trainable, Mapping):
            bad = [key for key in trainable if not isinstance(key, str)]
            if bad:
                raise MaskSpecError(f"GradientMask(trainable=...) keys must be strings; got {bad[0]!r}")
        if not isinstance(compact, bool):
            raise GradmaskConfigError(f"GradientMask(compact=...) must be True or False; got {compact!r}")
        self.trainable = trainable
        self.compact = compact
        self.log_stats = log_stats
        self._masks: dict[str, torch.Tensor] | None = None
        self._compact: CompactEntries | None = None
        self._compact_ids = OptimizerParamIds()
        self._hook_handles: list[Any] = []
        self._gather_in_hooks = False
        self._removed_sq: torch.Tensor | None = None
        self._measure = False
        self._whole_frozen: list[torch.Tensor] = []  # parameters frozen whole: requires_grad off in forward/backward
        self._switched_off: list[torch.Tensor] = []
        self._batches_started = 0
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
        check_strategy(trainer, "GradientMask", sharded=True)
        if self.compact and is_model_parallel(trainer):
            raise GradmaskConfigError(
                "GradientMask(compact=True) does not support ModelParallelStrategy (FSDP2) yet: the compact "
                "tensors would have to be sharded like their parameters. Use compact=False, which supports it."
            )
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
        if self.compact:
            _refuse_unsupported_companions(trainer)
        # compact mode: the parameters it holds are known once the optimizers exist (on_train_start); until
        # then, and for any masked parameter no optimizer holds at the start, the dense mechanism applies
        parameter_constraints(pl_module).set_masks(self, masks)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters(remove_duplicate=False))
        partial = {n: (params[n], m) for n, m in self.masks.items() if m.any() and not m.all()}
        if self.compact:
            self._start_compact(trainer, pl_module)
        else:  # a checkpoint of a compact run resumed densely: its state covers the trainable entries only
            expand_compact_state_(trainer.optimizers, partial)
        parameter_constraints(pl_module).attach(trainer.optimizers)
        self._training = True
        # the module's own on_after_backward runs after every callback's: if it may write gradients,
        # mask them again before clipping and the optimizer see them
        self._remask_before_step = module_overrides(pl_module, "on_after_backward")
        self._batches_started = 0
        self._whole_frozen = (
            [params[name] for name, mask in self.masks.items() if not mask.any() and params[name].requires_grad]
            if _single_device(trainer)
            else []  # DDP's reducer expects a gradient for every parameter that required one when it wrapped
        )
        warn_if_pruned(trainer, pl_module, [n for n, mask in self.masks.items() if not mask.all()], "GradientMask")
        dense = {n: m for n, m in self.masks.items() if self._compact is None or n not in self._compact.names}
        slow = _unfused_adam_on_frozen_cpu_entries(trainer.optimizers, pl_module, dense)
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
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._training:
            return
        self._measure = self.log_stats and _is_logging_step(trainer)
        self._removed_sq = None
        # Parameters frozen whole skip autograd and the optimizer as with requires_grad_(False) by hand, but
        # only inside the training step: every other hook (HessianMonitor's first-batch trial included, hence
        # not on the first batch) sees them as before. Their values stay exact by the restore either way.
        self._batches_started += 1
        if self._whole_frozen and self._batches_started > 1 and not self._switched_off:
            frozen = {id(p) for p in self._whole_frozen}
            remaining = any(p.requires_grad for p in pl_module.parameters() if id(p) not in frozen)
            if remaining:  # never leave the loss without a graph
                self._switched_off = [p for p in self._whole_frozen if p.requires_grad]
                for param in self._switched_off:
                    param.requires_grad_(False)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._training:
            return
        self._switch_back_on()
        for param in self._whole_frozen:
            param.grad = None  # (the first batch, or a later backward in a manual step) no optimizer state for them
        measure = self._measure
        # the constraints' combined masks: one copy of the mask tensors, shared with the exact restore
        removed = parameter_constraints(pl_module).frozen.mask_gradients_(measure=measure)
        if self._compact is not None and not self._gather_in_hooks:
            if measure:
                for name in self._compact.names:
                    self._add_removed(pl_module.get_parameter(name))
            if _gradients_synced(trainer):  # under DDP, gather once the accumulated gradient is all-reduced
                self._compact.gather_grads_()
        if measure and removed is not None:
            if self._removed_sq is not None:
                removed = (removed.double().square() + self._removed_sq.to(removed.device)).sqrt().float()
            self._removed_sq = None
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
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._switch_back_on()  # a training_step that skipped backward

    def _switch_back_on(self) -> None:
        for param in self._switched_off:
            param.requires_grad_(True)
        self._switched_off = []

    # ------------------------------------------------------------------ compact mode
    def _start_compact(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap compact tensors into the optimizers and hook the gradient gather and the write-back."""
        constraints = parameter_constraints(pl_module)
        if constraints.has_post_step:
            raise GradmaskConfigError(
                "GradientMask(compact=True) does not support a proximal step after the optimizer step "
                "(MaskedL1Mixin with a proximal L1 term) yet; use compact=False"
            )
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, torch.optim.LBFGS):
                raise GradmaskConfigError(
                    "GradientMask(compact=True) does not support LBFGS: it re-evaluates the closure at "
                    "changed parameters inside one step; use compact=False"
                )
        params = dict(pl_module.named_parameters(remove_duplicate=False))
        optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        chosen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, mask in self.masks.items():
            if not mask.any() or mask.all() or id(params[name]) not in optimized:
                continue
            others = [o for o in constraints.owners_of(name) if o is not self]
            if others:
                raise GradmaskConfigError(
                    f"GradientMask(compact=True): parameter {name!r} is also constrained by "
                    f"{type(others[0]).__name__}; compact masking needs it alone, use compact=False"
                )
            chosen[name] = (params[name], mask)
        compact = CompactEntries(chosen)
        try:
            compact.swap_in(trainer.optimizers)
        except ValueError as err:
            raise GradmaskConfigError(f"GradientMask(compact=True): {err}") from err
        self._compact = compact
        constraints.set_masks(self, self.masks, held_elsewhere=set(compact.names))
        self._gather_in_hooks = _single_device(trainer)
        if self._gather_in_hooks:  # free each dense gradient as soon as autograd has accumulated it
            for name in compact.names:
                self._hook_handles.append(params[name].register_post_accumulate_grad_hook(self._gather_one))
        for optimizer in trainer.optimizers:
            self._hook_handles.append(optimizer.register_step_pre_hook(lambda *_: compact.refresh_()))
            self._hook_handles.append(optimizer.register_step_post_hook(self._scatter_after_step))

    def _gather_one(self, param: torch.Tensor) -> None:
        assert self._compact is not None
        if self._measure:
            self._add_removed(param)
        self._compact.gather_grad_(param)

    def _add_removed(self, param: torch.Tensor) -> None:
        """Add the squared norm of ``param``'s frozen gradient (before the gather) to the logged figure."""
        assert self._compact is not None
        frozen = self._compact.frozen_grad_norm(param)  # in slices: no float64 copy of the gradient
        if frozen is None:
            return
        removed_sq = frozen.square()
        self._removed_sq = removed_sq if self._removed_sq is None else self._removed_sq + removed_sq

    def _scatter_after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self._compact is not None
        self._compact.scatter_(self._compact_ids(optimizer))

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
        self._switch_back_on()
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        if self._compact is not None:
            self._compact.swap_out()
            self._compact = None
        self._whole_frozen = []
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
            decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
            zero_gradient = decoupled or not group.get("weight_decay", 0)
            if group.get("fused") or not zero_gradient:
                continue
            found.update(id(p) for p in group["params"] if id(p) in frozen)
    return {name: count for key, (name, count) in frozen.items() if key in found and count}


def _refuse_unsupported_companions(trainer: pl.Trainer) -> None:
    """Noise callbacks work on the dense gradients and weights that compact masking takes away."""
    from lightning_gradmask.callbacks.gradient_noise import GradientNoise
    from lightning_gradmask.callbacks.weight_noise import WeightNoise

    for callback in trainer_callbacks(trainer):
        if isinstance(callback, (GradientNoise, WeightNoise)):
            raise GradmaskConfigError(
                f"GradientMask(compact=True) does not support {type(callback).__name__} in the same Trainer "
                "yet; use compact=False"
            )


def _single_device(trainer: pl.Trainer) -> bool:
    return isinstance(trainer.strategy, lightning_classes("strategies", "SingleDeviceStrategy"))


def _gradients_synced(trainer: pl.Trainer) -> bool:
    """False on the micro-batches whose backward DDP does not all-reduce (``no_sync``)."""
    return bool(getattr(trainer.strategy.model, "require_backward_grad_sync", True))


def _is_logging_step(trainer: pl.Trainer) -> bool:
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", False)) and trainer.logger is not None


def _loss_scale(trainer: pl.Trainer) -> float:
    """The GradScaler's current scale under fp16 mixed precision, else 1."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())
