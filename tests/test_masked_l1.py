"""MaskedL1Mixin and the masked L1 math: the penalty, its gradient, the proximal step, the glue."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_gradmask.callbacks.gradient_mask import GradientMask
from lightning_gradmask.errors import MaskSpecError
from lightning_gradmask.functional.l1 import masked_l1_penalty, masked_zero_fraction, proximal_l1_step_
from lightning_gradmask.mixins.masked_l1 import MaskedL1Mixin

from utils import TinyRegressor, loader, regression_data, run_script, snapshot, trainer

DDP_SCRIPT = Path(__file__).parent / "ddp" / "masked_l1_ddp.py"

# entries of net.0.weight (8 x 6) under the L1 term: a checkerboard
EDGES = (torch.arange(8).view(8, 1) + torch.arange(6).view(1, 6)) % 2 == 0
# real per-entry weights for net.2.weight (1 x 8), with zeros (entries left out)
WEIGHTS = torch.tensor([[0.0, 0.5, 1.0, 2.0, 0.0, -1.5, 3.0, 0.25]])
# the terms of the DDP run (tests/ddp/masked_l1_ddp.py imports them from here)
DDP_TERMS = [("net.0.weight", EDGES, 0.5, True), ("net.2.weight", WEIGHTS, 0.2, False)]


class L1Regressor(MaskedL1Mixin, TinyRegressor):
    """TinyRegressor (its training_step inherited, not redefined) with masked L1 terms.

    ``terms``: ``(target, mask, strength, proximal)`` tuples, registered in ``__init__``.
    """

    def __init__(self, terms: list[tuple[str, Any, float, bool]] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for target, mask, strength, proximal in terms:
            self.register_masked_l1(target, mask, strength=strength, proximal=proximal)


class ReturnForms(L1Regressor):
    """A training_step of its own that returns a tensor, a dict or None."""

    def __init__(self, form: str = "tensor", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.form = form

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.data_loss = loss.detach()
        if self.form == "dict":
            return {"loss": loss, "extra": 7}
        return None if self.form == "none" else loss


class CallsSuper(ReturnForms):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)
        return {**out, "loss": out["loss"] * 1.0} if isinstance(out, dict) else out * 1.0


class GradProbe(Callback):
    """Keeps a copy of every parameter's gradient at each optimizer step (after accumulation)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


def sgd(lr: float = 0.1, momentum: float = 0.0):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def batches(n_batches: int, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader(batch_size=batch_size))[:n_batches]


def reference_penalty(params: dict[str, torch.Tensor], terms: list[tuple[str, Any, float, bool]]) -> torch.Tensor:
    """The promised value, written out: sum_i strength_i * sum(|mask_i * W_i|) over non-proximal terms."""
    total = None
    for name, mask, strength, proximal in terms:
        if proximal:
            continue
        w = params[name]
        term = strength * (w.abs().sum() if mask is None else (mask * w).abs().sum())
        total = term if total is None else total + term
    return total


def l1_gradients(values: dict[str, torch.Tensor], terms: list[tuple[str, Any, float, bool]]) -> dict[str, torch.Tensor]:
    """The gradient of reference_penalty at ``values`` (zeros for parameters without a term)."""
    leaves = {n: w.clone().requires_grad_() for n, w in values.items()}
    grads = torch.autograd.grad(reference_penalty(leaves, terms), list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(w) if g is None else g for (n, w), g in zip(leaves.items(), grads)}


# --------------------------------------------------------------------------- the pure math


def test_pure_penalty_and_proximal_step_on_known_numbers() -> None:
    w = torch.tensor([0.3, -0.05, 2.0, -1.0, 0.08, 0.0])
    mask = torch.tensor([1.0, 2.0, 0.0, -0.5, 1.0, 1.0])  # real weights; 0 leaves entry 2 out
    assert torch.equal(masked_l1_penalty([w], [mask], [2.0]), 2.0 * (mask * w).abs().sum())
    assert torch.equal(masked_l1_penalty([], [], []), torch.zeros(()))

    stepped = proximal_l1_step_(w.clone(), mask, threshold=0.1)
    # thresholds 0.1, 0.2, -, 0.05, 0.1, 0.1: entries at or under their threshold become exactly 0
    assert stepped.tolist() == pytest.approx([0.2, 0.0, 2.0, -0.95, 0.0, 0.0])
    assert stepped[2] == w[2] and stepped[1] == 0 and stepped[4] == 0
    assert masked_zero_fraction([stepped], [mask]) == pytest.approx(3 / 5)

    everything = proximal_l1_step_(w.clone(), None, threshold=0.25)
    assert everything.tolist() == pytest.approx([0.05, 0.0, 1.75, -0.75, 0.0, 0.0])


# --------------------------------------------------------------------------- value, gradient, logging


def test_penalty_value_logging_and_gradient_only_on_masked_entries() -> None:
    terms = [
        ("net.0.weight", EDGES, 0.3, False),
        ("net.2.weight", WEIGHTS, 0.2, False),
        ("re:net\\.\\d\\.bias", None, 0.1, False),  # mask omitted: every entry
    ]
    model = L1Regressor(terms, optimizer=sgd())
    assert model.state_dict().keys() == TinyRegressor().state_dict().keys()  # nothing registered as a buffer
    expanded = [("net.0.weight", EDGES, 0.3, False), ("net.2.weight", WEIGHTS, 0.2, False),
                ("net.0.bias", None, 0.1, False), ("net.2.bias", None, 0.1, False)]  # fmt: skip
    initial = snapshot(model)
    expected = reference_penalty(initial, expanded)
    assert torch.equal(model.masked_l1_penalty(), expected)

    # the gradient the optimizer sees = data-loss gradient + the L1 gradient of the masked entries only
    reference = TinyRegressor()
    x, y = batches(1)[0]
    F.mse_loss(reference(x), y).backward()
    data_grads = {n: p.grad for n, p in reference.named_parameters()}
    l1_grads = l1_gradients(initial, expanded)

    probe = GradProbe()
    fit = trainer(max_steps=1, callbacks=[probe])
    fit.fit(model, loader())
    grads = probe.grads[0]
    for name in initial:
        assert torch.equal(grads[name], data_grads[name] + l1_grads[name]), name
    assert torch.equal(grads["net.0.weight"][~EDGES], data_grads["net.0.weight"][~EDGES])
    assert torch.equal(grads["net.2.weight"][WEIGHTS == 0], data_grads["net.2.weight"][WEIGHTS == 0])
    assert not torch.equal(grads["net.0.weight"][EDGES], data_grads["net.0.weight"][EDGES])
    assert torch.equal(fit.callback_metrics["masked_l1/penalty"], expected.detach())


@pytest.mark.parametrize("form", ["tensor", "dict"])
def test_penalty_is_added_once_to_the_returned_loss(form: str) -> None:
    terms = [("net.0.weight", EDGES, 0.3, False), ("net.2.bias", None, 0.5, True)]
    batch = batches(1)[0]
    for cls in (ReturnForms, CallsSuper):  # a subclass calling super().training_step() adds it once too
        model = cls(form=form, terms=terms)
        out = model.training_step(batch, 0)
        loss = out if form == "tensor" else out["loss"]
        assert torch.equal(loss, model.data_loss + model.masked_l1_penalty()), cls.__name__
        assert loss.requires_grad
        if form == "dict":
            assert out["extra"] == 7


def test_training_step_returning_none_is_left_alone() -> None:
    terms = [("net.0.weight", EDGES, 0.3, False), ("net.0.weight", None, 0.5, True)]
    model = ReturnForms(form="none", terms=terms, optimizer=sgd())
    before = snapshot(model)
    assert model.training_step(batches(1)[0], 0) is None
    with pytest.warns(UserWarning, match="returned `None`"):
        trainer(max_epochs=1).fit(model, loader())
    after = snapshot(model)
    assert all(torch.equal(after[n], before[n]) for n in before)  # no step, no proximal step


def test_gradient_accumulation_scales_the_penalty_like_the_loss() -> None:
    terms = [("net.0.weight", EDGES, 0.3, False), ("net.2.weight", WEIGHTS, 0.2, False)]
    model = L1Regressor(terms, optimizer=sgd())
    initial = snapshot(model)
    probe = GradProbe()
    trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[probe]).fit(model, loader())

    # replay of what the promise means: each micro-batch backpropagates (loss_i + penalty) / 2
    reference = TinyRegressor()
    for x, y in batches(2):
        params = dict(reference.named_parameters())
        ((F.mse_loss(reference(x), y) + reference_penalty(params, terms)) / 2).backward()
    for name, param in reference.named_parameters():
        assert torch.equal(probe.grads[0][name], param.grad), name

    # i.e. the mean data gradient plus the L1 gradient counted once per optimizer step
    plain = TinyRegressor()
    for x, y in batches(2):
        (F.mse_loss(plain(x), y) / 2).backward()
    l1 = l1_gradients(initial, terms)
    for name, param in plain.named_parameters():
        assert torch.allclose(probe.grads[0][name], param.grad + l1[name], atol=1e-7), name


class ManualL1(L1Regressor):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        x, y = batch
        loss = F.mse_loss(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss + self.masked_l1_penalty())  # the user adds the penalty
        optimizer.step()
        self.data_loss = loss.detach()
        return loss


class LossProbe(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert torch.equal(outputs["loss"], pl_module.data_loss)  # the returned value was not changed


def test_manual_optimization_leaves_the_return_value_and_matches_automatic() -> None:
    terms = [("net.0.weight", EDGES, 0.3, False), ("net.2.weight", WEIGHTS, 0.2, True)]
    manual = ManualL1(terms=terms, optimizer=sgd(momentum=0.9))
    fit = trainer(max_epochs=2, callbacks=[LossProbe()])
    fit.fit(manual, loader())
    automatic = L1Regressor(terms, optimizer=sgd(momentum=0.9))
    trainer(max_epochs=2).fit(automatic, loader())
    ours, theirs = snapshot(manual), snapshot(automatic)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)  # proximal ran after manual steps too
    assert "masked_l1/penalty" in fit.callback_metrics


# --------------------------------------------------------------------------- proximal


def test_proximal_sgd_reaches_exact_zeros_and_equals_a_hand_written_loop() -> None:
    lr, epochs = 0.1, 3
    terms = [("net.0.weight", EDGES, 0.4, True), ("net.2.weight", WEIGHTS, 0.3, True)]
    model = L1Regressor(terms, optimizer=sgd(lr))
    fit = trainer(max_epochs=epochs)
    fit.fit(model, loader())

    reference = TinyRegressor()
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    params = dict(reference.named_parameters())
    data = batches(4)
    zero_fraction_before_last_step = None
    for epoch in range(epochs):
        for index, (x, y) in enumerate(data):
            if epoch == epochs - 1 and index == len(data) - 1:
                selected = [params["net.0.weight"][EDGES], params["net.2.weight"][WEIGHTS != 0]]
                zeros = sum(int((values == 0).sum()) for values in selected)
                zero_fraction_before_last_step = zeros / sum(values.numel() for values in selected)
            optimizer.zero_grad()
            F.mse_loss(reference(x), y).backward()
            optimizer.step()
            with torch.no_grad():  # W <- sign(W) * max(|W| - lr * strength * |mask|, 0) on masked entries
                for name, mask, strength, _ in terms:
                    w = params[name]
                    shrunk = torch.sign(w) * torch.clamp(w.abs() - lr * strength * mask.to(w.dtype).abs(), min=0)
                    w.copy_(torch.where(mask != 0, shrunk, w))

    ours = snapshot(model)
    for name, param in params.items():
        assert torch.equal(ours[name], param.detach()), name
    assert int((ours["net.0.weight"][EDGES] == 0).sum()) >= 5  # exact zeros reached
    assert not bool((ours["net.0.weight"][~EDGES] == 0).any())  # unmasked entries are not shrunk
    assert fit.callback_metrics["masked_l1/zero_fraction"].item() == pytest.approx(zero_fraction_before_last_step)
    assert zero_fraction_before_last_step > 0


class FrozenProbe(Callback):
    """Checks after every batch that the entries GradientMask froze still hold their initial values."""

    def __init__(self, frozen: torch.Tensor) -> None:
        self.frozen = frozen
        self.checked = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = pl_module.net[0].weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        weight = pl_module.net[0].weight.detach()
        assert torch.equal(weight[self.frozen], self.initial[self.frozen])
        self.checked += 1


@pytest.mark.parametrize("mask_first", [True, False])
def test_frozen_entries_stay_frozen_under_l1_and_proximal_step_in_any_callback_order(mask_first: bool) -> None:
    trainable = torch.zeros(8, 6, dtype=torch.bool)
    trainable[:4] = True
    terms = [("net.0.weight", None, 1.0, True), ("net.0.weight", EDGES, 0.1, False)]
    model = L1Regressor(terms, optimizer=lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1))
    initial = model.net[0].weight.detach().clone()
    gradient_mask, probe = GradientMask(trainable={"net.0.weight": trainable}), FrozenProbe(~trainable)
    callbacks = [gradient_mask, probe] if mask_first else [probe, gradient_mask]
    trainer(max_epochs=2, callbacks=callbacks).fit(model, loader())
    weight = model.net[0].weight.detach()
    assert probe.checked == 8
    assert torch.equal(weight[~trainable], initial[~trainable])
    assert int((weight[trainable] == 0).sum()) >= 5  # the proximal step did act on trainable entries


# --------------------------------------------------------------------------- resume, copies


def test_resumed_run_continues_identically(tmp_path: Path) -> None:
    terms = [("net.0.weight", EDGES, 0.05, False), ("net.2.weight", WEIGHTS, 0.2, True)]
    straight = L1Regressor(terms, optimizer=sgd(momentum=0.9))
    trainer(max_epochs=4).fit(straight, loader())

    first = L1Regressor(terms, optimizer=sgd(momentum=0.9))
    first_trainer = trainer(max_epochs=2)
    first_trainer.fit(first, loader())
    first_trainer.save_checkpoint(tmp_path / "half.ckpt")
    checkpoint = torch.load(tmp_path / "half.ckpt", weights_only=False)
    assert checkpoint["state_dict"].keys() == TinyRegressor().state_dict().keys()

    resumed = L1Regressor(terms, optimizer=sgd(momentum=0.9), seed=1)  # __init__ rebuilds the terms
    trainer(max_epochs=4).fit(resumed, loader(), ckpt_path=tmp_path / "half.ckpt")
    a, b = snapshot(straight), snapshot(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


class IssueModel(MaskedL1Mixin, L.LightningModule):
    """The usage of the issue: the mixin first, its own training_step, terms registered in __init__."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
        self.register_masked_l1("net.0.weight", mask=EDGES, strength=0.3)
        self.register_masked_l1("re:net\\.2\\..*", strength=0.5, proximal=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_copies_keep_their_terms_and_act_only_on_themselves() -> None:
    model = IssueModel()
    assert [t.name for t in model.masked_l1_terms] == ["net.0.weight", "net.2.weight", "net.2.bias"]
    trainer(max_steps=1).fit(model, loader())  # the original is now hooked into its constraints
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        for ours, theirs in zip(other.masked_l1_terms, model.masked_l1_terms, strict=True):
            assert (ours.params, ours.name, ours.strength, ours.proximal) == (
                theirs.params, theirs.name, theirs.strength, theirs.proximal)  # fmt: skip
            assert (ours.mask is None and theirs.mask is None) or torch.equal(ours.mask, theirs.mask)
        assert torch.equal(other.masked_l1_penalty(), model.masked_l1_penalty())
        before = snapshot(model)
        trainer(max_steps=3).fit(other, loader())
        assert all(torch.equal(p, before[n]) for n, p in snapshot(model).items())  # the original did not move
        assert int((other.net[2].weight == 0).sum()) > int((model.net[2].weight == 0).sum())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("target", "mask", "strength", "error", "words"),
    [
        ("net.9.weight", None, 0.1, MaskSpecError, ["net.9.weight", "closest"]),
        ("re:encoder\\..*", None, 0.1, MaskSpecError, ["re:encoder", "matches no parameter"]),
        ("net.0.weight", torch.ones(3, 3), 0.1, MaskSpecError, ["net.0.weight", "shape [3, 3]"]),
        # the regex matches two weights; the mask fits the first only: nothing is registered
        ("re:net\\.\\d\\.weight", EDGES, 0.1, MaskSpecError, ["re:net", "net.2.weight", "shape"]),
        ("net.0.weight", torch.full((8, 6), float("nan")), 0.1, MaskSpecError, ["net.0.weight", "NaN"]),
        ("net.2.weight", None, -1.0, ValueError, ["net.2.weight", "strength", ">= 0"]),
        ("net.2.weight", None, float("inf"), ValueError, ["net.2.weight", "strength"]),
    ],
)
def test_bad_registrations_fail_clearly_and_leave_the_module_untouched(target, mask, strength, error, words) -> None:
    model = L1Regressor([("net.0.bias", None, 0.1, False)])
    before, terms_before = snapshot(model), model.masked_l1_terms
    with pytest.raises(error) as raised:
        model.register_masked_l1(target, mask, strength=strength)
    for word in words:
        assert word in str(raised.value)
    assert model.masked_l1_terms == terms_before
    assert all(torch.equal(p, before[n]) for n, p in snapshot(model).items())


def test_registration_before_super_init_is_refused() -> None:
    class Early(MaskedL1Mixin, TinyRegressor):
        def __init__(self) -> None:
            self.register_masked_l1("net.0.weight", strength=0.1)

    with pytest.raises(RuntimeError, match="after super"):
        Early()


# --------------------------------------------------------------------------- DDP


def test_ddp_ranks_agree_and_match_one_process(tmp_path: Path) -> None:
    run_script(DDP_SCRIPT, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ranks[0]["final"]:
        assert torch.equal(ranks[0]["final"][name], ranks[1]["final"][name]), name
    assert torch.equal(ranks[0]["penalty"], ranks[1]["penalty"])

    # 2 ranks x 8 samples = one process with batches of 16 (the penalty counted once, not per rank)
    single = L1Regressor(DDP_TERMS, optimizer=sgd())
    trainer(max_epochs=2).fit(single, loader(regression_data(n=64, seed=1), batch_size=16))
    for name, param in snapshot(single).items():
        assert torch.allclose(ranks[0]["final"][name], param, atol=1e-6), name
    assert int((ranks[0]["final"]["net.0.weight"][EDGES] == 0).sum()) >= 3
