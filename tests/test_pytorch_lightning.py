"""The standalone ``pytorch_lightning`` namespace: every callback and the mixin in its real ``Trainer.fit``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradmask import (
    GradientMask,
    GradientNoise,
    HessianMonitor,
    MaskedL1Mixin,
    SensitiveColumnBlinding,
    WeightNoise,
)

from utils import REPO_ROOT, loader, run_script, scratch_dir, snapshot, trainer

pl = pytest.importorskip("pytorch_lightning")


class PLRegressor(pl.LightningModule):
    """The tests' tiny regressor, built on ``pytorch_lightning.LightningModule``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05)


class PLL1Regressor(MaskedL1Mixin, PLRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.register_masked_l1("net.0.weight", strength=0.5, proximal=True)


TRAINABLE = torch.zeros(8, 6, dtype=torch.bool)
TRAINABLE[:, :3] = True


def pl_trainer(**overrides: Any) -> Any:
    return trainer(trainer_class=pl.Trainer, **overrides)


def test_callbacks_are_callbacks_of_both_namespaces() -> None:
    import lightning.pytorch as lp

    for callback in (GradientMask({"net.0.weight": True}), HessianMonitor(loss_fn=lambda m, b: m(b).sum())):
        assert isinstance(callback, lp.Callback) and isinstance(callback, pl.Callback)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed run has no ModelCheckpoint
def test_gradient_mask_keeps_frozen_entries_exact_and_resumes_under_pytorch_lightning() -> None:
    frozen = torch.zeros(8, 6, dtype=torch.bool)
    frozen[:, :3] = True
    spec = {"net.0.weight": ~frozen, "net.2.bias": False}
    model = PLRegressor()
    before = snapshot(model)
    directory = scratch_dir()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=directory, save_last=True)
    pl_trainer(callbacks=[GradientMask(spec), checkpoint], enable_checkpointing=True).fit(model, loader())
    after = snapshot(model)
    assert torch.equal(after["net.0.weight"][frozen], before["net.0.weight"][frozen])
    assert torch.equal(after["net.2.bias"], before["net.2.bias"])
    assert not torch.equal(after["net.0.weight"][~frozen], before["net.0.weight"][~frozen])

    resumed = PLRegressor()
    pl_trainer(callbacks=[GradientMask(spec)], max_epochs=3).fit(resumed, loader(), ckpt_path=checkpoint.last_model_path)
    assert torch.equal(snapshot(resumed)["net.0.weight"][frozen], before["net.0.weight"][frozen])


def test_blinding_noise_and_hessian_monitor_under_pytorch_lightning() -> None:
    model = PLRegressor()
    before = snapshot(model)
    monitor = HessianMonitor(loss_fn=lambda module, batch: F.mse_loss(module(batch[0]), batch[1]), stats=("trace",), max_overhead=None)
    callbacks = [SensitiveColumnBlinding([0, 1]), GradientNoise(std=0.1), WeightNoise(std=0.01), monitor]
    pl_trainer(callbacks=callbacks).fit(model, loader())
    assert torch.equal(model.net[0].weight[:, :2], torch.zeros(8, 2))
    assert not torch.equal(model.net[2].weight, before["net.2.weight"])
    assert monitor.latest is not None and torch.isfinite(torch.as_tensor(monitor.latest.trace.trace))


@pytest.mark.parametrize("kind", [GradientNoise, WeightNoise])
def test_twin_noise_callbacks_get_the_documented_error_under_pytorch_lightning(kind) -> None:
    # this Trainer sees every callback of our base as stateful: equal keys would be its RuntimeError
    with pytest.raises(ValueError, match=f"two {kind.__name__} callbacks use seed=3"):
        pl_trainer(callbacks=[kind(std=0.1, seed=3), kind(std=0.1, seed=3)]).fit(PLRegressor(), loader())


def test_masked_l1_mixin_on_a_pytorch_lightning_module() -> None:
    model = PLL1Regressor()
    pl_trainer(max_epochs=3).fit(model, loader())
    assert float((model.net[0].weight == 0).float().mean()) > 0.5  # the proximal step ran


def test_ddp_run_of_the_pytorch_lightning_trainer(tmp_path):
    run_script(REPO_ROOT / "tests" / "ddp" / "pytorch_lightning_ddp.py", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for name in ranks[0]["final"]:
        assert torch.equal(ranks[0]["final"][name], ranks[1]["final"][name]), name  # the ranks agree
    final, initial = ranks[0]["final"], ranks[0]["initial"]
    assert torch.equal(final["net.0.weight"][~TRAINABLE], initial["net.0.weight"][~TRAINABLE])
    assert torch.equal(final["net.2.bias"], initial["net.2.bias"])
    assert not torch.equal(final["net.0.weight"][TRAINABLE], initial["net.0.weight"][TRAINABLE])


def test_without_pytorch_lightning_the_callbacks_are_lightning_callbacks():
    code = (
        "import sys; sys.modules['pytorch_lightning'] = None  # as if not installed\n"
        "import lightning.pytorch as lp\n"
        "from lightning_gradmask import GradientMask\n"
        "from lightning_gradmask._namespaces import lightning_classes\n"
        "assert [c.__module__.split('.')[0] for c in GradientMask.__mro__ if c.__name__ == 'Callback'] == "
        "['lightning_gradmask', 'lightning']\n"
        "assert lightning_classes('strategies', 'DDPStrategy') == (lp.strategies.DDPStrategy,)\n"
    )
    script = Path(scratch_dir()) / "no_pytorch_lightning.py"
    script.write_text(code)
    run_script(script)


def test_pytorch_lightning_cli_accepts_the_callbacks_from_a_config(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    config = {
        "trainer": {
            "accelerator": "cpu", "max_epochs": 1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "lightning_gradmask.GradientMask", "init_args": {"trainable": {"net.2.bias": False}}},
                {"class_path": "lightning_gradmask.GradientNoise", "init_args": {"std": 0.01}},
            ],
        }
    }  # fmt: skip
    cli = LightningCLI(PLRegressor, run=False, args=config, save_config_callback=None)
    assert [type(cb).__name__ for cb in cli.trainer.callbacks][:2] == ["GradientMask", "GradientNoise"]
    bias = cli.model.net[2].bias.detach().clone()
    cli.trainer.fit(cli.model, loader())
    assert torch.equal(cli.model.net[2].bias, bias)


def test_two_hessian_monitors_share_a_pytorch_lightning_trainer() -> None:
    loss = lambda module, batch: F.mse_loss(module(batch[0]), batch[1])  # noqa: E731
    per_epoch = HessianMonitor(loss_fn=loss, stats=("trace",), max_overhead=None)
    per_step = HessianMonitor(loss_fn=loss, stats=("eigenvalues",), every_n_steps=2, max_overhead=None, prefix="hessian_steps")
    fit = pl_trainer(callbacks=[per_epoch, per_step])
    fit.fit(PLRegressor(), loader())
    assert per_epoch.latest is not None and per_epoch.latest.trace is not None
    assert per_step.latest is not None and per_step.latest.eigen is not None
    assert {"hessian/trace", "hessian_steps/eigenvalue_1"} <= set(fit.callback_metrics)
