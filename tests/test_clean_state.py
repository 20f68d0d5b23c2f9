"""After any fit, failed or not, the module is left as a run without the callbacks would leave it,
and nothing of a finished fit (optimizers, their state) stays referenced."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradmask.callbacks.gradient_mask import GradientMask
from lightning_gradmask.callbacks.gradient_noise import GradientNoise
from lightning_gradmask.callbacks.weight_noise import WeightNoise
from lightning_gradmask.functional.constraints import parameter_constraints
from lightning_gradmask.mixins.masked_l1 import MaskedL1Mixin

from utils import TinyRegressor, loader, snapshot, trainer


class Boom(RuntimeError):
    pass


class FailsAtStep(Callback):
    """Raises in the user's code path (a batch hook) at the given global step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise Boom("user code failed")


class GradProbe(Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


FIRST = {"net.0.weight": torch.zeros(8, 6, dtype=torch.bool)}  # every entry of net.0.weight frozen
SECOND = {"net.2.weight": torch.zeros(1, 8, dtype=torch.bool)}


@pytest.mark.parametrize("fail_at", [0, 2])  # before the first optimizer step, and mid-run
def test_a_failed_fit_leaves_no_masks_for_the_next_fit(fail_at: int) -> None:
    model = TinyRegressor()
    with pytest.raises(Boom):
        trainer(callbacks=[GradientMask(FIRST), WeightNoise(std=0.1), FailsAtStep(fail_at)]).fit(model, loader())
    constraints = parameter_constraints(model)
    assert constraints.trainable_masks() == {} and constraints._hooked == []
    assert model._state_dict_hooks == {} and model._forward_pre_hooks == {}

    # a second fit with another GradientMask: only its parameter is frozen, net.0.weight trains
    before = snapshot(model)
    trainer(callbacks=[GradientMask(SECOND)], max_epochs=1).fit(model, loader())
    after = snapshot(model)
    assert torch.equal(after["net.2.weight"], before["net.2.weight"])
    assert not torch.equal(after["net.0.weight"], before["net.0.weight"])

    # a third fit with GradientNoise alone: no gradient is zeroed any more
    probe = GradProbe()
    trainer(callbacks=[GradientNoise(std=1e-3), probe], max_epochs=1).fit(model, loader())
    assert all(grads["net.0.weight"].ne(0).all() and grads["net.2.weight"].ne(0).all() for grads in probe.grads)


def test_a_failed_fit_then_a_plain_fit_trains_like_a_model_that_never_had_the_callbacks() -> None:
    failed, fresh = TinyRegressor(), TinyRegressor()
    with pytest.raises(Boom):
        trainer(callbacks=[GradientMask(FIRST), GradientNoise(std=0.5), FailsAtStep(0)]).fit(failed, loader())
    trainer(max_epochs=1).fit(failed, loader())
    trainer(max_epochs=1).fit(fresh, loader())
    assert all(torch.equal(a, b) for a, b in zip(snapshot(failed).values(), snapshot(fresh).values()))


class ProximalRegressor(MaskedL1Mixin, TinyRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.register_masked_l1("net.0.weight", strength=1e-2, proximal=True)


class KeepOptimizer(Callback):
    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.refs.extend(weakref.ref(opt) for opt in trainer.optimizers)


def test_repeated_fits_with_a_proximal_term_do_not_keep_old_optimizers_alive() -> None:
    model = ProximalRegressor()
    keep = KeepOptimizer()
    for _ in range(3):
        trainer(callbacks=[keep, GradientMask(SECOND)], max_epochs=1).fit(model, loader())
    model.trainer = None  # the module's own reference to its last Trainer
    gc.collect()
    assert len(keep.refs) == 3
    assert [ref() is None for ref in keep.refs] == [True, True, True]
