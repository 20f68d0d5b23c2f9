"""``SensitiveColumnBlinding``: a model that neither reads nor learns from chosen input columns."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_gradmask._distributed import assert_same_on_all_ranks, check_strategy
from lightning_gradmask._namespaces import Callback, module_overrides
from lightning_gradmask.errors import GradmaskConfigError
from lightning_gradmask.functional.blinding import (
    BlindingPlan,
    ColumnSpecError,
    InputFill,
    check_feature_names,
    column_mask,
    install_input_fill,
    plan_blinding,
)
from lightning_gradmask.functional.constraints import parameter_constraints
from lightning_gradmask.functional.frozen import FrozenEntries
from lightning_gradmask.functional.sharding import local_part, local_tensor

__all__ = ["SensitiveColumnBlinding"]

_MODES = ("sever", "grad")


class SensitiveColumnBlinding(Callback):
    r"""Blind chosen input columns of one layer: the model neither reads nor learns from them.

    ``layer`` is the module that reads the raw features: an ``nn.Linear`` (columns are its input
    features) or an ``nn.Conv1d``/``nn.Conv2d`` with ``groups=1`` (columns are its input
    channels). With ``layer=None`` the first ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` in
    ``pl_module.named_modules()`` order is used (registration order, depth first), and an info
    message names it.

    Modes:

    * ``"sever"`` (default): when training starts, the weights that read the columns
      (``weight[:, c]``, ``weight[:, c, ...]`` for a convolution) are set to exactly 0, and they
      stay exactly 0 after every optimizer step (any optimizer, weight decay, accumulation, AMP,
      resume, DDP: they are registered as frozen entries with the shared constraints, which
      restores them after each step). A forward pre-hook on ``layer`` fills the columns of its
      input with 0 using ``masked_fill``, so even ``inf``/``NaN`` in a blinded column changes
      nothing. Consequences: outputs and every parameter's gradient are identical whatever the
      blinded columns hold, and a column's values never enter a gradient that DDP shares.
    * ``"grad"``: only the gradient of those weights is zeroed and they keep their initial values
      exactly. The columns still flow forward through those (random) weights, so the model can
      still learn from them through later layers, and under DDP the raw gradient (which carries
      the column's values) is all-reduced before any hook can zero it. Use it to keep the first
      layer's own weights at their initial values, not to make a model independent of the columns.

    The input fill stays on the layer after training (it is a forward pre-hook, not part of the
    ``state_dict``); :meth:`remove_input_fill` takes it off. A checkpoint loaded into a plain
    model keeps the zero weights (finite values in the columns have no effect) but no fill
    (``inf``/``NaN`` in a blinded column would reach the output).

    The guarantee holds only if nothing mixes features before ``layer`` (a normalization over
    features, attention, PCA, a learned embedding). On the first training batch the callback
    watches which modules receive the raw batch tensors and warns if any other module (apart from
    element-wise ones such as dropout or activations) received them before ``layer``.

    Args:
        columns: names (with ``feature_names``) or integer indices of the blinded columns, or a
            single one.
        feature_names: one name per input column of ``layer``. When ``None`` and a column is given
            by name, ``trainer.datamodule.feature_names`` is used if the datamodule has it.
        layer: name of the module reading the raw features (as in ``named_modules()``), or
            ``None`` for the rule above.
        mode: ``"sever"`` or ``"grad"``.
        log_stats: log ``blinding/<layer>/weight_deviation`` at each training epoch end: the largest
            absolute difference between a blinded weight and the value it must keep (0 in
            ``"sever"`` mode, its initial value in ``"grad"`` mode). It is always 0.

    Example::

        import lightning as L
        from sklearn.datasets import load_diabetes
        from lightning_gradmask import SensitiveColumnBlinding

        data = load_diabetes()
        blind = SensitiveColumnBlinding(columns=["age", "sex"], feature_names=data.feature_names,
                                        layer="net.0")
        L.Trainer(callbacks=[blind]).fit(model, loader)

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_gradmask.SensitiveColumnBlinding
              init_args:
                columns: [age, sex]
                feature_names: [age, sex, bmi, bp, s1, s2, s3, s4, s5, s6]
                layer: net.0

    Raises (when ``fit`` starts: the strategy at ``setup``, the rest in ``on_fit_start``, after
    ``configure_model``, so layers built there can be blinded; before anything on the model changes):
        ColumnSpecError: an unknown column name (the available names are listed), an index out of
            range (the layer's input size is given), names without ``feature_names``, a column
            listed twice, ``feature_names`` of the wrong length, a ``layer`` that does not exist
            (closest names listed) or is not a Linear/Conv1d/Conv2d, a grouped convolution, or all
            columns of the layer blinded.
        UnsupportedStrategyError: FSDP1 (``FSDPStrategy``; ``ModelParallelStrategy``, FSDP2, is
            supported), DeepSpeed or another unsupported strategy.
        RuntimeError: the resolved columns differ between DDP ranks.
    """

    def __init__(
        self,
        columns: Union[Sequence[Union[int, str]], int, str],
        feature_names: Optional[Sequence[str]] = None,
        layer: Optional[str] = None,
        mode: Literal["sever", "grad"] = "sever",
        log_stats: bool = True,
    ) -> None:
        if mode not in _MODES:
            raise GradmaskConfigError(f"SensitiveColumnBlinding(mode={mode!r}): mode must be 'sever' or 'grad'")
        if layer is not None and not isinstance(layer, str):
            raise ColumnSpecError(f"SensitiveColumnBlinding(layer=...) must be a module name or None, got {layer!r}")
        if columns is None:
            raise ColumnSpecError(
                "SensitiveColumnBlinding(columns=...) is required: the names or indices of the input columns "
                "to blind, e.g. columns=['sex'] with feature_names, or columns=[1]"
            )
        if isinstance(columns, (str, int)):
            columns = [columns]
        elif not isinstance(columns, Iterable):
            raise ColumnSpecError(
                f"SensitiveColumnBlinding(columns=...) must be a name, an index or a list of them; "
                f"got {type(columns).__name__} {columns!r}"
            )
        check_feature_names(feature_names, parameter="SensitiveColumnBlinding(feature_names=...)")
        # numpy/torch scalars become plain Python values (they appear in the checkpoint's state key)
        self.columns = [c.item() if hasattr(c, "item") and not isinstance(c, (str, int)) else c for c in columns]
        self.feature_names = None if feature_names is None else [str(n) for n in feature_names]
        self.layer = layer
        self.mode = mode
        self.log_stats = log_stats
        self._plan: BlindingPlan | None = None
        self._own: FrozenEntries | None = None
        self._remask_before_step = False
        self._initial: torch.Tensor | None = None  # blinded weights at train start ("grad" mode)
        self._handles: list[RemovableHandle] = []
        self._loaded: dict[str, Any] | None = None
        self._tracer: _InputFlowTracer | None = None
        self._traced = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer, columns=self.columns, mode=self.mode)

    # ------------------------------------------------------------------ public read-only state
    @property
    def plan(self) -> BlindingPlan:
        """The resolved layer, columns and weight mask (once ``fit`` has started)."""
        if self._plan is None:
            raise RuntimeError("SensitiveColumnBlinding.plan is available once Trainer.fit has started (on_fit_start)")
        return self._plan

    @property
    def blinded_columns(self) -> tuple[int, ...]:
        """Indices of the blinded columns (once ``fit`` has started)."""
        return self.plan.columns

    @property
    def layer_name(self) -> str:
        """Name of the blinded layer (once ``fit`` has started)."""
        return self.plan.layer_name

    def remove_input_fill(self) -> int:
        """Remove the input fill this callback installed; returns how many hooks were removed.

        Without the fill a ``"sever"`` model still has zero weights on the columns (finite values
        have no effect), but ``inf``/``NaN`` in a blinded column would reach the output.
        """
        removed = len(self._handles)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return removed

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "SensitiveColumnBlinding", sharded=True)
        # a resumed checkpoint's columns (loaded before on_fit_start) are compared with this fit's plan
        self._plan = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after configure_model (layers built there exist now), after the checkpoint's weights are
        # loaded and the model is on its device, before the sanity check and any step
        self._resolve(trainer, pl_module)
        if self.mode != "sever":
            return
        # from here on the model does not read the columns
        self._install_fill()
        self._frozen_entries().zero_frozen_()

    def _resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = self.feature_names
        if names is None and any(isinstance(c, str) for c in self.columns):
            from_data = getattr(getattr(trainer, "datamodule", None), "feature_names", None)
            if from_data is not None:
                names = [str(n) for n in from_data]
        plan = plan_blinding(pl_module, self.columns, names, self.layer)
        assert_same_on_all_ranks(
            trainer, {"columns": column_mask(plan.input_size, plan.columns)}, "SensitiveColumnBlinding columns"
        )
        self._plan = plan
        self._traced = False
        rank_zero_info(f"SensitiveColumnBlinding ({self.mode}): {plan.describe()}")
        if self.mode == "grad":
            rank_zero_info(
                "SensitiveColumnBlinding(mode='grad'): only the gradient of the weights reading the columns "
                "is zeroed; the columns still flow forward and the model can still learn from them. "
                "Use mode='sever' to make the model independent of them."
            )
        if self._loaded is not None:
            self._warn_if_changed()
        parameter_constraints(pl_module).set_masks(self, {plan.weight_name: plan.trainable})

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._plan is None:
            return
        self._own = self._frozen_entries()
        # the module's own on_after_backward runs after every callback's: mask again before the step
        self._remask_before_step = module_overrides(pl_module, "on_after_backward")
        if self.mode == "sever":
            # again, after any restore between on_fit_start and here; the constraints capture the
            # frozen values at the first optimizer step, so they are captured as 0
            self._own.zero_frozen_()
        else:
            self._initial = self._blinded_values()
        parameter_constraints(pl_module).attach(trainer.optimizers)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._plan is not None and not self._traced:
            self._traced = True
            self._tracer = _InputFlowTracer(pl_module, self._plan, batch)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._tracer is not None:
            self._tracer.report()
        self._stop_tracer()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._own is not None:
            self._own.mask_gradients_()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._own is not None and self._remask_before_step:
            self._own.mask_gradients_()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.log_stats or self._own is None or self._plan is None:
            return
        pl_module.log(
            f"blinding/{self._plan.layer_name or 'model'}/weight_deviation",
            self.weight_deviation(),
            on_step=False,
            on_epoch=True,
            sync_dist=True,  # the same on every DDP rank; under FSDP2 each rank measures its shard: the max of them
            reduce_fx="max",
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._release(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release(pl_module)

    # ------------------------------------------------------------------ checks
    @torch.no_grad()
    def weight_deviation(self) -> float:
        """Largest ``|blinded weight - required value|`` (0 in ``sever``, initial in ``grad``); 0.0 expected.

        Under ``ModelParallelStrategy`` (FSDP2, tensor parallelism), over this process's shard of the
        weight (no communication); the logged ``weight_deviation`` is the largest over all processes.
        """
        blinded = self._blinded_values()
        if self.mode == "grad" and self._initial is not None:
            blinded = blinded - self._initial.to(blinded.device)
        return float(blinded.abs().max()) if blinded.numel() else 0.0

    def _blinded_values(self) -> torch.Tensor:
        """The blinded entries of the layer's weight, a new 1-D tensor (of this process's shard under FSDP2)."""
        plan = self.plan
        weight = plan.module.weight
        assert isinstance(weight, torch.Tensor)
        local = local_tensor(weight.detach())  # a sharded (FSDP2) weight: this process's rows
        return local.masked_select(~local_part(plan.trainable, like=weight).to(local.device))

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._plan is None:
            return {}
        return {
            "layer": self._plan.layer_name,
            "columns": list(self._plan.columns),
            "column_names": None if self._plan.column_names is None else list(self._plan.column_names),
            "mode": self.mode,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._loaded = dict(state_dict)
        if self._plan is not None:
            self._warn_if_changed()

    # ------------------------------------------------------------------ internals
    def _frozen_entries(self) -> FrozenEntries:
        plan = self.plan
        return FrozenEntries({plan.weight_name: (plan.module.weight, plan.trainable)})  # type: ignore[dict-item]  # nn.Module.__getattr__ types weight as Tensor | Module

    def _install_fill(self) -> None:
        plan = self.plan
        for hook in plan.module._forward_pre_hooks.values():
            if isinstance(hook, InputFill) and set(plan.columns) <= set(hook.columns):
                return  # already filled (a second fit, or a resumed model in this process)
        self._handles.append(install_input_fill(plan.module, plan.columns, layer_name=plan.layer_name))

    def _stop_tracer(self) -> None:
        if self._tracer is not None:
            self._tracer.close()
            self._tracer = None

    def _release(self, pl_module: pl.LightningModule) -> None:
        self._stop_tracer()
        parameter_constraints(pl_module).remove(self)
        self._own = None

    def _warn_if_changed(self) -> None:
        assert self._plan is not None and self._loaded is not None
        saved, plan = self._loaded, self._plan
        self._loaded = None
        now = {"layer": plan.layer_name, "columns": list(plan.columns), "mode": self.mode}
        changed = [key for key, value in now.items() if saved.get(key) != value]
        if changed:
            rank_zero_warn(
                "SensitiveColumnBlinding: the checkpoint was trained with "
                + ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
                + "; the settings given now apply ("
                + ", ".join(f"{k}={now[k]!r}" for k in changed)
                + "). Weights trained before on columns blinded now are overwritten with 0 in sever mode."
            )


# ------------------------------------------------------------------------------------------------
# which modules read the raw input
# ------------------------------------------------------------------------------------------------
_IGNORED: tuple[type[nn.Module], ...] = (
    # element-wise modules mix no features
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink,
    # a loss module compares predictions with targets after the model has run
    nn.modules.loss._Loss,
)  # fmt: skip


def _storages(value: Any, out: set[int]) -> set[int]:
    if isinstance(value, torch.Tensor):
        value = local_tensor(value)  # a DTensor (tensor parallelism wraps a layer's input): its local memory
        if value.numel() and value.layout == torch.strided:
            out.add(value.untyped_storage().data_ptr())
    elif isinstance(value, dict):
        for item in value.values():
            _storages(item, out)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _storages(item, out)
    return out


class _InputFlowTracer:
    """Watches the first training batch: which modules other than ``layer`` receive a raw batch tensor?

    A module "receives the raw input" when one of its arguments shares storage with a tensor of
    the batch (views such as ``x.unsqueeze(1)`` count). Container modules and the element-wise
    modules in ``_IGNORED`` are not watched.
    """

    def __init__(self, model: nn.Module, plan: BlindingPlan, batch: Any) -> None:
        self.plan = plan
        self.raw = _storages(batch, set())
        self.layer_called = False
        self.layer_got_raw = False
        self.readers: list[tuple[str, str, bool]] = []  # (name, type, before the layer)
        self.handles: list[RemovableHandle] = []
        if not self.raw:
            return
        for name, module in model.named_modules():
            if module is plan.module:
                # prepend: run before the input fill, to see the tensor the layer is given
                self.handles.append(module.register_forward_pre_hook(self._layer_hook, prepend=True, with_kwargs=True))
            elif not any(True for _ in module.children()) and not isinstance(module, _IGNORED):
                self.handles.append(module.register_forward_pre_hook(self._reader_hook(name), with_kwargs=True))

    def _reader_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if all(r[0] != name for r in self.readers) and _storages((args, kwargs), set()) & self.raw:
                self.readers.append((name, type(module).__name__, not self.layer_called))

        return hook

    def _layer_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.layer_called:
            self.layer_called = True
            self.layer_got_raw = bool(_storages((args, kwargs), set()) & self.raw)

    def report(self) -> None:
        """Warn (rank zero) about what the first batch showed."""
        if not self.raw:
            return
        layer = self.plan.layer_name
        before = [f"{n!r} ({t})" for n, t, first in self.readers if first]
        after = [f"{n!r} ({t})" for n, t, first in self.readers if not first]
        if before:
            rank_zero_warn(
                f"SensitiveColumnBlinding: module {', '.join(before)} received the raw input before the "
                f"blinded layer {layer!r}. If it mixes features (a normalization over features, attention, "
                "PCA, an embedding), the blinded columns reach the model through it and the guarantee does "
                "not hold; blind the first layer that reads the raw input instead."
            )
        if after:
            rank_zero_warn(
                f"SensitiveColumnBlinding: module {', '.join(after)} also received the raw input (after the "
                f"blinded layer {layer!r}). Only {layer!r}'s input is filled: the blinded columns reach the "
                "model through that module (a skip connection or a second branch)."
            )
        if not self.layer_called:
            rank_zero_info(f"SensitiveColumnBlinding: the blinded layer {layer!r} did not run in the first training batch.")
        elif not before and not self.layer_got_raw:
            rank_zero_info(
                f"SensitiveColumnBlinding: the blinded layer {layer!r} does not receive a batch tensor "
                "directly (its input was computed in forward); make sure nothing before it mixes features."
            )

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
