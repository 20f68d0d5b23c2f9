"""One place per LightningModule where every gradmask callback's constraints meet.

Several callbacks freeze entries (``GradientMask``, ``SensitiveColumnBlinding``) and several act
after an optimizer step (the proximal L1 step). If each restored its own frozen entries from its
own snapshot, the result would depend on the order in which the user listed the callbacks. So
they all register with the module's `ParameterConstraints`, which:

* combines the trainable masks of all owners (an entry is trainable only if every owner agrees),
* captures the frozen values once, just before the first optimizer step (after every callback's
  ``on_train_start`` has run, so a severed weight is captured as 0),
* installs one step pre-hook and one step post-hook per optimizer, and in the post-hook runs the
  owners' post-step functions by priority and then restores the frozen entries, always last.

The defined order on a gradient, whatever the order of ``Trainer(callbacks=[...])``:

1. ``on_after_backward``: each mask owner zeroes its frozen gradients (every micro-batch);
2. ``on_before_optimizer_step``: noise is added and, where it changed a gradient, the combined
   masks are re-applied (each mask owner re-applies its own also when the LightningModule overrides
   ``on_after_backward``, which runs after every callback's); gradients that code outside gradmask
   writes after that are not masked again, but step 4 still restores the frozen values exactly;
3. Lightning clips the gradients; the optimizer steps;
4. step post-hook: post-step functions by priority (the proximal L1 step), then exact restore.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_gradmask.functional.frozen import FrozenEntries, combine_trainable
from lightning_gradmask.functional.optimizer_params import OptimizerParamIds

__all__ = ["ParameterConstraints", "parameter_constraints", "PRIORITY_PROXIMAL"]

PostStepFn = Callable[[torch.optim.Optimizer, set[int]], None]

PRIORITY_PROXIMAL = 10
"""Priority of the proximal L1 step among post-step functions (lower runs first)."""

_CONSTRAINTS: "weakref.WeakKeyDictionary[nn.Module, ParameterConstraints]" = weakref.WeakKeyDictionary()


def parameter_constraints(module: nn.Module) -> "ParameterConstraints":
    """The constraints of ``module`` (created on first use). One per module, in this process."""
    constraints = _CONSTRAINTS.get(module)
    if constraints is None:
        constraints = ParameterConstraints(module)
        _CONSTRAINTS[module] = constraints
    return constraints


class ParameterConstraints:
    """Combined frozen entries and post-step work of all gradmask owners of one module."""

    def __init__(self, module: nn.Module) -> None:
        self._module_ref = weakref.ref(module)
        self._masks: dict[Any, dict[str, torch.Tensor]] = {}
        # names whose frozen entries an owner keeps exact by other means (GradientMask(compact=True))
        self._held_elsewhere: dict[Any, set[str]] = {}
        self._post_step: dict[Any, tuple[int, PostStepFn]] = {}
        self._frozen: FrozenEntries | None = None
        # (weak reference to a hooked optimizer, its hook handles)
        self._hooked: list[tuple[weakref.ref[torch.optim.Optimizer], tuple[Any, ...]]] = []
        # ids of each optimizer's parameters, rebuilt only when its parameter groups change
        # (callbacks such as BackboneFinetuning add groups mid-run)
        self._stepped_ids = OptimizerParamIds()

    # ------------------------------------------------------------------ registration
    def set_masks(self, owner: Any, trainable: dict[str, torch.Tensor], *, held_elsewhere: set[str] | None = None) -> None:
        """Register (or replace) ``owner``'s trainable masks: ``{parameter name: bool tensor}``.

        ``held_elsewhere`` names parameters whose frozen entries ``owner`` keeps exact itself (the
        optimizer never sees them): they count in :meth:`trainable_masks` but get no gradient
        masking and no restore from :attr:`frozen`.
        """
        self._masks[owner] = dict(trainable)
        self._held_elsewhere[owner] = set(held_elsewhere or ())
        self._frozen = None

    def add_post_step(self, owner: Any, fn: PostStepFn, priority: int) -> None:
        """Run ``fn(optimizer, ids of its parameters)`` after each step, before the restore."""
        self._post_step[owner] = (priority, fn)

    def remove(self, owner: Any) -> None:
        """Forget ``owner``; once no owner is left, the optimizer hooks are removed."""
        changed = self._masks.pop(owner, None) is not None
        self._held_elsewhere.pop(owner, None)
        self._post_step.pop(owner, None)
        if changed:
            self._frozen = None
        if not self._masks and not self._post_step:
            self.detach()

    # ------------------------------------------------------------------ queries
    def trainable_masks(self) -> dict[str, torch.Tensor]:
        """Combined trainable masks, ``{name: bool tensor}``, for parameters any owner constrains."""
        by_name: dict[str, list[torch.Tensor]] = {}
        for masks in self._masks.values():
            for name, mask in masks.items():
                by_name.setdefault(name, []).append(mask)
        return {name: combine_trainable(masks) for name, masks in by_name.items()}

    def owners_of(self, name: str) -> list[Any]:
        """The owners whose masks constrain parameter ``name``."""
        return [owner for owner, masks in self._masks.items() if name in masks]

    @property
    def has_post_step(self) -> bool:
        """Whether some owner runs work after each optimizer step (the proximal L1 step)."""
        return bool(self._post_step)

    @property
    def frozen(self) -> FrozenEntries:
        """The combined :class:`FrozenEntries`, built on the parameters' current devices."""
        if self._frozen is None:
            module = self._module()
            params = dict(module.named_parameters(remove_duplicate=False))
            elsewhere = set().union(*self._held_elsewhere.values())
            self._frozen = FrozenEntries(
                {name: (params[name], mask) for name, mask in self.trainable_masks().items() if name not in elsewhere}
            )
        return self._frozen

    # ------------------------------------------------------------------ optimizer hooks
    def attach(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Install the step hooks on ``optimizers`` (raw torch optimizers); idempotent.

        Optimizers are held weakly: a finished fit's optimizers (and their state) are freed with
        their Trainer even while these constraints live on with the module.
        """
        self._forget_dead_optimizers()
        for optimizer in optimizers:
            if any(ref() is optimizer for ref, _ in self._hooked):
                continue
            handles = (
                optimizer.register_step_pre_hook(self._before_step),
                optimizer.register_step_post_hook(self._after_step),
            )
            self._hooked.append((weakref.ref(optimizer), handles))

    def detach(self) -> None:
        """Remove the step hooks and forget the captured values."""
        for _, handles in self._hooked:
            for handle in handles:
                handle.remove()
        self._hooked.clear()
        self._stepped_ids.clear()
        self._frozen = None

    def _forget_dead_optimizers(self) -> None:
        self._hooked = [(ref, handles) for ref, handles in self._hooked if ref() is not None]

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        frozen = self.frozen
        if not frozen.captured:
            frozen.capture_()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        ids = self._stepped_ids(optimizer)
        for _, fn in sorted(self._post_step.values(), key=lambda item: item[0]):
            fn(optimizer, ids)
        # torch's own optimizers never write a parameter without a gradient (one frozen whole, requires_grad
        # off in the step): with no post-step work, its copy-back can be left out
        untouched = not self._post_step and type(optimizer).__module__.startswith("torch.optim")
        self.frozen.restore_(ids, skip_gradless_whole=untouched)

    def _module(self) -> nn.Module:
        module = self._module_ref()
        if module is None:  # pragma: no cover - the constraints live only as long as its module
            raise RuntimeError("the module of these constraints no longer exists")
        return module
