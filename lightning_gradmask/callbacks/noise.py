"""``GradientNoise`` and ``WeightNoise``: seeded Gaussian perturbations, identical on every rank.

Both draw their noise with :func:`lightning_gradmask.noise.noise_like` from a generator seeded
with ``(seed, optimizer step, parameter index)``, so every DDP rank adds the same numbers and a
resumed run adds what an uninterrupted run would have added. Neither is differential privacy:
see ``docs/noise.md``.
"""

from __future__ import annotations

import importlib
import numbers
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_gradmask._distributed import assert_same_on_all_ranks, check_strategy
from lightning_gradmask._namespaces import Callback
from lightning_gradmask.callbacks._constraints import constraints_for
from lightning_gradmask.noise import StdSchedule, draw_dtype, draw_noise_, make_schedule, noise_seeds
from lightning_gradmask.specs import REGEX_PREFIX, MaskSpecError, match_parameters

__all__ = ["GradientNoise", "WeightNoise"]

GRADIENT_STREAM = "gradient"
WEIGHT_STREAM = "weight"


class _SeededNoise(Callback):
    """What both noise callbacks share: a seed, targets, and the checkpoint state they need."""

    seed: int
    targets: Optional[list[str]]
    _draws: int
    _twin: int = 0
    _draw_buffers: dict[int, torch.Tensor]  # id(param) -> CPU draw buffer, reused across steps
    _generator: torch.Generator

    #: every live noise callback, to tell apart instances built with the same seed and targets
    _instances: "weakref.WeakSet[_SeededNoise]" = weakref.WeakSet()

    def _register(self) -> None:
        """Call at the end of ``__init__``: number this instance among live ones of the same configuration.

        Lightning refuses two stateful callbacks with the same ``state_key`` when the Trainer is built,
        with a RuntimeError that says nothing about noise. Twins (same type, seed and targets) get
        distinct keys, so that ``setup`` can refuse them with the documented ``ValueError`` instead.
        """
        twins = [other for other in _SeededNoise._instances if type(other) is type(self) and other._config() == self._config()]
        self._twin = max((other._twin for other in twins), default=-1) + 1
        _SeededNoise._instances.add(self)

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


class GradientNoise(_SeededNoise):
    r"""Add seeded Gaussian noise (and/or a fixed offset) to gradients, once per optimizer step.

    The noise is added in ``on_before_optimizer_step``: after all micro-batches of an accumulation
    window, after AMP unscaling (so ``std`` is in gradient units whatever the loss scale), before
    Lightning's gradient clipping. Right after, the masks of every ``GradientMask`` /
    ``SensitiveColumnBlinding`` on the module are re-applied, so frozen entries never receive noise,
    whatever the order of the callbacks.

    The noise of parameter ``i`` at optimizer step ``t`` (``trainer.global_step``, 0 for the first
    step) is ``std_t * noise_like(grad, seed, t, i)``: the same on every DDP rank (ranks keep
    identical parameters), the same in a run resumed from a checkpoint, the same on CPU and GPU.

    Args:
        std: constant standard deviation (``>= 0``), or a callable ``step -> std`` (Python only).
        eta: annealed schedule instead of ``std``: variance ``eta / (1 + t) ** gamma``, i.e.
            ``std_t = sqrt(eta / (1 + t) ** gamma)``.
        gamma: decay exponent of the annealed schedule (used only with ``eta``).
        targets: parameter names or ``re:`` patterns (one string or a list) that receive noise.
            Default: every parameter that has a gradient at that step.
        offset: ``{parameter name or re: pattern: tensor}`` added to that gradient at every step
            (a tensor or nested list of the parameter's shape, or a number for every entry).
        seed: the noise seed; the same seed gives the same noise.

    Give exactly one of ``std`` / ``eta``; or only ``offset``.

    Logs ``gradient_noise/std`` (the std used at the step) when ``std`` or ``eta`` is given.

    Example::

        GradientNoise(std=1e-3)                                   # constant
        GradientNoise(eta=0.3, gamma=0.55)                        # annealed
        GradientNoise(std=lambda step: 1e-2 if step < 1000 else 0.0, targets="re:net\\.0\\..*")
        GradientNoise(offset={"net.0.weight": torch.full((8, 6), 1e-4)})

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_gradmask.GradientNoise
              init_args:
                eta: 0.3
                gamma: 0.55
                targets: ["re:encoder\\..*"]
                seed: 7

    This is **not** differential privacy: there is no per-example clipping and no privacy
    accountant. Use Opacus for that.

    Raises (at construction or ``setup``, before any step; model untouched):
        NoiseStdError: a negative / non-finite ``std`` or ``eta``, a negative ``gamma``, a callable
            schedule that fails or returns NaN, inf or a negative number at step 0 (and later, at
            the step where it does, naming that step).
        MaskSpecError: ``targets`` or ``offset`` keys naming no parameter; an offset of the wrong shape.
        UnsupportedStrategyError: FSDP, DeepSpeed or another sharding strategy.
    """

    def __init__(
        self,
        std: Optional[Union[float, Callable[[int], float]]] = None,
        *,
        eta: Optional[float] = None,
        gamma: float = 0.55,
        targets: Optional[Union[str, Sequence[str]]] = None,
        offset: Optional[Mapping[str, Any]] = None,
        seed: int = 0,
    ) -> None:
        self.schedule: StdSchedule | None = make_schedule(
            std, eta=eta, gamma=gamma, owner="GradientNoise", required=offset is None
        )
        self.targets = _normalize_targets(targets, "GradientNoise")
        if offset is not None:
            if not isinstance(offset, Mapping) or not offset:
                raise MaskSpecError(
                    "GradientNoise(offset=...) must be a non-empty mapping from parameter names to tensors; "
                    f"got {offset!r}"
                )
            bad = [key for key in offset if not isinstance(key, str)]
            if bad:
                raise MaskSpecError(f"GradientNoise(offset=...) keys must be parameter names; got {bad[0]!r}")
        self.offset = offset
        self.seed = _check_seed(seed, "GradientNoise")
        self._targets: list[tuple[str, int]] = []  # (name, parameter index), resolved at setup
        self._offsets: dict[str, torch.Tensor] = {}  # CPU, resolved at setup
        self._live_targets: list[tuple[int, torch.Tensor]] = []
        self._live_offsets: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._draw_buffers: dict[int, torch.Tensor] = {}  # id(param) -> CPU draw buffer
        self._generator = torch.Generator(device="cpu")
        self._stepped: tuple[tuple[Any, ...], set[int]] | None = None
        self._last_std: float | None = None
        self._draws = 0
        self._register()

    # ------------------------------------------------------------------ public read-only state
    @property
    def last_std(self) -> float | None:
        """The std used at the most recent optimizer step (``None`` before the first, or offset only)."""
        return self._last_std

    @property
    def target_names(self) -> list[str]:
        """Names of the parameters that receive noise (after ``setup``)."""
        return [name for name, _ in self._targets]

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "GradientNoise")
        _refuse_same_seed(trainer, self)
        table = _ParameterTable(pl_module)
        names = table.select(self.targets, "GradientNoise(targets=...)") if self.targets is not None else table.names
        self._targets = [(name, table.index(name)) for name in names]
        self._offsets = _resolve_offsets(self.offset, table) if self.offset is not None else {}
        if self.schedule is not None:
            self.schedule(0)  # fail now, not at the first step
        shared = {"seed": _seed_tensor(self.seed), **{f"offset:{k}": v for k, v in self._offsets.items()}}
        assert_same_on_all_ranks(trainer, shared, "GradientNoise seed and offsets")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = _ParameterTable(pl_module)
        self._live_targets = [(index, table.param(name)) for name, index in self._targets]
        self._live_offsets = []
        for name, value in self._offsets.items():
            param = table.param(name)
            self._live_offsets.append((param, value.to(device=param.device, dtype=param.dtype)))

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        stepped = self._stepped_ids(optimizer)
        changed = False
        if self.schedule is not None:
            std = self.schedule(step)
            if std > 0:
                changed = self._add_noise(step, std, stepped)
            self._last_std = std
            pl_module.log("gradient_noise/std", std, on_step=True, on_epoch=False)
        for param, value in self._live_offsets:
            if param.grad is not None and id(param) in stepped:
                param.grad.add_(value)
                changed = True
        self._draws += 1
        if changed:
            # frozen entries (GradientMask, blinding) never receive noise, whatever the callback order;
            # with nothing added, the gradients are still masked from on_after_backward
            constraints_for(pl_module).frozen.mask_gradients_()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._live_targets = []
            self._live_offsets = []
            self._draw_buffers = {}
            self._stepped = None

    @torch.no_grad()
    def _add_noise(self, step: int, std: float, stepped: set[int]) -> bool:
        """``grad += std * noise_like(grad, seed, step, index)`` for every target, bit for bit, but with
        one generator, one hash prefix and grouped multiply/add kernels for all of them."""
        chosen = []
        for index, param in self._live_targets:
            grad = param.grad
            if grad is None or id(param) not in stepped:
                continue
            if grad.is_sparse:
                raise RuntimeError("GradientNoise does not support sparse gradients (nn.Embedding(sparse=True))")
            chosen.append((index, param, grad))
        if not chosen:
            return False
        noises = self._draw(step, [(index, param, grad) for index, param, grad in chosen], GRADIENT_STREAM)
        torch._foreach_mul_(noises, std)
        torch._foreach_add_([grad for _, _, grad in chosen], noises)
        return True

    def _stepped_ids(self, optimizer: torch.optim.Optimizer) -> set[int]:
        """Ids of ``optimizer``'s parameters, rebuilt only when its parameter groups change."""
        layout = (id(optimizer),) + tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
        if self._stepped is None or self._stepped[0] != layout:
            self._stepped = (layout, {id(p) for group in optimizer.param_groups for p in group["params"]})
        return self._stepped[1]

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")


class WeightNoise(_SeededNoise):
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
        self.targets = _normalize_targets(targets, "WeightNoise")
        self.seed = _check_seed(seed, "WeightNoise")
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
        _refuse_same_seed(trainer, self)
        table = _ParameterTable(pl_module)
        candidates = self._candidates(pl_module, table)
        if self.targets is not None:
            candidates = table.select(self.targets, "WeightNoise(targets=...)", among=candidates)
        self._chosen = [(name, table.index(name), table.aliases(name)) for name in candidates]
        self.schedule(0)
        assert_same_on_all_ranks(trainer, {"seed": _seed_tensor(self.seed)}, "WeightNoise seed")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = _ParameterTable(pl_module)
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
        frozen = constraints_for(pl_module).frozen
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

    def _candidates(self, pl_module: nn.Module, table: "_ParameterTable") -> list[str]:
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


# --------------------------------------------------------------------------- helpers


class _ParameterTable:
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


def _normalize_targets(targets: Any, owner: str) -> list[str] | None:
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


def _check_seed(seed: Any, owner: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{owner}(seed=...) must be an integer; got {type(seed).__name__} {seed!r}")
    return int(seed)


def _seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor(list(str(seed).encode()), dtype=torch.uint8)


def _refuse_same_seed(trainer: pl.Trainer, owner: Callback) -> None:
    for other in trainer.callbacks:  # type: ignore[attr-defined]  # Trainer sets callbacks at run time
        if other is not owner and type(other) is type(owner) and other.seed == owner.seed:  # type: ignore[attr-defined]
            raise ValueError(
                f"two {type(owner).__name__} callbacks use seed={owner.seed}: they would draw the same "  # type: ignore[attr-defined]
                "noise; give each its own seed (or merge them)"
            )


def _resolve_offsets(offset: Mapping[str, Any], table: _ParameterTable) -> dict[str, torch.Tensor]:
    where = "GradientNoise(offset=...)"
    resolved: dict[str, torch.Tensor] = {}
    for key, value in offset.items():
        for alias in match_parameters(key, table.all_names, parameter=where):
            name = table.canonical(table.param(alias))
            param = table.param(name)
            if name in resolved:
                raise MaskSpecError(f"{where}: parameter {name!r} is claimed by more than one key (last: {key!r})")
            resolved[name] = _offset_tensor(value, name, param, key, where)
    return resolved


def _offset_tensor(value: Any, name: str, param: torch.Tensor, key: str, where: str) -> torch.Tensor:
    label = f"{where} for parameter {name!r}" + (f" (key {key!r})" if key != name else "")
    if isinstance(value, bool):
        raise MaskSpecError(f"{label}: got a bool; expected a tensor, a nested list or a number")
    if isinstance(value, numbers.Real):
        tensor = torch.full(tuple(param.shape), float(value), dtype=torch.float64)
    elif isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise MaskSpecError(f"{label}: only dense tensors are supported")
        tensor = value.detach().to("cpu")
    elif isinstance(value, (list, tuple)):
        try:
            tensor = torch.tensor(value, dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise MaskSpecError(f"{label}: the list is not a rectangular array of numbers ({err})") from err
    else:
        raise MaskSpecError(f"{label}: got {type(value).__name__}; expected a tensor, a nested list or a number")
    if tuple(tensor.shape) != tuple(param.shape):
        raise MaskSpecError(f"{label}: offset shape {list(tensor.shape)} does not match parameter shape {list(param.shape)}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise MaskSpecError(f"{label}: the offset must hold real numbers; got dtype {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise MaskSpecError(f"{label}: the offset holds NaN or inf")
    return tensor.clone()


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
