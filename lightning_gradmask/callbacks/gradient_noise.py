"""``GradientNoise``: seeded Gaussian noise (and/or a fixed offset) added to gradients, identical on every rank."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_gradmask._distributed import assert_same_on_all_ranks
from lightning_gradmask.callbacks._seeded_noise import (
    GRADIENT_STREAM,
    SeededNoise,
    check_seed,
    seed_tensor,
)
from lightning_gradmask.errors import MaskSpecError
from lightning_gradmask.functional.constraints import parameter_constraints
from lightning_gradmask.functional.noise import StdSchedule, make_schedule
from lightning_gradmask.functional.optimizer_params import OptimizerParamIds
from lightning_gradmask.functional.selection import ParameterTable, ParamSelector, match_parameters, normalize_selector
from lightning_gradmask.functional.sharding import local_part, local_tensor

__all__ = ["GradientNoise"]


class GradientNoise(SeededNoise):
    r"""Add seeded Gaussian noise (and/or a fixed offset) to gradients, once per optimizer step.

    The noise is added in ``on_before_optimizer_step``: after all micro-batches of an accumulation
    window, after AMP unscaling (so ``std`` is in gradient units whatever the loss scale), before
    Lightning's gradient clipping. Right after, the masks of every ``GradientMask`` /
    ``SensitiveColumnBlinding`` on the module are re-applied, so frozen entries never receive noise,
    whatever the order of the callbacks.

    The noise at optimizer step ``t`` (``trainer.global_step``, 0 for the first step) is
    ``std_t * noise_for(targets, seed, t, stream="gradient")`` for the list of target parameters
    (:attr:`target_names`, in parameter order): the same on every DDP rank (ranks keep identical
    parameters), the same in a run resumed from a checkpoint, the same on CPU and GPU; under
    ``ModelParallelStrategy`` (FSDP2) each process adds its shard's part of that same noise, so the
    run adds what the DDP run adds.

    Args:
        std: constant standard deviation (``>= 0``), or a callable ``step -> std`` (Python only).
        eta: annealed schedule instead of ``std``: variance ``eta / (1 + t) ** gamma``, i.e.
            ``std_t = sqrt(eta / (1 + t) ** gamma)``.
        gamma: decay exponent of the annealed schedule (used only with ``eta``).
        params: which parameters receive noise: names, ``re:`` patterns or ``nn.Module`` subclasses,
            one or a list (see :mod:`lightning_gradmask.functional.selection`). Default: every
            parameter that has a gradient at that step.
        offset: ``{parameter name or re: pattern: tensor}`` added to that gradient at every step
            (a tensor or nested list of the parameter's shape, or a number for every entry).
        seed: the noise seed; the same seed gives the same noise.

    Give exactly one of ``std`` / ``eta``; or only ``offset``.

    Logs ``gradient_noise/std`` (the std used at the step) when ``std`` or ``eta`` is given.

    Example::

        GradientNoise(std=1e-3)                                   # constant
        GradientNoise(eta=0.3, gamma=0.55)                        # annealed
        GradientNoise(std=lambda step: 1e-2 if step < 1000 else 0.0, params="re:net\\.0\\..*")
        GradientNoise(offset={"net.0.weight": torch.full((8, 6), 1e-4)})

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_gradmask.GradientNoise
              init_args:
                eta: 0.3
                gamma: 0.55
                params: ["re:encoder\\..*"]
                seed: 7

    This is **not** differential privacy: there is no per-example clipping and no privacy
    accountant. Use Opacus for that.

    Raises (at construction, ``setup`` or ``on_fit_start``, which runs after ``configure_model``;
    before any step; model untouched):
        NoiseStdError: a negative / non-finite ``std`` or ``eta``, a negative ``gamma``, a callable
            schedule that fails or returns NaN, inf or a negative number at step 0 (and later, at
            the step where it does, naming that step).
        MaskSpecError: ``params`` or ``offset`` keys naming no parameter; an offset of the wrong shape.
        UnsupportedStrategyError: FSDP1 (``FSDPStrategy``), DeepSpeed or another strategy that is not
            single-device, DDP or ``ModelParallelStrategy``.
    """

    def __init__(
        self,
        std: Optional[Union[float, Callable[[int], float]]] = None,
        *,
        eta: Optional[float] = None,
        gamma: float = 0.55,
        params: Optional[ParamSelector] = None,
        offset: Optional[Mapping[str, Any]] = None,
        seed: int = 0,
    ) -> None:
        self.schedule: StdSchedule | None = make_schedule(
            std, eta=eta, gamma=gamma, owner="GradientNoise", required=offset is None
        )
        self.params = None if params is None else normalize_selector(params, parameter="GradientNoise(params=...)")
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
        self.seed = check_seed(seed, "GradientNoise")
        self._targets: list[str] = []  # names in parameter order, resolved at on_fit_start
        self._offsets: dict[str, torch.Tensor] = {}  # CPU, resolved at on_fit_start
        self._live_targets: list[torch.Tensor] = []
        self._live_offsets: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, its local part of the offset)
        self._stepped_ids = OptimizerParamIds()
        self._last_std: float | None = None
        self._register()

    # ------------------------------------------------------------------ public read-only state
    @property
    def last_std(self) -> float | None:
        """The std used at the most recent optimizer step (``None`` before the first, or offset only)."""
        return self._last_std

    @property
    def target_names(self) -> list[str]:
        """Names of the parameters that receive noise (after ``setup``)."""
        return list(self._targets)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after configure_model (layers built there exist now) and before any step
        table = ParameterTable(pl_module)
        names = table.select(self.params, "GradientNoise(params=...)") if self.params is not None else table.names
        self._targets = list(names)
        self._offsets = _resolve_offsets(self.offset, table) if self.offset is not None else {}
        if self.schedule is not None:
            self.schedule(0)  # fail now, not at the first step
        shared = {"seed": seed_tensor(self.seed), **{f"offset:{k}": v for k, v in self._offsets.items()}}
        assert_same_on_all_ranks(trainer, shared, "GradientNoise seed and offsets")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = ParameterTable(pl_module)
        self._live_targets = [table.param(name) for name in self._targets]
        self._lay_out(self._live_targets)
        self._live_offsets = []
        for name, value in self._offsets.items():
            param = table.param(name)
            local = local_tensor(param)
            self._live_offsets.append((param, local_part(value, like=param).to(device=local.device, dtype=local.dtype)))

    @override
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
                local_tensor(param.grad).add_(value)
                changed = True
        if changed:
            # frozen entries (GradientMask, blinding) never receive noise, whatever the callback order;
            # with nothing added, the gradients are still masked from on_after_backward
            parameter_constraints(pl_module).frozen.mask_gradients_()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._live_targets = []
            self._live_offsets = []
            self._layout = None
            self._stepped_ids.clear()

    @torch.no_grad()
    def _add_noise(self, step: int, std: float, stepped: set[int]) -> bool:
        """``grad += std * noise`` for every target with a gradient that ``optimizer`` steps: one draw for
        all targets (also those without a gradient now, so that each target's noise never depends on
        the others'), one grouped add."""
        grads, noises = [], []
        drawn: list[torch.Tensor] | None = None
        for k, param in enumerate(self._live_targets):
            grad = param.grad
            if grad is None or id(param) not in stepped:
                continue
            if grad.is_sparse:
                raise RuntimeError("GradientNoise does not support sparse gradients (nn.Embedding(sparse=True))")
            if drawn is None:
                drawn = self._draw(step, std, GRADIENT_STREAM)
            grads.append(local_tensor(grad))
            noises.append(drawn[k])
        if not grads:
            return False
        torch._foreach_add_(grads, noises)
        return True

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")


def _resolve_offsets(offset: Mapping[str, Any], table: ParameterTable) -> dict[str, torch.Tensor]:
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
