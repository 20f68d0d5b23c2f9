"""Blinding as pure module logic: column resolution, the input fill, verify_independence."""

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from lightning_gradmask.errors import MaskSpecError
from lightning_gradmask.functional.blinding import (
    ColumnSpecError,
    find_layer,
    input_fills,
    install_input_fill,
    plan_blinding,
    remove_input_fill,
    resolve_columns,
    sever_mask,
    verify_independence,
)

NAMES = ["age", "sex", "bmi", "bp"]


# ------------------------------------------------------------------ resolve_columns
def test_names_and_indices_resolve_to_sorted_indices():
    assert resolve_columns(["sex", "age"], 4, NAMES) == (0, 1)
    assert resolve_columns([3, "bmi"], 4, NAMES) == (2, 3)
    assert resolve_columns(2, 4) == (2,)
    assert resolve_columns("bp", 4, tuple(NAMES)) == (3,)


@pytest.mark.parametrize(
    "columns, names, message",
    [
        (["agee"], NAMES, r"unknown column 'agee' \(did you mean 'age'\?\); available names: age, sex, bmi, bp"),
        ([4], None, r"column index 4 is out of range: the layer reads 4 columns \(valid: 0\.\.3\)"),
        ([-1], None, r"column index -1 is out of range"),
        (["age"], None, r"column 'age' is a name but no feature_names were given"),
        ([1, 1], None, r"duplicate column: 1 names column 1"),
        (["sex", 1], NAMES, r"duplicate column: 'sex' and 1 both name column 1"),
        ([0, 1, 2, 3], None, r"all 4 columns of the layer would be blinded"),
        ([], None, r"columns is empty"),
        ([1.0], None, r"names \(str\) or indices \(int\)"),
        ([True], None, r"names \(str\) or indices \(int\)"),
        (["age"], NAMES[:3], r"feature_names has 3 names but the layer reads 4 columns"),
        (["age"], ["age", "age", "x", "y"], r"feature_names repeats 'age'"),
    ],
)
def test_bad_columns_raise_clear_errors(columns, names, message):
    with pytest.raises(ColumnSpecError, match=message):
        resolve_columns(columns, 4, names)


def test_column_errors_are_mask_spec_errors_and_value_errors():
    assert issubclass(ColumnSpecError, MaskSpecError) and issubclass(ColumnSpecError, ValueError)


# ------------------------------------------------------------------ find_layer / plan
class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.encoder = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
        self.grouped = nn.Conv1d(4, 4, 3, groups=2)
        self.conv3 = nn.Conv3d(2, 2, 1)
        self.head = nn.Linear(5, 1)


def test_default_layer_is_the_first_linear_or_conv_in_named_modules_order():
    assert find_layer(Branchy())[0] == "encoder.0"
    conv_first = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(2, 1))
    assert find_layer(conv_first)[0] == "0"


@pytest.mark.parametrize(
    "layer, message",
    [
        ("encoder.2", r"'encoder\.2' is not a module of Branchy; closest: .*'encoder\.0'.* modules: 'encoder\.0', 'head'$"),
        ("norm", r"'norm' is a LayerNorm; only nn\.Linear .* can be blinded"),
        ("conv3", r"'conv3' is a Conv3d"),
        ("grouped", r"grouped convolution \(groups=2\)"),
    ],
)
def test_bad_layers_raise_clear_errors(layer, message):
    with pytest.raises(ColumnSpecError, match=message):
        find_layer(Branchy(), layer)


def test_model_without_supported_layer_is_refused():
    with pytest.raises(ColumnSpecError, match="no nn.Linear, nn.Conv1d or nn.Conv2d"):
        find_layer(nn.Sequential(nn.LayerNorm(3), nn.ReLU()))


def test_plan_describes_layer_columns_and_weight_mask():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    plan = plan_blinding(model, ["sex", "bp"], NAMES)
    assert (plan.layer_name, plan.columns, plan.column_names, plan.weight_name) == ("0", (1, 3), ("sex", "bp"), "0.weight")
    expected = torch.ones(3, 4, dtype=torch.bool)
    expected[:, [1, 3]] = False
    assert torch.equal(plan.trainable, expected)
    assert "layer=None" in plan.describe()
    with pytest.raises(ColumnSpecError, match=r"layer '2' \(Linear\) reads 3 columns"):
        plan_blinding(model, [3], layer="2")


def test_conv_sever_mask_covers_whole_input_channel():
    conv = nn.Conv2d(3, 2, kernel_size=3)
    mask = sever_mask(conv, [1])
    assert not mask[:, 1].any() and mask[:, [0, 2]].all()


# ------------------------------------------------------------------ the input fill
def _perturbed(x, dim, columns, value):
    out = x.clone()
    out.index_fill_(dim, torch.tensor(columns), value)
    return out


@pytest.mark.parametrize(
    "layer, shape, dim",
    [
        (nn.Linear(4, 3), (5, 4), 1),
        (nn.Linear(4, 3), (2, 5, 4), 2),  # extra leading dims
        (nn.Conv1d(4, 3, 3, padding=1, padding_mode="circular"), (2, 4, 7), 1),
        (nn.Conv1d(4, 3, 3), (4, 7), 0),  # unbatched
        (nn.Conv2d(4, 3, 3), (2, 4, 6, 6), 1),
        (nn.Conv2d(4, 3, 3), (4, 6, 6), 0),  # unbatched
    ],
)
def test_input_fill_makes_outputs_identical_whatever_the_columns_hold(layer, shape, dim):
    torch.manual_seed(0)
    with torch.no_grad():
        layer.weight[:, [1, 3]] = 0
    install_input_fill(layer, [1, 3])
    x = torch.randn(shape)
    reference = layer(x)
    for value in (0.0, 1e30, -math.inf, math.inf, math.nan):
        assert torch.equal(layer(_perturbed(x, dim, [1, 3], value)), reference)
    assert not torch.equal(layer(_perturbed(x, dim, [0], 5.0)), reference)  # other columns still count


def test_input_fill_does_not_modify_the_callers_tensor_and_accepts_keyword_input():
    layer = nn.Linear(3, 2)
    install_input_fill(layer, [0])
    x = torch.full((2, 3), math.nan)
    layer(x)
    assert torch.isnan(x).all()
    assert torch.equal(layer(input=torch.ones(2, 3)), layer(torch.tensor([[7.0, 1, 1], [math.inf, 1, 1]])))


def test_input_fill_names_the_layer_on_a_wrong_input_shape():
    layer = nn.Linear(3, 2)
    install_input_fill(layer, [0], layer_name="net.0")
    with pytest.raises(ValueError, match=r"blinded layer 'net\.0' expects 3 columns"):
        layer(torch.ones(2, 4))


def test_input_fill_survives_deepcopy_and_pickle_and_can_be_removed():
    model = nn.Sequential(nn.Linear(3, 2))
    install_input_fill(model[0], [2], layer_name="0")
    x, nan_x = torch.ones(1, 3), torch.tensor([[1.0, 1.0, math.nan]])
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert list(input_fills(clone)) == ["0"]
        assert not torch.isnan(clone(nan_x)).any()
    assert remove_input_fill(model) == 1
    assert input_fills(model) == {}
    assert torch.isnan(model(nan_x)).all()
    model(x)  # still runs without the hook


# ------------------------------------------------------------------ verify_independence
def _blinded_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight[:, [0, 1]] = 0
    install_input_fill(model[0], [0, 1])
    return model


def test_verify_independence_passes_for_a_blinded_model_and_restores_train_mode():
    model = _blinded_mlp().train()
    report = verify_independence(model, torch.randn(16, 4), ["age", "sex"], feature_names=NAMES)
    assert report.independent and bool(report)
    assert {c.name for c in report.checks} == {"zeros", "large", "-large", "max", "inf", "-inf", "nan", "noise", "rows"}
    assert all(c.gradients_identical for c in report.checks)
    assert model.training
    assert "INDEPENDENT" in str(report) and "age, sex" in report.summary()


def test_verify_independence_fails_for_a_model_reading_the_columns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    report = verify_independence(model, torch.randn(16, 4), [1], perturbations=["large", "nan", "rows"])
    assert not report.independent
    assert [c.name for c in report.failures] == ["large", "nan", "rows"]
    assert report.failures[1].max_abs_difference == math.inf
    assert "NOT independent" in str(report)


def test_verify_independence_on_conv_channels_and_without_gradients():
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 2, 3)
    with torch.no_grad():
        conv.weight[:, 2] = 0
    install_input_fill(conv, [2])
    report = verify_independence(conv, torch.randn(4, 3, 8), [2], dim=1, check_gradients=False)
    assert report.independent
    assert all(c.gradients_identical is None for c in report.checks)


def test_verify_independence_rejects_bad_arguments():
    model = nn.Linear(3, 1)
    with pytest.raises(TypeError, match="floating-point"):
        verify_independence(model, torch.ones(2, 3, dtype=torch.long), [0])
    with pytest.raises(ColumnSpecError, match="out of range"):
        verify_independence(model, torch.ones(2, 3), [3])
    with pytest.raises(ValueError, match="unknown perturbation 'huge'"):
        verify_independence(model, torch.ones(2, 3), [0], perturbations=["huge"])


def test_verify_independence_with_a_custom_forward():
    model = _blinded_mlp()
    report = verify_independence(model, torch.randn(8, 4), [0, 1], forward=lambda x: {"y": model(x), "aux": [model(x) * 2]})
    assert report.independent
