r"""``MaskedL1Mixin``: L1 penalties on chosen entries ("edges") of chosen parameters.

The tensor math lives in :mod:`lightning_gradmask.functional.l1`; this module is the Lightning
glue: it resolves registrations against the module's parameters, wraps the subclass's
``training_step`` so that the penalty joins the loss it returns, and hands the proximal step to
the module's constraints (:mod:`lightning_gradmask.functional.constraints`), which runs it
after every optimizer step and before frozen entries are restored.
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_gradmask._distributed import check_strategy
from lightning_gradmask._namespaces import lightning_classes
from lightning_gradmask.errors import GradmaskConfigTypeError, MaskSpecError
from lightning_gradmask.functional.constraints import PRIORITY_PROXIMAL, parameter_constraints
from lightning_gradmask.functional.l1 import (
    check_strength,
    mask_support,
    masked_l1_penalty,
    masked_zero_fraction,
    proximal_l1_step_,
)
from lightning_gradmask.functional.masks import MaskValue, mask_from_value
from lightning_gradmask.functional.selection import ParamSelector, select_parameters
from lightning_gradmask.functional.sharding import is_sharded, placement_key, shard_like

__all__ = ["MaskedL1Mixin", "MaskedL1Term"]

_WRAPPED = "__masked_l1_wrapped__"


@dataclass(frozen=True, eq=False)
class MaskedL1Term:
    """One resolved L1 term: ``strength * sum(|mask * W|)`` on the parameter ``name``.

    Attributes:
        params: the selector given to :meth:`MaskedL1Mixin.register_masked_l1`.
        name: the parameter's name in ``named_parameters()``.
        mask: a CPU ``bool`` tensor or float32 per-entry weights; ``None`` means every entry.
        strength: the term's strength, ``>= 0``.
        proximal: applied as soft-thresholding after each optimizer step instead of in the loss.

    Terms compare by identity (their masks are tensors).
    """

    params: ParamSelector
    name: str
    mask: Optional[torch.Tensor]
    strength: float
    proximal: bool


class _State:
    """What the mixin keeps on a module: the terms, and per-device copies of their masks.

    Pickling and ``copy.deepcopy`` keep only the terms: the device copies, the re-entry depth and
    the hook function (which refers to the original module) are rebuilt on the copy.
    """

    def __init__(self) -> None:
        self.terms: list[MaskedL1Term] = []
        # union of the proximal masks of each parameter (CPU bool; None = every entry)
        self.supports: dict[str, Optional[torch.Tensor]] = {}
        self._reset_transient()

    def _reset_transient(self) -> None:
        self.depth = 0
        self._on_device: dict[tuple[Any, ...], Optional[torch.Tensor]] = {}
        self._post_step: Optional[Callable[[torch.optim.Optimizer, set[int]], None]] = None
        # (optimizer layout, {id(param): group}); holds the groups, which the optimizer owns anyway
        self._groups: Optional[tuple[tuple[Any, ...], dict[int, dict[str, Any]]]] = None

    def __getstate__(self) -> dict[str, Any]:
        return {"terms": self.terms, "supports": self.supports}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.terms = state["terms"]
        self.supports = state["supports"]
        self._reset_transient()

    # ------------------------------------------------------------------ registration
    def add(self, terms: list[MaskedL1Term]) -> None:
        self.terms.extend(terms)
        for term in terms:
            if not term.proximal:
                continue
            support = None if term.mask is None else mask_support(term.mask)
            if term.name in self.supports:
                previous = self.supports[term.name]
                support = None if previous is None or support is None else previous.logical_or(support)
            self.supports[term.name] = support
        self._on_device.clear()

    @property
    def has_loss_terms(self) -> bool:
        return any(not term.proximal for term in self.terms)

    # ------------------------------------------------------------------ device copies
    def mask_on(self, index: int, param: torch.Tensor) -> Optional[torch.Tensor]:
        """Term ``index``'s mask for ``param`` as it is now: on its device, or for a sharded (FSDP2)
        parameter a ``DTensor`` placed like it, holding only the local shard (made once per placement)."""
        return self._placed(("term", index), self.terms[index].mask, param)

    def support_on(self, name: str, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The union of ``name``'s proximal masks for ``param``, placed as :meth:`mask_on` places them."""
        return self._placed(("support", name), self.supports[name], param)

    def _placed(self, what: tuple[Any, ...], mask: Optional[torch.Tensor], param: torch.Tensor) -> Optional[torch.Tensor]:
        # the root module of FSDP2 holds its parameters unsharded (plain) from forward to backward, and
        # sharded otherwise: both forms may be asked for in one step
        key = (*what, placement_key(param))
        if key not in self._on_device:
            self._on_device[key] = None if mask is None else shard_like(mask, like=param) if is_sharded(param) else mask.to(param.device)
        return self._on_device[key]

    def groups_of(self, optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
        """``{id(param): its parameter group}``, rebuilt only when the optimizer's groups change."""
        layout = (id(optimizer),) + tuple((id(g), id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
        cached = self._groups
        if cached is not None and cached[0] == layout:
            return cached[1]
        group_of = {id(param): group for group in optimizer.param_groups for param in group["params"]}
        self._groups = (layout, group_of)
        return group_of

    def post_step(self, module: nn.Module) -> Callable[[torch.optim.Optimizer, set[int]], None]:
        """The post-step function of the constraints; it holds the module weakly (the constraints are keyed by it)."""
        if self._post_step is None:
            module_ref = weakref.ref(module)

            def proximal_step(optimizer: torch.optim.Optimizer, param_ids: set[int]) -> None:
                owner = module_ref()
                if owner is not None:
                    owner._masked_l1_proximal_step(optimizer)  # type: ignore[operator]  # the owner is a MaskedL1Mixin module

            self._post_step = proximal_step
        return self._post_step


class MaskedL1Mixin:
    r"""Mix into a ``LightningModule`` to put L1 penalties on chosen entries of chosen parameters.

    Register terms with :meth:`register_masked_l1`, in ``__init__`` once the layers exist (or in
    ``configure_model``). The subclass's ``training_step`` stays as written: the mixin wraps it and

    * adds the non-proximal terms, ``sum_i strength_i * sum(|mask_i * W_i|)``, to the loss it
      returns (a tensor, or the ``"loss"`` of a dict; ``None`` is left alone), so that under
      gradient accumulation the penalty is scaled like the loss;
    * logs ``masked_l1/penalty`` (those terms' value) and, with proximal terms,
      ``masked_l1/zero_fraction`` (the share of their entries that are exactly 0), on every step;
    * with ``proximal=True`` terms, applies the soft-thresholding step
      ``W <- sign(W) * max(|W| - lr * strength * |mask|, 0)`` after every optimizer step, before
      :class:`~lightning_gradmask.GradientMask` restores its frozen entries (so they stay frozen).

    Under manual optimization (``automatic_optimization = False``) the returned value is not
    changed: add :meth:`masked_l1_penalty` to the loss you backpropagate yourself. Proximal terms
    work there too.

    Registrations are plain attributes, not buffers: the model's ``state_dict`` keys do not change,
    and a resumed run rebuilds them in ``__init__``.

    Under ``ModelParallelStrategy`` (FSDP2) the masks stay whole (global shape); each term is the
    global penalty, the same on every process, and the proximal step works on each process's shard.

    Example::

        import lightning as L
        import torch.nn.functional as F
        from torch import nn
        from lightning_gradmask import MaskedL1Mixin

        class Model(MaskedL1Mixin, L.LightningModule):
            def __init__(self, edges):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
                self.register_masked_l1("net.0.weight", mask=edges, strength=1e-3)
                self.register_masked_l1("re:net\\.2\\..*", strength=1e-4)  # every entry
                self.register_masked_l1("net.0.bias", strength=1e-2, proximal=True)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.mse_loss(self.net(x), y)  # the masked L1 terms are added to this
    """

    # ------------------------------------------------------------------ wrapping training_step
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = getattr(cls, "training_step", None)
        if not isinstance(step, types.FunctionType) or getattr(step, _WRAPPED, False):
            return
        if any(step is getattr(base, "training_step", None) for base in lightning_classes("", "LightningModule")):
            return  # the default, which only warns; wrapping it would make Lightning think it is overridden
        setattr(cls, "training_step", _wrap_training_step(step))

    # ------------------------------------------------------------------ public API
    def register_masked_l1(
        self,
        params: ParamSelector,
        mask: Optional[MaskValue] = None,
        *,
        strength: float,
        proximal: bool = False,
    ) -> list[str]:
        r"""Add an L1 term on the parameters ``params`` selects, restricted to ``mask``'s entries.

        Args:
            params: which parameters: a name as in ``named_parameters()``, ``"re:"`` + a regular
                expression that must match whole names, an ``nn.Module`` subclass, or a list of them
                (see :mod:`lightning_gradmask.functional.selection`).
            mask: which entries, in any form :class:`~lightning_gradmask.GradientMask` accepts
                (dense ``bool`` or 0/1 tensor, sparse COO tensor, list of coordinates, ``bool``,
                callable ``(name, param) -> mask``), or real per-entry weights (the term is then
                ``strength * sum(|mask * W|)``). ``None`` (default): every entry.
            strength: the term's strength, a finite number ``>= 0``.
            proximal: apply the term as soft-thresholding after each optimizer step (entries reach
                exact zeros) instead of adding it to the loss.

        Returns:
            The names of the parameters the term was put on (a parameter shared under several
            names counts once).

        Raises:
            MaskSpecError: an unknown name, a regex matching nothing, a mask of the wrong shape,
                a mask holding NaN or inf, out-of-range coordinates; the message names ``params``.
            ValueError: a negative, NaN or infinite ``strength``.
            RuntimeError: called before ``super().__init__()``.

        Nothing is registered when it raises. Calling it several times adds terms; terms on the
        same parameter add up.
        """
        where = f"register_masked_l1({params!r})"
        if not isinstance(self, nn.Module) or "_parameters" not in self.__dict__:
            raise RuntimeError(f"{where}: call it on a module, after super().__init__() and after creating the layers")
        value = check_strength(strength, where)
        if not isinstance(proximal, bool):
            raise GradmaskConfigTypeError(f"{where}: proximal must be True or False; got {proximal!r}")
        names = select_parameters(self, params, parameter="register_masked_l1 params")
        named = dict(self.named_parameters(remove_duplicate=False))
        terms: list[MaskedL1Term] = []
        seen: set[int] = set()
        for name in names:
            param = named[name]
            if id(param) in seen:
                continue
            seen.add(id(param))
            resolved = None
            if mask is not None:
                try:
                    resolved = mask_from_value(mask, name, param, allow_real=True)
                except MaskSpecError as err:
                    raise MaskSpecError(f"{where}: {err}") from err
                if resolved.dtype == torch.bool and bool(resolved.all()):
                    resolved = None
            terms.append(MaskedL1Term(params=params, name=name, mask=resolved, strength=value, proximal=proximal))
        _state_of(self).add(terms)
        return [term.name for term in terms]

    @property
    def masked_l1_terms(self) -> tuple[MaskedL1Term, ...]:
        """The registered terms, one per (registration, parameter), in registration order."""
        return tuple(_state_of(self).terms)

    def masked_l1_penalty(self) -> torch.Tensor:
        """The current value of the non-proximal terms, ``sum_i strength_i * sum(|mask_i * W_i|)``.

        Differentiable in the parameters. Under manual optimization, add it to your loss::

            loss = F.mse_loss(self.net(x), y) + self.masked_l1_penalty()
            self.manual_backward(loss)

        Returns a 0-dim tensor (0 on the parameters' device when there are no such terms).
        """
        state = _state_of(self)
        params, masks, strengths = [], [], []
        for index, term in enumerate(state.terms):
            if term.proximal:
                continue
            param = self.get_parameter(term.name)  # type: ignore[attr-defined]  # the mixin is always mixed into a LightningModule
            params.append(param)
            masks.append(state.mask_on(index, param))
            strengths.append(term.strength)
        if not params:
            first = next(self.parameters(), None)  # type: ignore[attr-defined]  # the mixin is always mixed into a LightningModule
            return torch.zeros((), device=None if first is None else first.device)
        return masked_l1_penalty(params, masks, strengths)

    # ------------------------------------------------------------------ glue (private)
    def _masked_l1_prepare(self) -> None:
        """Before the user's step: check the strategy and hook the proximal step into the optimizers.

        Runs at every training_step (all of it is idempotent and cheap), so a new Trainer, a resumed
        run, a pickled (``ddp_spawn``) or deep-copied module is always hooked.
        """
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return
        check_strategy(trainer, "MaskedL1Mixin", sharded=True)
        state = _state_of(self)
        if state.supports:
            constraints = parameter_constraints(self)  # type: ignore[arg-type]  # the mixin is always mixed into a LightningModule
            constraints.add_post_step(state, state.post_step(self), PRIORITY_PROXIMAL)  # type: ignore[arg-type]  # the mixin is always mixed into a LightningModule
            constraints.attach(trainer.optimizers)

    def _masked_l1_finish(self, output: Any) -> Any:
        """After the user's step: add the penalty to the returned loss and log."""
        state = _state_of(self)
        logging = getattr(self, "_trainer", None) is not None
        if state.has_loss_terms:
            has_loss = isinstance(output, torch.Tensor) or (
                isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor)
            )
            if has_loss and getattr(self, "automatic_optimization", True):
                penalty = self.masked_l1_penalty()
                if isinstance(output, torch.Tensor):
                    output = output + penalty
                else:
                    output = {**output, "loss": output["loss"] + penalty}
            elif logging:
                with torch.no_grad():
                    penalty = self.masked_l1_penalty()
            if logging:
                self.log("masked_l1/penalty", penalty.detach(), on_step=True, on_epoch=False)  # type: ignore[attr-defined]  # the mixin is always mixed into a LightningModule
        if logging and state.supports:
            params = [self.get_parameter(name) for name in state.supports]  # type: ignore[attr-defined]  # the mixin is always mixed into a LightningModule
            supports = [state.support_on(name, param) for name, param in zip(state.supports, params)]
            self.log("masked_l1/zero_fraction", masked_zero_fraction(params, supports), on_step=True, on_epoch=False)  # type: ignore[attr-defined]  # the mixin is always mixed into a LightningModule
        return output

    @torch.no_grad()
    def _masked_l1_proximal_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Soft-threshold the proximal terms' entries of the parameters ``optimizer`` just stepped.

        A parameter the optimizer skipped (its ``grad`` is ``None``) is skipped here too.
        """
        state = _state_of(self)
        group_of = state.groups_of(optimizer)
        for index, term in enumerate(state.terms):
            if not term.proximal or term.strength == 0:
                continue
            param = self.get_parameter(term.name)  # type: ignore[attr-defined]  # the mixin is always mixed into a LightningModule
            group = group_of.get(id(param))
            if group is None or param.grad is None:
                continue
            if "lr" not in group:
                raise RuntimeError(
                    f"MaskedL1Mixin: the proximal term on {term.name!r} needs a learning rate, but the "
                    f"{type(optimizer).__name__} parameter group holding it has no 'lr'"
                )
            proximal_l1_step_(param, state.mask_on(index, param), float(group["lr"]) * term.strength)


def _state_of(module: Any) -> _State:
    state = module.__dict__.get("_masked_l1")
    if state is None:
        state = _State()
        module.__dict__["_masked_l1"] = state
    return state


def _wrap_training_step(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def training_step(self: MaskedL1Mixin, *args: Any, **kwargs: Any) -> Any:
        state = _state_of(self)
        if state.depth or not state.terms:  # nothing registered, or a super().training_step() call
            return step(self, *args, **kwargs)
        state.depth += 1
        try:
            self._masked_l1_prepare()
            output = step(self, *args, **kwargs)
        finally:
            state.depth -= 1
        return self._masked_l1_finish(output)

    setattr(training_step, _WRAPPED, True)
    return training_step
