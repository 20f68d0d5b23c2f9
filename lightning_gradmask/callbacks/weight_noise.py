"""``WeightNoise``: train at seeded, randomly perturbed weights; the clean weights are what is updated and saved."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_gradmask._distributed import assert_same_on_all_ranks
from lightning_gradmask.callbacks._seeded_noise import (
    WEIGHT_STREAM,
    SeededNoise,
    check_seed,
    seed_tensor,
)
from lightning_gradmask.errors import GradmaskConfigError, GradmaskConfigTypeError, MaskSpecError
from lightning_gradmask.functional.constraints import parameter_constraints
from lightning_gradmask.functional.noise import StdSchedule, make_schedule
from lightning_gradmask.functional.selection import ParameterTable, ParamSelector, normalize_selector
from lightning_gradmask.functional.sharding import is_sharded, local_tensor

__all__ = ["WeightNoise"]


class WeightNoise(SeededNoise):
    r"""Train at randomly perturbed weights: the gradient is taken at ``w + n``, applied to ``w``.

    For each optimizer step, before the forward pass of the first micro-batch of the accumulation
    window (``on_train_batch_start``), the chosen weights are saved and perturbed by Gaussian noise
    ``n`` (one draw for all micro-batches of the window). Before the optimizer step
    (``on_before_optimizer_step``) the saved clean values are copied back, exactly (``w + n - n``
    is not ``w`` in floating point), so the optimizer updates the clean weights with the gradient
    taken at the perturbed point. With a learning rate of 0 the weights end bit-identical.

    The noise at optimizer step ``t`` is ``std_t * noise_for(targets, seed, t, stream="weight")``
    for the list of chosen parameters (:attr:`target_names`, in parameter order), times ``|w|`` per
    entry with ``relative=True``: identical on every DDP rank and after resume; under
    ``ModelParallelStrategy`` (FSDP2) each process perturbs its shard by its part of that same noise.
    Frozen entries of ``GradientMask`` and severed weights of ``SensitiveColumnBlinding`` are never
    perturbed (severed weights stay exactly 0). Parameters with ``requires_grad=False`` are skipped.

    Clean weights are what the rest of the world sees: validation (also mid-epoch), test,
    prediction, every checkpoint (also ``save_weights_only`` and a ``save_checkpoint`` called
    mid-window), and the model after ``fit`` ends or raises.

    Args:
        std: noise std (``>= 0``), or a callable ``step -> std`` (Python only).
        params: which parameters are perturbed: names, ``re:`` patterns or ``nn.Module``
            subclasses (every parameter those modules own, biases included), one or a list (see
            :mod:`lightning_gradmask.functional.selection`). Default ``None``: the ``weight`` of
            every ``nn.Linear`` (biases and other layers untouched).
        relative: scale the noise of each entry by its magnitude: per-entry std ``std * |w|``.
        seed: the noise seed; the same seed gives the same noise.

    Logs ``weight_noise/std`` (the std of the current draw).

    Example::

        WeightNoise(std=1e-2, relative=True)                      # the weights of every nn.Linear
        WeightNoise(std=1e-3, params=[nn.Conv2d, "re:head\\..*"])   # Conv2d weights and biases, the head

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_gradmask.WeightNoise
              init_args:
                std: 0.01
                params: ["re:.*\\.weight"]
                relative: true

    Under manual optimization the weights are perturbed from the start of a batch until the first
    optimizer step (with one ``step()`` per batch this is the same as above). This is not
    differential privacy.

    Raises (at construction, ``setup`` or ``on_fit_start``, which runs after ``configure_model``;
    before any step; model untouched):
        NoiseStdError: a negative or non-finite ``std``, a callable returning one (at step 0 at
            setup, later at the step where it does, naming it).
        MaskSpecError: ``params`` naming no parameter, a module type the model does not contain, no
            ``nn.Linear`` for the default.
        GradmaskConfigError: a selected parameter that is not floating point.
        UnsupportedStrategyError: FSDP1 (``FSDPStrategy``), DeepSpeed or another strategy that is not
            single-device, DDP or ``ModelParallelStrategy``.
    """

    def __init__(
        self,
        std: Union[float, Callable[[int], float]],
        *,
        params: Optional[ParamSelector] = None,
        relative: bool = False,
        seed: int = 0,
    ) -> None:
        self.schedule: StdSchedule = make_schedule(std, owner="WeightNoise")  # type: ignore[assignment]
        if not isinstance(relative, bool):
            raise GradmaskConfigTypeError(f"WeightNoise(relative=...) must be True or False; got {relative!r}")
        self.relative = relative
        self.params = None if params is None else normalize_selector(params, parameter="WeightNoise(params=...)")
        self.seed = check_seed(seed, "WeightNoise")
        self._chosen: list[tuple[str, int, tuple[str, ...]]] = []  # (name, index, alias names)
        self._live: list[tuple[str, int, tuple[str, ...], torch.Tensor]] = []
        self._clean: dict[str, torch.Tensor] = {}
        self._perturbed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, clean copy of its local data)
        self._hook: Any = None
        self._last_std: float | None = None
        self._register()

    # ------------------------------------------------------------------ public read-only state
    @property
    def target_names(self) -> list[str]:
        """Names of the parameters that are perturbed (once ``fit`` has started)."""
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
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after configure_model (layers built there exist now) and before any step
        table = ParameterTable(pl_module)
        names = _linear_weights(table) if self.params is None else table.select(self.params, "WeightNoise(params=...)")
        for name in names:
            if not table.param(name).is_floating_point():
                raise GradmaskConfigError(f"WeightNoise: parameter {name!r} is not floating point")
        self._chosen = [(name, table.index(name), table.aliases(name)) for name in names]
        self.schedule(0)
        assert_same_on_all_ranks(trainer, {"seed": seed_tensor(self.seed)}, "WeightNoise seed")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = ParameterTable(pl_module)
        self._live = [(name, index, aliases, table.param(name)) for name, index, aliases in self._chosen]
        self._lay_out([param for _, _, _, param in self._live])
        self._clean = {}
        if self._hook is None:
            owner = weakref.ref(pl_module)

            def clean_state_dict(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
                if module is owner():  # not a deep copy of the module (SWA, EMA) that inherited the hook
                    self._clean_state_dict(module, state, prefix, local_metadata)

            self._hook = pl_module.register_state_dict_post_hook(clean_state_dict)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._perturbed or not self._live:
            return  # a later micro-batch of the window: keep the window's draw
        step = trainer.global_step
        std = self.schedule(step)
        self._last_std = std
        pl_module.log("weight_noise/std", std, on_step=True, on_epoch=False)
        if std > 0:
            self._perturb(pl_module, step, std)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._restore()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls on_exception, not teardown, after a failed fit: leave the module as it was
        self.teardown(trainer, pl_module, "fit")

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # the state_dict hook already wrote clean values; this also covers a state_dict built elsewhere
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            self._clean_state_dict(pl_module, state, "", {})

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
        if stage != "fit":
            return
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._live = []
        self._clean = {}
        self._layout = None

    # ------------------------------------------------------------------ the mechanism
    @torch.no_grad()
    def _perturb(self, pl_module: pl.LightningModule, step: int, std: float) -> None:
        # one draw for every target (also those with requires_grad off now, so that each target's noise
        # never depends on the others'), grouped copies, multiplications and adds on the local data
        frozen = parameter_constraints(pl_module).frozen
        chosen = [k for k, (_, _, _, param) in enumerate(self._live) if param.requires_grad]
        if not chosen:
            return
        drawn = self._draw(step, std, WEIGHT_STREAM)
        noises = [drawn[k] for k in chosen]
        datas, cleans = [], []
        for k in chosen:
            name, _, _, param = self._live[k]
            data = local_tensor(param).detach()
            clean = self._clean.get(name)
            if clean is None or clean.shape != data.shape or clean.dtype != data.dtype or clean.device != data.device:
                clean = torch.empty_like(data, memory_format=torch.preserve_format)
                self._clean[name] = clean
            datas.append(data)
            cleans.append(clean)
        torch._foreach_copy_(cleans, datas)
        if self.relative:
            torch._foreach_mul_(noises, torch._foreach_abs(cleans))
        masked = set(frozen.names)  # only parameters with frozen entries need a call
        if masked:
            for k, noise in zip(chosen, noises):
                for alias in self._live[k][2]:
                    if alias in masked:
                        frozen.zero_frozen_in_(alias, noise)
        self._perturbed.extend((self._live[k][3], clean) for k, clean in zip(chosen, cleans))
        torch._foreach_add_(datas, noises)

    @torch.no_grad()
    def _restore(self) -> None:
        if self._perturbed:
            torch._foreach_copy_(
                [local_tensor(param).detach() for param, _ in self._perturbed], [clean for _, clean in self._perturbed]
            )
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
                    state[key] = _clean_value(clean, param, value)


def _clean_value(clean: torch.Tensor, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The state-dict entry for ``param`` from ``clean`` (a copy of its local data), shaped like ``value``."""
    if not is_sharded(param):
        return clean.clone()
    from torch.distributed.tensor import DTensor

    whole = DTensor.from_local(
        clean.clone(), param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()  # type: ignore[attr-defined]
    )
    # a sharded state dict holds DTensors; a full one (gathered on every process, in the same order) whole tensors
    return whole if is_sharded(value) else whole.full_tensor().to(value.device)


def _linear_weights(table: ParameterTable) -> list[str]:
    """The default selection: the ``weight`` of every ``nn.Linear``, in parameter order."""
    weights = {id(m.weight) for m in table.module.modules() if isinstance(m, nn.Linear)}
    if not weights:
        present = sorted({type(m).__name__ for m in table.module.modules() if m is not table.module})
        raise MaskSpecError(
            "WeightNoise(params=None) perturbs the weight of every nn.Linear, and the model has none "
            f"(its modules are: {', '.join(present) or 'none'}); choose the parameters with params=..."
        )
    return [name for name in table.names if id(table.param(name)) in weights]
