"""A parameter frozen whole (spec ``False``) skips autograd and the optimizer inside the training step."""

import pytest
import torch
import torch.nn.functional as F
from test_gradient_mask import SPEC

from lightning_gradmask import GradientMask, HessianMonitor
from lightning_gradmask.callbacks import gradient_mask

from utils import TinyRegressor, loader, snapshot, trainer


class Watch(TinyRegressor):
    """Records net.2.bias.requires_grad inside training_step and in the hooks around it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inside, self.outside, self.grad_none = [], [], []

    def training_step(self, batch, batch_idx):
        self.inside.append(self.net[2].bias.requires_grad)
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer):
        self.outside.append(self.net[2].bias.requires_grad)
        self.grad_none.append(self.net[2].bias.grad is None)  # the optimizer skips it, as after a manual freeze

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.outside.append(self.net[2].bias.requires_grad)

    def on_train_epoch_end(self):
        self.outside.append(self.net[2].bias.requires_grad)


@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
def test_requires_grad_is_off_only_inside_the_training_step_and_values_stay_exact(compact):
    model = Watch(optimizer=lambda p: torch.optim.AdamW(p, lr=0.05))
    initial = snapshot(model)
    fit = trainer(callbacks=[GradientMask(SPEC, compact=compact)])
    fit.fit(model, loader())
    assert model.net[2].bias not in fit.optimizers[0].state
    # the first batch runs as before (HessianMonitor's trial product happens then), later ones skip the work
    assert model.inside == [True] + [False] * 7
    assert model.grad_none == [True] * 8  # the optimizer never steps it (nor holds state for it), as after a manual freeze
    assert len(model.outside) == 8 + 8 + 2 and all(model.outside)
    assert model.net[2].bias.requires_grad
    assert torch.equal(model.net[2].bias, initial["net.2.bias"])


def test_requires_grad_comes_back_after_an_exception():
    class Boom(TinyRegressor):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        trainer(callbacks=[GradientMask(SPEC)]).fit(model, loader())
    assert all(p.requires_grad for p in model.parameters())


def test_a_parameter_frozen_by_hand_stays_frozen_and_a_model_frozen_whole_still_trains():
    model = TinyRegressor()
    model.net[2].weight.requires_grad_(False)
    trainer(callbacks=[GradientMask({"net.2.bias": False})]).fit(model, loader())
    assert not model.net[2].weight.requires_grad and model.net[2].bias.requires_grad
    # every parameter frozen: the loss keeps its graph (nothing is switched off), nothing moves
    everything = TinyRegressor()
    initial = snapshot(everything)
    trainer(callbacks=[GradientMask({"re:.*": False})], max_epochs=1).fit(everything, loader())
    for name, value in initial.items():
        assert torch.equal(value, snapshot(everything)[name]), name


def test_hessian_monitor_gives_the_same_statistics(monkeypatch):
    def loss(module, batch):
        return F.mse_loss(module(batch[0]), batch[1])

    def run():
        monitor = HessianMonitor(loss, stats=("trace", "eigenvalues"), max_overhead=None)
        trainer(callbacks=[GradientMask(SPEC), monitor], max_epochs=2).fit(TinyRegressor(), loader())
        assert monitor.latest is not None
        return monitor.latest

    switched = run()
    monkeypatch.setattr(gradient_mask, "_single_device", lambda trainer: False)  # as before: nothing switched off
    kept = run()
    assert switched.trace.trace == kept.trace.trace and torch.equal(switched.eigen.eigenvalues, kept.eigen.eigenvalues)


class DecayEverything(torch.optim.Optimizer):
    """Not one of torch's: it shrinks every parameter, with or without a gradient."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(0.9)
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        return loss


@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
def test_an_optimizer_that_writes_gradless_parameters_still_leaves_them_exact(compact):
    model = TinyRegressor(optimizer=DecayEverything)
    initial = snapshot(model)
    trainer(callbacks=[GradientMask(SPEC, compact=compact)]).fit(model, loader())
    assert torch.equal(model.net[2].bias, initial["net.2.bias"])
    assert not torch.equal(model.net[2].weight, initial["net.2.weight"])
