"""``WeightNoise``: train at seeded, randomly perturbed weights; the clean weights are what is updated and saved."""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_gradmask._distributed import assert_same_on_all_ranks, check_strategy
from lightning_gradmask.callbacks._seeded_noise import (
    WEIGHT_STREAM,
    ParameterTable,
    SeededNoise,
    check_seed,
    normalize_targets,
    refuse_same_seed,
    seed_tensor,
)
from lightning_gradmask.functional.constraints import parameter_constraints
from lightning_gradmask.functional.noise import StdSchedule, make_schedule

__all__ = ["WeightNoise"]


class WeightNoise(SeededNoise):
    r"""Train at randomly perturbed weights: the gradient is taken at ``w + n``, applied to ``w``.

    For each optimizer step, before the forward pass of the first micro-batch of the accumulation
    window (``on_train_batch_start``), the chosen weights are saved and perturbed by Gaussian noise
    ``n`` (one draw for all micro-batches of the window). Before the optimizer step
    (``on_before_optimizer_step``) the saved clean values are copied back, exactly (``w + n - n``
    is not ``w`` in floating point), so the optimizer updates the clean weights with the gradient
    taken at the perturbed point. With a learning rate of 0 the weights end bit-identical.

    The noise of parameter ``i`` at optimizer step ``t`` is ``std_t * noise_like(w, seed, t, i)``
    (times ``|w|`` per entry with ``relative=True``), identical on every DDP rank and after resume.
    Frozen entries of ``GradientMask`` and severed weights of ``SensitiveColumnBlinding`` are never
    perturbed (severed weights stay exactly 0). Parameters with ``requires_grad=False`` are skipped.

    Clean weights are what the rest of the world sees: validation (also mid-epoch), test,
    prediction, every checkpoint (also ``save_weights_only`` and a ``save_checkpoint`` called
    mid-window), and the model after ``fit`` ends or raises.

    Args:
        std: noise std (``>= 0``), or a callable ``step -> std`` (Python only).
        modules: module classes whose parameters are perturbed: classes, or class paths as strings
            (``"torch.nn.Linear"``; a bare name is looked up in ``torch.nn``).
        relative: scale the noise of each entry by its magnitude: per-entry std ``std * |w|``.
        targets: optional parameter names or ``re:`` patterns (one string or a list) that narrow
            the selection made by ``modules`` and ``parameters``.
        seed: the noise seed; the same seed gives the same noise.
        parameters: which parameters of those modules (``("weight",)``; add ``"bias"`` for biases).

    Logs ``weight_noise/std`` (the std of the current draw).

    Example::

        WeightNoise(std=1e-2, modules=(nn.Linear,), relative=True)

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_gradmask.WeightNoise
              init_args:
                std: 0.01
                modules: ["torch.nn.Linear", "torch.nn.Conv2d"]
                relative: true

    Under manual optimization the weights are perturbed from the start of a batch until the first
    optimizer step (with one ``step()`` per batch this is the same as above). This is not
    differential privacy.

    Raises (at construction or ``setup``, before any step; model untouched):
        NoiseStdError: a negative or non-finite ``std``, a callable returning one (at step 0 at
            setup, later at the step where it does, naming it).
        ValueError: ``modules`` naming no module of the model, none of those modules having the
            ``parameters``, ``targets`` leaving nothing; a string in ``modules`` naming no class.
        UnsupportedStrategyError: FSDP, DeepSpeed or another sharding strategy.
    """

    def __init__(
        self,
        std: Union[float, Callable[[int], float]],
        *,
        modules: Union[str, type, Sequence[Union[str, type]]] = (nn.Linear,),
        relative: bool = False,
        targets: Optional[Union[str, Sequence[str]]] = None,
        seed: int = 0,
        parameters: Union[str, Sequence[str]] = ("weight",),
    ) -> None:
        self.schedule: StdSchedule = make_schedule(std, owner="WeightNoise")  # type: ignore[assignment]
        self.modules = _resolve_module_classes(modules)
        if not isinstance(relative, bool):
            raise TypeError(f"WeightNoise(relative=...) must be True or False; got {relative!r}")
        self.relative = relative
        self.targets = normalize_targets(targets, "WeightNoise")
        self.seed = check_seed(seed, "WeightNoise")
        if isinstance(parameters, str):
            parameters = (parameters,)
        if not parameters or not all(isinstance(p, str) and p for p in parameters):
            raise ValueError(f"WeightNoise(parameters=...) must be parameter attribute names like 'weight'; got {parameters!r}")
        self.parameters = tuple(parameters)
        self._chosen: list[tuple[str, int, tuple[str, ...]]] = []  # (name, index, alias names)
        self._live: list[tuple[str, int, tuple[str, ...], torch.Tensor]] = []
        self._clean: dict[str, torch.Tensor] = {}
        self._perturbed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, clean copy)
        self._hook: Any = None
        self._draw_buffers: dict[int, torch.Tensor] = {}  # id(param) -> CPU draw buffer
        self._generator = torch.Generator(device="cpu")
        self._last_std: float | None = None
        self._draws = 0
        self._register()

    # ------------------------------------------------------------------ public read-only state
    @property
    def target_names(self) -> list[str]:
        """Names of the parameters that are perturbed (after ``setup``)."""
        return [name for name, _, _ in self._chosen]

    @property
    def perturbed(self) -> bool:
        """Whether the weights currently hold noise."""
        return bool(self._perturbed)

    @property
    def last_std(self) -> float | None:
        """The std of the most recent draw."""
        return self._last_std

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "WeightNoise")
        refuse_same_seed(trainer, self)
        table = ParameterTable(pl_module)
        candidates = self._candidates(pl_module, table)
        if self.targets is not None:
            candidates = table.select(self.targets, "WeightNoise(targets=...)", among=candidates)
        self._chosen = [(name, table.index(name), table.aliases(name)) for name in candidates]
        self.schedule(0)
        assert_same_on_all_ranks(trainer, {"seed": seed_tensor(self.seed)}, "WeightNoise seed")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = ParameterTable(pl_module)
        self._live = [(name, index, aliases, table.param(name)) for name, index, aliases in self._chosen]
        self._clean = {}
        if self._hook is None:
            owner = weakref.ref(pl_module)

            def clean_state_dict(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
                if module is owner():  # not a deep copy of the module (SWA, EMA) that inherited the hook
                    self._clean_state_dict(module, state, prefix, local_metadata)

            self._hook = pl_module.register_state_dict_post_hook(clean_state_dict)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._perturbed or not self._live:
            return  # a later micro-batch of the window: keep the window's draw
        step = trainer.global_step
        std = self.schedule(step)
        self._last_std = std
        pl_module.log("weight_noise/std", std, on_step=True, on_epoch=False)
        if std > 0:
            self._perturb(pl_module, step, std)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._restore()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls on_exception, not teardown, after a failed fit: leave the module as it was
        self.teardown(trainer, pl_module, "fit")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # the state_dict hook already wrote clean values; this also covers a state_dict built elsewhere
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            self._clean_state_dict(pl_module, state, "", {})

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
        if stage != "fit":
            return
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._live = []
        self._clean = {}
        self._draw_buffers = {}

    # ------------------------------------------------------------------ the mechanism
    @torch.no_grad()
    def _perturb(self, pl_module: pl.LightningModule, step: int, std: float) -> None:
        # the same arithmetic as noise_like(...).mul_(std) [.mul_(|clean|)] then data.add_(noise),
        # bit for bit, in grouped kernels
        frozen = parameter_constraints(pl_module).frozen
        chosen = [(name, index, aliases, param) for name, index, aliases, param in self._live if param.requires_grad]
        if not chosen:
            self._draws += 1
            return
        datas, cleans = [], []
        for name, _, _, param in chosen:
            data = param.detach()
            clean = self._clean.get(name)
            if clean is None or clean.shape != data.shape or clean.dtype != data.dtype or clean.device != data.device:
                clean = torch.empty_like(data, memory_format=torch.preserve_format)
                self._clean[name] = clean
            datas.append(data)
            cleans.append(clean)
        torch._foreach_copy_(cleans, datas)
        noises = self._draw(step, [(index, param, data) for (_, index, _, param), data in zip(chosen, datas)], WEIGHT_STREAM)
        torch._foreach_mul_(noises, std)
        if self.relative:
            torch._foreach_mul_(noises, torch._foreach_abs(cleans))
        for (_, _, aliases, _), noise in zip(chosen, noises):
            for alias in aliases:
                frozen.zero_frozen_in_(alias, noise)
        self._perturbed.extend((param, clean) for (_, _, _, param), clean in zip(chosen, cleans))
        torch._foreach_add_(datas, noises)
        self._draws += 1

    @torch.no_grad()
    def _restore(self) -> None:
        if self._perturbed:
            torch._foreach_copy_([param.detach() for param, _ in self._perturbed], [clean for _, clean in self._perturbed])
        self._perturbed = []

    def _clean_state_dict(self, module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        """Write the clean values into a state dict built while the weights hold noise."""
        if not self._perturbed:
            return
        clean_by_id = {id(param): clean for param, clean in self._perturbed}
        for name, _, aliases, param in self._live:
            clean = clean_by_id.get(id(param))
            if clean is None:
                continue
            for alias in aliases:
                key = prefix + alias
                value = state.get(key)
                if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                    state[key] = clean.clone()

    def _candidates(self, pl_module: nn.Module, table: "ParameterTable") -> list[str]:
        kinds = ", ".join(cls.__name__ for cls in self.modules)
        matched = [(mname, m) for mname, m in pl_module.named_modules() if isinstance(m, self.modules)]
        if not matched:
            present = sorted({type(m).__name__ for _, m in pl_module.named_modules() if m is not pl_module})
            raise ValueError(
                f"WeightNoise(modules=...): the model has no module of type {kinds} "
                f"(its modules are: {', '.join(present) or 'none'})"
            )
        names: list[str] = []
        seen: set[int] = set()
        for mname, module in matched:
            for pname in self.parameters:
                param = module._parameters.get(pname)  # type: ignore[attr-defined]  # matched holds nn.Modules
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                if not param.is_floating_point():
                    raise ValueError(f"WeightNoise: parameter {table.canonical(param)!r} is not floating point")
                names.append(table.canonical(param))
        if not names:
            available = sorted({p for _, m in matched for p, v in m._parameters.items() if v is not None})  # type: ignore[attr-defined]  # matched holds nn.Modules
            raise ValueError(
                f"WeightNoise(parameters={list(self.parameters)!r}): none of the {len(matched)} {kinds} module(s) "
                f"has such a parameter (they have: {', '.join(available) or 'none'})"
            )
        order = {name: i for i, name in enumerate(table.names)}
        return sorted(names, key=order.__getitem__)


def _resolve_module_classes(modules: Any) -> tuple[type, ...]:
    where = "WeightNoise(modules=...)"
    if isinstance(modules, (str, type)):
        modules = (modules,)
    if not isinstance(modules, Sequence) or not modules:
        raise TypeError(f"{where} must be module classes or class paths such as 'torch.nn.Linear'; got {modules!r}")
    classes: list[type] = []
    for entry in modules:
        cls = _import_class(entry, where) if isinstance(entry, str) else entry
        if not isinstance(cls, type) or not issubclass(cls, nn.Module):
            raise TypeError(f"{where}: {entry!r} is not a torch.nn.Module subclass")
        classes.append(cls)
    return tuple(classes)


def _import_class(path: str, where: str) -> Any:
    module_path, _, attr = path.rpartition(".")
    module_path = module_path or "torch.nn"
    try:
        return getattr(importlib.import_module(module_path), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{where}: {path!r} does not name a class ({err})") from err
