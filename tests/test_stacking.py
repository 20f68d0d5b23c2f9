"""Several gradmask callbacks in one Trainer, and Lightning's weight-averaging and pruning callbacks."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning, StochasticWeightAveraging

from lightning_gradmask import GradientMask, GradientNoise

from utils import TinyRegressor, loader, snapshot, trainer

EDGES = torch.zeros(8, 6, dtype=torch.bool)
EDGES[:, :2] = True  # net.0.weight: only the first two input columns train
FIRST = {"net.0.weight": EDGES}
SECOND = {"net.2.bias": False}


def adamw(params):
    return torch.optim.AdamW(params, lr=0.05)


def assert_frozen(model, initial) -> None:
    assert torch.equal(model.net[0].weight[~EDGES], initial["net.0.weight"][~EDGES])
    assert torch.equal(model.net[2].bias, initial["net.2.bias"])


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed run has no ModelCheckpoint
def test_two_gradient_masks_save_and_resume_each_their_own_state(tmp_path):
    model = TinyRegressor(optimizer=adamw)
    initial = snapshot(model)
    callbacks = [GradientMask(FIRST), GradientMask(SECOND), GradientNoise(std=0.01, seed=1), GradientNoise(std=0.01, seed=2)]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[*callbacks, checkpoint], enable_checkpointing=True, max_epochs=1).fit(model, loader())
    assert_frozen(model, initial)

    states = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert set(states[GradientMask(FIRST).state_key]["masks"]) == {"net.0.weight"}
    assert set(states[GradientMask(SECOND).state_key]["masks"]) == {"net.2.bias"}
    assert len([key for key in states if key.startswith("GradientNoise")]) == 2

    resumed = TinyRegressor(optimizer=adamw, seed=3)  # different init: the checkpoint decides
    fresh = [GradientMask(FIRST), GradientMask(SECOND), GradientNoise(std=0.01, seed=1), GradientNoise(std=0.01, seed=2)]
    trainer(callbacks=fresh, max_epochs=3).fit(resumed, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert_frozen(resumed, initial)


def test_stochastic_weight_averaging_keeps_frozen_entries_exact():
    model = TinyRegressor(optimizer=adamw)
    initial = snapshot(model)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    trainer(callbacks=[GradientMask(FIRST), GradientMask(SECOND), swa], max_epochs=3).fit(model, loader())
    assert_frozen(model, initial)
    assert not torch.equal(model.net[0].weight[EDGES], initial["net.0.weight"][EDGES])


def test_ema_weight_averaging_warns_at_setup_and_a_lerp_average_stays_exact():
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks, "EMAWeightAveraging"):
        pytest.skip("this lightning has no weight-averaging callbacks")
    model = TinyRegressor(optimizer=adamw)
    with pytest.warns(UserWarning, match="EMAWeightAveraging averages every entry"):
        trainer(callbacks=[GradientMask(FIRST), callbacks.EMAWeightAveraging()], max_epochs=1).fit(model, loader())

    model = TinyRegressor(optimizer=adamw)
    initial = snapshot(model)
    exact_ema = callbacks.WeightAveraging(avg_fn=lambda avg, current, n: torch.lerp(avg, current, 1 - 0.9))
    trainer(callbacks=[GradientMask(FIRST), GradientMask(SECOND), exact_ema], max_epochs=3).fit(model, loader())
    assert_frozen(model, initial)


def test_model_pruning_a_frozen_parameter_warns():
    model = TinyRegressor(optimizer=adamw)
    pruning = ModelPruning("l1_unstructured", parameters_to_prune=[(model.net[0], "weight")], amount=0.3)
    with pytest.warns(UserWarning, match=r"ModelPruning prunes 'net.0.weight', which have frozen entries"):
        trainer(callbacks=[GradientMask(FIRST), pruning], max_epochs=1).fit(model, loader())
