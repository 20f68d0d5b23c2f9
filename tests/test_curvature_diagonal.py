"""Exact Hessian diagonal (layerwise fast path and product fallback) and its estimate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.torch_version import TorchVersion

from lightning_gradmask.curvature import (
    DiagonalResult,
    HessianOperator,
    estimate_diagonal,
    exact_diagonal,
    exact_diagonal_cost,
)

from reference import LossOf, cross_entropy_of, reference_hessian

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_diagonal(model: nn.Module, loss_of: LossOf) -> torch.Tensor:
    """The exact diagonal, evaluated in float64 whatever the model's dtype."""
    return torch.diagonal(reference_hessian(model, loss_of, dtype=torch.float64))


ce_of = cross_entropy_of


def inputs(n: int, *shape: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def assert_rel(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    err = float((a.to(torch.float64) - b.to(torch.float64)).abs().max())
    assert err <= rel * float(b.abs().max()), (err, float(b.abs().max()))


def exact_and_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[DiagonalResult, HessianOperator, torch.Tensor]:
    """``exact_diagonal`` of the cross-entropy of ``model`` on ``(x, y)``, its operator, and the float64
    reference diagonal."""
    ref = reference_diagonal(model, ce_of(x, y))
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    return exact_diagonal(op), op, ref


def test_layerwise_and_piecewise_mlp_is_exact_with_inplace_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)).double()
    x, y = inputs(24, 5)
    res, op, ref = exact_and_reference(model, x, y)
    # a tanh follows the first layer (layerwise rule); only ReLU and linear maps follow the others
    # (piecewise-linear rule, from output factors)
    assert res.methods == {"0.weight": "layerwise", "0.bias": "layerwise", **dict.fromkeys(op.names[2:], "piecewise")}
    assert res.exact and res.stderr is None
    assert_rel(res.diagonal, ref, 1e-10)
    assert res.per_parameter["0.weight"].shape == (8, 5)
    assert res.num_matvecs < op.dim  # out_features products per layer + row checks
    assert exact_diagonal_cost(op) >= res.num_matvecs  # an upper bound, piecewise checks included


def test_linear_calls_are_recorded_without_replacing_f_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = inputs(24, 5)
    original = F.linear
    unpatched: list[bool] = []

    def closure() -> torch.Tensor:
        unpatched.append(torch.nn.functional.linear is original)  # what other threads would see too
        return F.cross_entropy(model(x), y)

    op = HessianOperator.from_module(model, closure)
    res = exact_diagonal(op)
    assert res.methods["0.weight"] == "layerwise" and res.methods["2.weight"] == "piecewise"
    assert len(unpatched) >= 3 and all(unpatched)  # operator, layer discovery, recording
    assert_rel(res.diagonal, reference_diagonal(model, ce_of(x, y)), 1e-10)
    assert not torch.overrides._get_current_function_mode_stack()  # the recording mode is gone


def test_layerwise_float32_within_1e5():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = inputs(24, 5)
    ref = reference_diagonal(model.double(), ce_of(x, y))
    model.float()
    xf = x.float()
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(xf), y))
    res = exact_diagonal(op)
    assert res.methods == {"0.weight": "layerwise", "0.bias": "layerwise", "2.weight": "piecewise", "2.bias": "piecewise"}
    assert_rel(res.diagonal, ref, 1e-5)


def test_cnn_uses_product_fallback_and_is_exact():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).double()
    x, y = inputs(6, 1, 5, 5)
    res, op, ref = exact_and_reference(model, x, y)
    assert res.methods["0.weight"] == "products" and res.methods["3.weight"] == "piecewise"
    assert "Conv2d" in res.notes["0.weight"]
    assert_rel(res.diagonal, ref, 1e-10)


def test_masked_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = inputs(16, 4)
    ref = reference_diagonal(model, ce_of(x, y))
    mask = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y), masks={"0.weight": mask})
    res = exact_diagonal(op)
    keep = torch.cat([mask.reshape(-1), torch.ones(6 + 18 + 3, dtype=torch.bool)])
    assert_rel(res.diagonal, ref[keep], 1e-10)
    assert torch.isnan(res.per_parameter["0.weight"][~mask]).all()


def test_coupled_rows_fall_back():
    # train-mode BatchNorm couples the samples: the row check must refuse the fast path
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    model.train()
    x, y = inputs(16, 4)
    ref = reference_diagonal(model, ce_of(x, y))
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y), eval_mode=False)
    res = exact_diagonal(op)
    assert res.methods["0.weight"] == "products"
    assert "coupled" in res.notes["0.weight"]
    assert_rel(res.diagonal, ref, 1e-9)


def test_penalty_and_reuse_fall_back():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).double()
    head = nn.Linear(4, 3).double()
    model = nn.ModuleDict({"lin": lin, "head": head})
    x, y = inputs(12, 4)

    def forward(m: nn.Module, params: dict | None = None) -> torch.Tensor:
        if params is None:
            h = torch.tanh(m["lin"](torch.tanh(m["lin"](x))))  # lin called twice
            w = m["head"].weight
            out = m["head"](h)
        else:
            h = torch.tanh(
                functional_call(m["lin"], {"weight": params["lin.weight"], "bias": params["lin.bias"]}, (x,))
            )
            h = torch.tanh(
                functional_call(m["lin"], {"weight": params["lin.weight"], "bias": params["lin.bias"]}, (h,))
            )
            w = params["head.weight"]
            out = functional_call(m["head"], {"weight": w, "bias": params["head.bias"]}, (h,))
        return F.cross_entropy(out, y) + 0.3 * (w**2).sum()  # penalty on head.weight inside the loss

    ref = reference_diagonal(model, lambda m, p: forward(m, p))
    op = HessianOperator.from_module(model, lambda: forward(model))
    res = exact_diagonal(op)
    assert res.methods["lin.weight"] == "products" and "called 2 times" in res.notes["lin.weight"]
    assert res.methods["head.weight"] == "products" and "gradient" in res.notes["head.weight"]
    assert_rel(res.diagonal, ref, 1e-9)


def test_products_method_and_reduce():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = inputs(10, 3, classes=2)
    ref = reference_diagonal(model, ce_of(x, y))
    calls = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        return t

    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y), reduce=reduce)
    calls.clear()
    res = exact_diagonal(op, method="products")
    assert set(res.methods.values()) == {"products"}
    assert_rel(res.diagonal, ref, 1e-10)
    assert len(calls) == 1  # the whole diagonal is reduced once
    calls.clear()
    exact_diagonal(op)
    assert len(calls) == 3  # path flags of the piecewise and the layerwise rule + diagonal


@pytest.mark.parametrize("method", ["hutchinson", "xtrace", "adaptive"])
def test_estimated_diagonal_has_stderr(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    x, y = inputs(20, 6)
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y))
    est = estimate_diagonal(op, 40, method=method, seed=0)
    assert est.diagonal.shape == (op.dim,) and est.stderr is not None and est.stderr.shape == (op.dim,)
    assert not est.exact and (est.stderr >= 0).all()
    assert est.per_parameter["0.weight"].shape == (10, 6)
    ref = exact_diagonal(op).diagonal
    # unbiased per entry: the mean error over entries, in units of stderr, is moderate
    z = ((est.diagonal - ref) / est.stderr.clamp_min(1e-12)).abs()
    assert float(z.median()) < 3.0


class TinyTransformer(nn.Module):
    """One encoder block (attention + feed-forward, LayerNorms) and a head on the mean token."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernels have no double backward
            h = self.block(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(dim=1))


# torch 2.6 (checked) computes nn.MultiheadAttention with its fused kernel even while gradients are
# needed, so its projections are not F.linear calls and take one matvec per entry; torch 2.13 does not
MHA_PROJECTIONS_ARE_F_LINEAR = TorchVersion(torch.__version__) >= (2, 13)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_linear_maps_are_exact_per_layer(batch_first):
    torch.manual_seed(0)
    model = TinyTransformer(batch_first).double().eval()
    x, y = inputs(5, 4, 8)
    res, op, ref = exact_and_reference(model, x, y)
    assert_rel(res.diagonal, ref, 1e-10)  # exact on every torch
    if not MHA_PROJECTIONS_ARE_F_LINEAR:
        pytest.skip("this torch runs nn.MultiheadAttention through its fused kernel: exact, but per entry")
    linear = [n for n in op.names if "norm" not in n and not n.startswith("head.")]
    assert all(res.methods[n] == "layerwise" for n in linear), {n: res.notes.get(n) for n in linear}
    assert res.methods["head.weight"] == res.methods["head.bias"] == "piecewise"  # only linear maps follow
    # LayerNorm: the last one feeds only linear maps (exact by the piecewise-linear rule), the first
    # one a second LayerNorm: the layerwise rule for y = x * weight + bias, x normalized
    assert res.methods["block.norm2.weight"] == "piecewise"
    assert res.methods["block.norm1.weight"] == res.methods["block.norm1.bias"] == "layerwise"
    # attention and the mean over tokens couple the tokens of a sequence, never two sequences;
    # the head sees one row per sequence
    assert all(res.groupings[n].endswith("5x4") for n in linear)
    # after attention, the tokens meet only in the mean: every row alone once the model output's
    # Gauss-Newton part is subtracted (out_features products instead of 4 * out_features);
    # nn.MultiheadAttention works sequence-first inside, so its output projection sees strided rows
    after_attention = [n for n in linear if "in_proj" not in n] + ["block.norm1.weight", "block.norm1.bias"]
    assert all(res.groupings[n].startswith("rows + Gauss-Newton") for n in after_attention)
    assert "strided" in res.groupings["block.self_attn.out_proj.weight"]
    assert ("contiguous" if batch_first else "strided") in res.groupings["block.linear1.weight"]
    assert res.groupings["block.self_attn.in_proj_weight"] == "strided 5x4"  # attention couples the tokens
    assert_rel(res.diagonal, ref, 1e-10)
    assert res.num_matvecs < 0.35 * op.dim and exact_diagonal_cost(op) >= res.num_matvecs


def test_transformer_float32_is_exact_to_float32_precision():
    # the residual check compares H_y v with the Gauss-Newton product: float32 rounding must pass it
    torch.manual_seed(0)
    model = TinyTransformer().double().eval()
    x, y = inputs(6, 5, 8)
    ref = reference_diagonal(model, ce_of(x, y))
    model.float()
    xf = x.float()
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(xf), y))
    res = exact_diagonal(op)
    if MHA_PROJECTIONS_ARE_F_LINEAR:
        assert res.groupings["block.linear2.weight"].startswith("rows + Gauss-Newton")
    assert_rel(res.diagonal, ref, 1e-5)


class TokensMixedAfterTanh(nn.Module):
    """Linear on every token, tanh, then a log-sum-exp over the tokens: they meet nonlinearly."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x)).logsumexp(dim=1))


def test_tokens_meeting_nonlinearly_refuse_the_gauss_newton_split():
    # d2/dy2 of the log-sum-exp couples the tokens: H_y less the Gauss-Newton part is not per row,
    # so the rule falls back to the groups of tokens (one product per column and position)
    torch.manual_seed(0)
    model = TokensMixedAfterTanh().double().eval()
    x, y = inputs(5, 4, 6)
    res, op, ref = exact_and_reference(model, x, y)
    assert res.methods["inner.weight"] == "layerwise"
    assert res.groupings["inner.weight"] == "contiguous 5x4"
    assert_rel(res.diagonal, ref, 1e-10)
    assert exact_diagonal_cost(op) >= res.num_matvecs


class TokensMeanAfterLayerNorm(nn.Module):
    """Linear -> tanh -> Linear -> LayerNorm on every token, the mean over the tokens, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.LayerNorm(5))
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(x).mean(dim=1))


def test_tokens_meeting_in_a_mean_take_the_gauss_newton_split_without_attention():
    torch.manual_seed(0)
    model = TokensMeanAfterLayerNorm().double().eval()
    x, y = inputs(5, 4, 6)
    res, op, ref = exact_and_reference(model, x, y)
    for name in ("tokens.0.weight", "tokens.0.bias", "tokens.2.weight", "tokens.2.bias"):
        assert res.methods[name] == "layerwise"
        assert res.groupings[name] == "rows + Gauss-Newton per sample, contiguous 5x4"
    assert_rel(res.diagonal, ref, 1e-10)
    assert exact_diagonal_cost(op) >= res.num_matvecs


class LayerNormThenTokensMixed(nn.Module):
    """Linear -> LayerNorm -> tanh on every token, a log-sum-exp over the tokens, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.inner(x))).logsumexp(dim=1))


@pytest.mark.parametrize(
    ("build", "shape", "grouping"),
    [
        (lambda: nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)), (6,), "rows"),
        (LayerNormThenTokensMixed, (4, 6), "contiguous 5x4"),
    ],
)
def test_layer_norm_followed_by_a_smooth_map_is_layerwise_and_exact(build, shape, grouping):
    # y = x * weight + bias with x the normalized input: the layerwise rule with a vector weight
    torch.manual_seed(0)
    model = build().double().eval()
    x, y = inputs(5, *shape)
    res, op, ref = exact_and_reference(model, x, y)
    norm = next(n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm))
    assert res.methods[f"{norm}.weight"] == res.methods[f"{norm}.bias"] == "layerwise"
    assert res.groupings[f"{norm}.weight"] == grouping
    assert_rel(res.diagonal, ref, 1e-10)
    assert exact_diagonal_cost(op) >= res.num_matvecs


def test_linear_layer_without_module_is_layerwise():
    # the rule needs no module: a closure calling F.linear on bare tensors is enough
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    x, y = inputs(7, 4)
    op = HessianOperator(lambda: F.cross_entropy(F.linear(torch.tanh(x), w, b), y), {"w": w, "b": b})
    res = exact_diagonal(op)
    assert res.methods == {"w": "layerwise", "b": "layerwise"}
    h = torch.func.hessian(lambda w_, b_: F.cross_entropy(F.linear(torch.tanh(x), w_, b_), y), argnums=(0, 1))(w, b)
    torch.testing.assert_close(res.per_parameter["w"], torch.diagonal(h[0][0].reshape(12, 12)).reshape(3, 4))
    torch.testing.assert_close(res.per_parameter["b"], torch.diagonal(h[1][1]))


class ResidualCNN(nn.Module):
    """Conv -> BatchNorm (eval) -> ReLU -> MaxPool, a residual conv block, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head((h + self.inner(h)).flatten(1))


def test_piecewise_linear_cnn_with_batchnorm_and_residual_is_exact_without_per_entry_products():
    torch.manual_seed(0)
    model = ResidualCNN().double()
    model.stem[1].running_mean.uniform_(-0.5, 0.5)
    model.stem[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x, y = inputs(6, 2, 6, 6)
    res, op, ref = exact_and_reference(model, x, y)
    assert set(res.methods.values()) == {"piecewise"}
    assert_rel(res.diagonal, ref, 1e-10)
    assert res.num_matvecs < 60 < op.dim  # about 2 * classes + checks, not one product per entry
    assert exact_diagonal_cost(op) >= res.num_matvecs


def test_piecewise_rule_refuses_smooth_activations_and_train_mode_batchnorm():
    torch.manual_seed(0)
    smooth = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2, 3))
    smooth.double()
    x, y = inputs(5, 1, 5, 5)
    op = HessianOperator.from_module(smooth, lambda: F.cross_entropy(smooth(x), y))
    res = exact_diagonal(op)
    # the first conv feeds a tanh further on, the second a tanh directly: neither is piecewise linear
    assert res.methods["0.weight"] == res.methods["2.weight"] == "products"
    assert "not piecewise linear" in res.notes["0.weight"]
    assert_rel(res.diagonal, reference_diagonal(smooth, ce_of(x, y)), 1e-10)
    bn = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3)
    ).double()
    op = HessianOperator.from_module(bn, lambda: F.cross_entropy(bn(x), y), eval_mode=False)
    res = exact_diagonal(op)
    assert res.methods["0.weight"] == "products" and "samples coupled" in res.notes["0.weight"]
    assert_rel(res.diagonal, reference_diagonal(bn, ce_of(x, y)), 1e-9)


def test_piecewise_and_layerwise_rules_average_several_batches():
    torch.manual_seed(0)
    model = ResidualCNN().double().eval()
    (x1, y1), (x2, y2) = inputs(4, 2, 6, 6), inputs(7, 2, 6, 6)
    x2 = x2 * 0.5 + 0.1  # a different batch
    ref = 0.5 * (reference_diagonal(model, ce_of(x1, y1)) + reference_diagonal(model, ce_of(x2, y2)))
    op = HessianOperator.from_module(
        model, [lambda: F.cross_entropy(model(x1), y1), lambda: F.cross_entropy(model(x2), y2)]
    )
    res = exact_diagonal(op)
    assert set(res.methods.values()) == {"piecewise"}
    assert_rel(res.diagonal, ref, 1e-10)


class SharedWeights(nn.Module):
    """Convolutions with stride, dilation, groups, "same" padding, a weight used twice, a weight used by hand, BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.strided = nn.Conv2d(2, 4, 3, stride=2, padding=(1, 0), bias=False)
        self.grouped = nn.Conv2d(4, 4, 2, dilation=2, groups=2)
        self.twice = nn.Conv2d(4, 4, 1)  # applied to two tensors, summed: linear in its weight, not one call
        self.same = nn.Conv2d(4, 2, 3, padding="same")  # string padding: not recorded
        self.lin = nn.Linear(12, 5)
        self.norm = nn.BatchNorm1d(5)  # eval mode: a per-feature affine map
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.grouped(F.relu(self.strided(x)))
        h = F.relu(self.same(F.relu(self.twice(h) + self.twice(0.5 * h)))).flatten(1)
        h = F.relu(self.lin(h) + h[:, :5] @ self.lin.weight[:, :5].T)  # lin.weight also used outside F.linear
        return self.head(self.norm(h))


@pytest.mark.parametrize("one_direction_per_pass", [False, True])
def test_piecewise_factors_are_exact_for_conv_options_and_fall_back_for_shared_weights(
    one_direction_per_pass, monkeypatch
):
    if one_direction_per_pass:  # the memory caps: one output direction per backward pass and per product
        monkeypatch.setattr("lightning_gradmask.curvature.piecewise._PASS_BYTES", 1)
        monkeypatch.setattr("lightning_gradmask.curvature._factor_layers._PASS_BYTES", 1)
    torch.manual_seed(0)
    model = SharedWeights().double().eval()
    model.norm.running_mean.uniform_(-0.5, 0.5)
    model.norm.running_var.uniform_(0.5, 2.0)
    x, y = inputs(7, 2, 9, 10)
    res, op, ref = exact_and_reference(model, x, y)
    assert set(res.methods.values()) == {"piecewise"}
    assert_rel(res.diagonal, ref, 1e-10)


def test_piecewise_factors_respect_masks_and_frozen_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)).double().eval()
    x, y = inputs(6, 2, 6, 6)
    ref = reference_diagonal(model, ce_of(x, y))  # over all 105 entries: 0.weight 54, 0.bias 3, 4.weight 36, 4.bias 3
    model[0].bias.requires_grad_(False)
    model[4].weight.requires_grad_(False)
    keep = torch.rand(3, 2, 3, 3, generator=torch.Generator().manual_seed(1)) < 0.5
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y), masks={"0.weight": keep})
    res = exact_diagonal(op)
    assert res.methods == {"0.weight": "piecewise", "4.bias": "piecewise"}
    assert_rel(res.diagonal, torch.cat([ref[:54][keep.reshape(-1)], ref[-3:]]), 1e-10)


class ActivationPenalty(nn.Module):
    """A convolution whose output the loss also penalizes: not through the model output only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(18, 3)
        self.hidden = torch.zeros(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.hidden = self.conv(x)
        return self.head(F.relu(self.hidden).flatten(1))


def test_piecewise_factors_refuse_a_penalty_on_a_layer_output():
    torch.manual_seed(0)
    model = ActivationPenalty().double().eval()
    x, y = inputs(5, 1, 5, 5)

    def loss_of(m: nn.Module, p: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(m, p, (x,))
        return F.cross_entropy(out, y) + 0.1 * m.hidden.pow(4).sum()

    ref = reference_diagonal(model, loss_of)
    op = HessianOperator.from_module(model, lambda: F.cross_entropy(model(x), y) + 0.1 * model.hidden.pow(4).sum())
    res = exact_diagonal(op)
    assert res.methods["conv.weight"] == "products" and "model output only" in res.notes["conv.weight"]
    assert res.methods["head.weight"] == "piecewise"
    assert_rel(res.diagonal, ref, 1e-10)
