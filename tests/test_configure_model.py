"""Layers built in ``LightningModule.configure_model()``: they exist only after every callback's ``setup``.

Lightning's order in ``Trainer.fit``: ``setup`` -> ``configure_model`` -> checkpoint restore ->
optimizers -> ``on_fit_start`` -> ``on_train_start`` -> steps. The mask and noise callbacks resolve their
specs in ``on_fit_start``: the layers are there, and no step has run yet.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradmask import (
    GradientMask,
    GradientNoise,
    HessianMonitor,
    MaskSpecError,
    SensitiveColumnBlinding,
    WeightNoise,
)

from utils import TinyRegressor, loader, snapshot, trainer

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

ROWS = torch.zeros(8, 6, dtype=torch.bool)
ROWS[:4] = True  # the first four output rows of net.0.weight train


class BuiltLate(TinyRegressor):
    """TinyRegressor whose layers are created in configure_model (as for sharded or meta-device init)."""

    def __init__(self) -> None:
        super().__init__()
        del self.net
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))



def test_mask_blinding_and_noise_resolve_layers_built_in_configure_model():
    model = BuiltLate()
    seen = {}

    class Record(GradientMask):  # the values before the first step, once the layers exist
        def on_train_start(self, trainer, pl_module):
            seen.update(snapshot(pl_module))
            super().on_train_start(trainer, pl_module)

    mask = Record({"net.0.weight": ROWS, "net.2.bias": False})
    callbacks = [mask, SensitiveColumnBlinding([0]), GradientNoise(std=0.01, params="net.0.weight"), WeightNoise(std=0.01)]
    trainer(callbacks=callbacks).fit(model, loader())
    final = snapshot(model)
    assert torch.equal(final["net.0.weight"][~ROWS], seen["net.0.weight"][~ROWS])
    assert torch.equal(final["net.2.bias"], seen["net.2.bias"])
    assert torch.equal(final["net.0.weight"][:, 0], torch.zeros(8))  # severed column
    assert not torch.equal(final["net.0.weight"][ROWS], seen["net.0.weight"][ROWS])
    assert set(mask.masks) == {"net.0.weight", "net.2.bias"}
    assert callbacks[2].target_names == ["net.0.weight"]


def test_a_bad_spec_on_a_layer_built_in_configure_model_fails_before_any_step():
    model = BuiltLate()
    fit = trainer(callbacks=[GradientMask({"net.0.wieght": True})])
    with pytest.raises(MaskSpecError, match=r"net\.0\.wieght.*net\.0\.weight"):  # the closest names are the real ones
        fit.fit(model, loader())
    assert fit.global_step == 0


def test_hessian_monitor_says_to_build_the_layers_in_init():
    monitor = HessianMonitor(loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]), stats=("trace",), max_overhead=None)
    with pytest.raises(ValueError, match=r"configure_model\(\).*__init__"):
        trainer(callbacks=[monitor]).fit(BuiltLate(), loader())
