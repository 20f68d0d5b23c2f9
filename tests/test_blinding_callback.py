"""SensitiveColumnBlinding through real Trainer.fit runs: exact independence, exact zeros, clear errors."""

import logging
import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradmask.callbacks.gradient_mask import GradientMask
from lightning_gradmask.callbacks.sensitive_column_blinding import SensitiveColumnBlinding
from lightning_gradmask.errors import ColumnSpecError, GradmaskConfigError
from lightning_gradmask.functional.blinding import input_fills, verify_independence
from lightning_gradmask.functional.constraints import parameter_constraints

from utils import REPO_ROOT, TinyRegressor, loader, regression_data, run_script, snapshot, trainer

COLS = [1, 3]
ADAMW = lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1)  # noqa: E731


def wild(x: torch.Tensor, columns=COLS) -> torch.Tensor:
    """``x`` with the given columns replaced by NaN, inf, -inf, huge and noisy values."""
    out = x.clone()
    n = len(x)
    for j in columns:
        out[:, j] = torch.randn(n, generator=torch.Generator().manual_seed(j)) * 1e4
        out[0::5, j] = math.nan
        out[1::5, j] = math.inf
        out[2::5, j] = -math.inf
        out[3::5, j] = 3e38
    return out


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------ sever: exactness
def test_sever_outputs_and_every_gradient_are_identical_whatever_the_columns_hold():
    model = TinyRegressor(optimizer=ADAMW)
    blind = SensitiveColumnBlinding(COLS, mode="sever")
    trainer(callbacks=[blind], max_epochs=2, accumulate_grad_batches=2).fit(model, loader())
    weight = model.net[0].weight.detach()
    assert torch.equal(weight[:, COLS], torch.zeros(8, 2))
    assert (weight[:, [0, 2, 4, 5]] != 0).all()

    x, y = regression_data().tensors
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(model(wild(x)), reference)
        assert not torch.equal(model(wild(x, [0])), reference)  # an ordinary column still counts
    expected = gradients(model, x, y)
    got = gradients(model, wild(x), y)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert verify_independence(model, x, COLS).independent
    assert blind.weight_deviation() == 0.0


def test_models_trained_on_data_differing_only_in_sensitive_columns_end_identical():
    x, y = regression_data(n=48).tensors

    def fit(inputs, callbacks):
        model = TinyRegressor(optimizer=ADAMW)
        trainer(callbacks=callbacks, max_epochs=2).fit(model, loader(TensorDataset(inputs, y), batch_size=8))
        return snapshot(model)

    clean = fit(x, [SensitiveColumnBlinding(COLS)])
    perturbed = fit(wild(x), [SensitiveColumnBlinding(COLS)])
    assert all(torch.equal(clean[name], perturbed[name]) for name in clean)

    # control: without blinding the same (finite) change of the columns changes the model
    finite = x.clone()
    finite[:, COLS] = torch.randn(48, 2)
    unblinded = fit(x, []), fit(finite, [])
    assert not torch.equal(unblinded[0]["net.2.weight"], unblinded[1]["net.2.weight"])


def test_bf16_mixed_keeps_severed_weights_zero_and_outputs_independent():
    model = TinyRegressor(optimizer=ADAMW)
    trainer(callbacks=[SensitiveColumnBlinding(COLS)], precision="bf16-mixed", max_epochs=2).fit(model, loader())
    assert torch.equal(model.net[0].weight[:, COLS], torch.zeros(8, 2))
    x = regression_data().tensors[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(wild(x)), model(x))


class ConvNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)


def test_conv2d_channels_are_severed():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 5, 5, generator=g), torch.randn(16, 1, generator=g)
    model = ConvNet()
    blind = SensitiveColumnBlinding(columns=["green"], feature_names=["red", "green", "blue"])
    trainer(callbacks=[blind], max_epochs=2).fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    assert blind.layer_name == "features.0" and blind.blinded_columns == (1,)
    assert torch.equal(model.features[0].weight[:, 1], torch.zeros(4, 3, 3))
    assert verify_independence(model, x, ["green"], feature_names=["red", "green", "blue"]).independent


# ------------------------------------------------------------------ grad mode
def test_grad_mode_keeps_initial_weights_but_the_model_still_learns_from_the_column():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = x[:, :1].clone()  # the target depends on the blinded column only
    data = TensorDataset(x, y)
    results = {}
    for mode in ("grad", "sever"):
        model = TinyRegressor(features=4, hidden=16, optimizer=lambda p: torch.optim.Adam(p, lr=0.02))
        initial = snapshot(model)
        trainer(callbacks=[SensitiveColumnBlinding([0], mode=mode)], max_epochs=10).fit(model, loader(data, 64))
        with torch.no_grad():
            results[mode] = F.mse_loss(model(x), y).item()
        if mode == "grad":
            assert torch.equal(model.net[0].weight[:, 0], initial["net.0.weight"][:, 0])
            assert not torch.equal(model.net[0].weight[:, 1:], initial["net.0.weight"][:, 1:])
            assert not verify_independence(model, x, [0], perturbations=["large"]).independent
        else:
            assert torch.equal(model.net[0].weight[:, 0], torch.zeros(16))
    variance = y.var().item()
    # documented limitation: grad mode learns y = x0 almost perfectly, sever mode cannot
    assert results["grad"] < 0.05 * variance
    assert results["sever"] > 0.8 * variance


# ------------------------------------------------------------------ checkpoints and resume
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("mode", ["sever", "grad"])
def test_resume_keeps_blinded_weights_exact(tmp_path, mode):
    model = TinyRegressor(optimizer=ADAMW)
    initial = snapshot(model)["net.0.weight"][:, COLS]
    required = torch.zeros(8, 2) if mode == "sever" else initial
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[SensitiveColumnBlinding(COLS, mode=mode), ckpt], max_epochs=1, enable_checkpointing=True).fit(
        model, loader()
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert torch.equal(saved["state_dict"]["net.0.weight"][:, COLS], required)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("SensitiveColumnBlinding")]
    assert state == {"layer": "net.0", "columns": COLS, "column_names": None, "mode": mode}

    fresh = TinyRegressor(optimizer=ADAMW, seed=1)  # different weights: the checkpoint must win
    blind = SensitiveColumnBlinding(COLS, mode=mode)
    resumed = trainer(callbacks=[blind, ModelCheckpoint(dirpath=tmp_path)], max_epochs=3, enable_checkpointing=True)
    resumed.fit(fresh, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert torch.equal(fresh.net[0].weight[:, COLS], required)
    assert blind.weight_deviation() == 0.0


def test_checkpoint_loaded_into_a_plain_model_has_zero_weights_but_no_fill(tmp_path):
    model = TinyRegressor(optimizer=ADAMW)
    trainer(callbacks=[SensitiveColumnBlinding(COLS)], max_epochs=1).fit(model, loader())
    plain = TinyRegressor()
    plain.load_state_dict(model.state_dict())
    assert input_fills(plain) == {} and list(input_fills(model)) == ["net.0"]
    x = regression_data().tensors[0]
    finite = x.clone()
    finite[:, COLS] = 1e6
    with torch.no_grad():
        assert torch.equal(plain(finite), plain(x))  # zero weights: finite values have no effect
        assert torch.isnan(plain(wild(x))).any()  # but no fill: NaN/inf reach the output


def test_input_fill_stays_after_fit_until_removed():
    model = TinyRegressor()
    blind = SensitiveColumnBlinding(COLS)
    trainer(callbacks=[blind], max_epochs=1).fit(model, loader())
    trainer(callbacks=[blind], max_epochs=1).fit(model, loader())  # a second fit adds no second hook
    assert [len(v) for v in input_fills(model).values()] == [1]
    assert parameter_constraints(model).trainable_masks() == {}  # the constraints forgot the callback at teardown
    assert blind.remove_input_fill() == 1
    assert input_fills(model) == {}


# ------------------------------------------------------------------ with GradientMask, one ParameterConstraints
@pytest.mark.parametrize("blind_first", [True, False])
def test_combined_with_gradient_mask_both_constraints_hold_in_any_order(blind_first):
    model = TinyRegressor(optimizer=ADAMW)
    initial = snapshot(model)
    frozen_rows = torch.ones(8, 6, dtype=torch.bool)
    frozen_rows[:2] = False  # GradientMask freezes rows 0-1 of net.0.weight
    callbacks = [SensitiveColumnBlinding(COLS), GradientMask({"net.0.weight": frozen_rows, "net.2.bias": False})]
    trainer(callbacks=callbacks if blind_first else callbacks[::-1], max_epochs=2).fit(model, loader())
    weight = model.net[0].weight.detach()
    assert torch.equal(weight[:, COLS], torch.zeros(8, 2))  # severed entries are 0, also in frozen rows
    keep = [0, 2, 4, 5]
    assert torch.equal(weight[:2][:, keep], initial["net.0.weight"][:2][:, keep])
    assert torch.equal(model.net[2].bias, initial["net.2.bias"])
    assert (weight[2:][:, keep] != initial["net.0.weight"][2:][:, keep]).all()


# ------------------------------------------------------------------ bad input, at setup
def _names(n=6):
    return ["age", "sex", "bmi", "bp", "s1", "s2"][:n]


class GroupedConv(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1, groups=2)

    def training_step(self, batch, batch_idx):  # pragma: no cover - never reached
        raise AssertionError

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


BAD = {
    "unknown-name": (dict(columns=["agee"], feature_names=_names()), r"unknown column 'agee'.*available names: age, sex, bmi"),
    "index-range": (dict(columns=[6]), r"column index 6 is out of range: layer 'net\.0' \(Linear\) reads 6 columns"),
    "names-without-feature-names": (dict(columns=["age"]), r"no feature_names were given"),
    "duplicate": (dict(columns=["sex", 1], feature_names=_names()), r"duplicate column"),
    "unknown-layer": (dict(columns=[0], layer="net.00"), r"'net\.00' is not a module of TinyRegressor; closest: 'net\.0'"),
    "unsupported-layer": (dict(columns=[0], layer="net.1"), r"'net\.1' is a Tanh; only nn\.Linear"),
    "all-columns": (dict(columns=list(range(6))), r"all 6 columns of layer 'net\.0' \(Linear\) would be blinded"),
    "feature-names-length": (dict(columns=["age"], feature_names=_names(5)), r"feature_names has 5 names"),
}


@pytest.mark.parametrize("kwargs, message", BAD.values(), ids=BAD.keys())
def test_bad_input_raises_at_setup_and_leaves_the_model_untouched(kwargs, message):
    model = TinyRegressor()
    before = snapshot(model)
    blind = SensitiveColumnBlinding(**kwargs)  # the constructor accepts it: the model is needed
    with pytest.raises(ColumnSpecError, match=message):
        trainer(callbacks=[blind], max_epochs=1).fit(model, loader())
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert input_fills(model) == {}
    assert parameter_constraints(model).trainable_masks() == {}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(columns=None), r"columns=\.\.\.\) is required"),
        (dict(columns=1.5), r"must be a name, an index or a list of them; got float"),
        (dict(columns=["a"], feature_names="abcdef"), r"feature_names=\.\.\.\) must be a list of column names.*'abcdef'"),
    ],
)
def test_missing_columns_and_feature_names_as_one_string_fail_at_construction(kwargs, message):
    with pytest.raises(ColumnSpecError, match=message):
        SensitiveColumnBlinding(**kwargs)


def test_pure_resolution_refuses_feature_names_as_one_string():
    from lightning_gradmask.functional.blinding import resolve_columns

    with pytest.raises(ColumnSpecError, match=r"feature_names must be a list of column names.*'abc'"):
        resolve_columns(["a"], 3, "abc")


def test_grouped_convolution_is_refused_at_setup():
    model = GroupedConv()
    with pytest.raises(ColumnSpecError, match=r"grouped convolution \(groups=2\)"):
        trainer(callbacks=[SensitiveColumnBlinding([0])], max_epochs=1).fit(model, loader(regression_data(features=4)))
    assert input_fills(model) == {}


def test_bad_mode_is_refused_by_the_constructor():
    with pytest.raises(GradmaskConfigError, match="mode must be 'sever' or 'grad'"):
        SensitiveColumnBlinding([0], mode="drop")


# ------------------------------------------------------------------ layer choice and input-flow warning
def test_default_layer_is_announced(caplog):
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            blind = SensitiveColumnBlinding(COLS)
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # and no raw-input warning for a plain MLP
                warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers).*")
                trainer(callbacks=[blind], max_epochs=1).fit(TinyRegressor(), loader())
    finally:
        logger.removeHandler(caplog.handler)
    assert blind.layer_name == "net.0"
    assert "of layer 'net.0' (Linear, 6 input features) [layer=None: the first Linear/Conv1d/Conv2d" in caplog.text


class NormFirst(TinyRegressor):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def test_warns_when_another_module_reads_the_raw_input_before_the_layer():
    with pytest.warns(UserWarning, match=r"module 'net\.0' \(LayerNorm\) received the raw input before the blinded layer 'net\.1'"):
        trainer(callbacks=[SensitiveColumnBlinding(COLS)], max_epochs=1).fit(NormFirst(), loader())


class SkipConnection(TinyRegressor):
    def __init__(self):
        super().__init__()
        self.skip = nn.Linear(6, 1)

    def forward(self, x):
        return self.net(x) + self.skip(x)


def test_warns_when_another_module_also_reads_the_raw_input():
    blind = SensitiveColumnBlinding(COLS, layer="net.0")
    with pytest.warns(UserWarning, match=r"module 'skip' \(Linear\) also received the raw input \(after the blinded layer 'net\.0'\)"):
        trainer(callbacks=[blind], max_epochs=1).fit(SkipConnection(), loader())


class NamedData(L.LightningDataModule):
    feature_names = ["age", "sex", "bmi", "bp", "s1", "s2"]

    def train_dataloader(self):
        return loader()


def test_feature_names_come_from_the_datamodule_when_not_given():
    blind = SensitiveColumnBlinding(["sex", "bp"])
    trainer(callbacks=[blind], max_epochs=1).fit(TinyRegressor(), datamodule=NamedData())
    assert blind.blinded_columns == (1, 3) and blind.plan.column_names == ("sex", "bp")


# ------------------------------------------------------------------ DDP
def test_ddp_ranks_end_identical_and_sensitive_values_never_matter(tmp_path):
    run_script(REPO_ROOT / "tests" / "ddp" / "blinding_ddp.py", "ddp", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, value in ranks[0]["plain"].items():
        assert torch.equal(value, ranks[1]["plain"][name])
        assert torch.equal(value, ranks[0]["perturbed"][name])  # inf/NaN/huge in the columns: same model
        assert torch.equal(value, ranks[1]["perturbed"][name])
    assert torch.equal(ranks[0]["plain"]["net.0.weight"][:, [1, 4]], torch.zeros(8, 2))


def test_grad_mode_masks_gradients_the_module_writes_in_its_own_on_after_backward():
    class WritesGradients(TinyRegressor):
        clipped: list = []

        def on_after_backward(self):  # runs after every callback's on_after_backward
            for param in self.parameters():
                param.grad.add_(1.0)

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.clipped.append(self.net[0].weight.grad[:, :2].clone())

    model = WritesGradients()
    trainer(callbacks=[SensitiveColumnBlinding([0, 1], mode="grad")]).fit(model, loader())
    assert len(model.clipped) == 8 and all(torch.equal(g, torch.zeros(8, 2)) for g in model.clipped)
