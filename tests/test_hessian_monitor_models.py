"""HessianMonitor on models nobody here wrote: Hugging Face transformers, a BatchNorm CNN, half
precision, pruning, tied weights, activation checkpointing."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradmask import GradientMask, HessianMonitor

from reference import reference_hessian
from utils import TinyRegressor, loader, snapshot, trainer

transformers = pytest.importorskip("transformers")


def mse(module, batch):
    x, y = batch
    return F.mse_loss(module(x), y)


class KeepFirstBatch(L.Callback):
    """The batch the monitor evaluates on by default: the epoch's first."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batch = batch


def subset_hessian(module, name, loss_of):
    """Dense Hessian of ``loss_of(module)`` w.r.t. one parameter, by torch.func on the given module."""
    p0 = dict(module.named_parameters())[name].detach()

    def loss(flat):
        return loss_of(lambda *a, **k: functional_call(module, {name: flat.reshape(p0.shape)}, a, k))

    return torch.func.hessian(loss)(p0.reshape(-1)).double().detach()


class HuggingFace(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.hessian_loss(batch)

    def hessian_loss(self, batch):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def bert(attention="sdpa", dropout=0.0):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, initializer_range=0.3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        attn_implementation=attention,
    )
    return transformers.BertForSequenceClassification(config)


def gpt2(attention="sdpa", dropout=0.0):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16, initializer_range=0.3, bos_token_id=0, eos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation=attention,
    )
    return transformers.GPT2LMHeadModel(config)


def token_data(labels: int | None, n=16, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (n, length), generator=g)
    target = torch.randint(0, labels, (n,), generator=g) if labels else ids.clone()
    return DataLoader(TensorDataset(ids, target), batch_size=8)


@pytest.mark.parametrize("build, labels, name", [
    (bert, 3, "bert.embeddings.LayerNorm.weight"),  # before the attention: its second derivative counts
    (gpt2, None, "transformer.h.0.ln_1.weight"),
])
def test_transformers_with_fused_attention_match_the_eager_model(build, labels, name):
    model = HuggingFace(build())
    assert model.model.config._attn_implementation == "sdpa"
    monitor = HessianMonitor(stats=("trace", "eigenvalues"), top_k=2, params=f"model.{name}", exact_up_to=10_000,
                             max_overhead=None, strict=True)
    keep = KeepFirstBatch()
    trainer(callbacks=[keep, monitor], max_epochs=1).fit(model, token_data(labels))

    eager = build("eager")
    eager.load_state_dict(model.model.state_dict())
    eager.eval()
    ids, target = keep.batch
    reference = subset_hessian(eager, name, lambda call: call(input_ids=ids, labels=target).loss)
    eigenvalues = torch.linalg.eigvalsh(reference).flip(0)[:2]
    assert monitor.latest.exact["eigenvalues"]
    assert float(eigenvalues[0]) > 1e-3  # the attention's curvature is really measured
    assert torch.allclose(monitor.latest.eigen.eigenvalues.double(), eigenvalues, rtol=1e-4)
    assert monitor.latest.trace.trace == pytest.approx(float(reference.trace()), rel=1e-4, abs=1e-6)


def test_gpt2_tied_embedding_selected_by_its_second_name_counts_once():
    model = HuggingFace(gpt2())
    monitor = HessianMonitor(stats=("trace",), params="model.lm_head.weight", max_overhead=None, strict=True)
    everything = HessianMonitor(stats=("trace",), max_overhead=None, strict=True, save=False, prefix="hessian_all")
    trainer(callbacks=[monitor, everything], max_epochs=1).fit(model, token_data(None))
    assert monitor.latest.dim == 40 * 16  # the tied wte/lm_head matrix, once
    unique = sum(p.numel() for p in model.parameters())
    assert everything.latest.dim == unique


def test_monitored_transformer_with_dropout_trains_bit_identically():
    def run(with_monitor):
        L.seed_everything(0, verbose=False)
        model = HuggingFace(gpt2(dropout=0.1))
        callbacks = [HessianMonitor(stats=("trace", "eigenvalues"), max_overhead=None, every_n_steps=1,
                                    params="re:.*ln_f.*")] if with_monitor else []
        trainer(callbacks=callbacks, max_epochs=2).fit(model, token_data(None))
        return snapshot(model)

    monitored, plain = run(True), run(False)
    for name, value in plain.items():
        assert torch.equal(value, monitored[name]), name


class TinyResNet(L.LightningModule):
    """Conv -> BatchNorm -> ReLU with a residual block and a linear head (the layers of a ResNet)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.stem(x)
        h = F.relu(h + self.block(h))
        return self.head(h.mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        return self.hessian_loss(batch)

    def hessian_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_batchnorm_cnn_matches_torch_func_in_eval_mode():
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 3, 4, 4, generator=g), torch.randint(0, 3, (16,), generator=g)), batch_size=8)
    model, keep = TinyResNet(), KeepFirstBatch()
    monitor = HessianMonitor(stats=("trace", "eigenvalues"), top_k=2, params="block.0.weight", exact_up_to=10_000,
                             max_overhead=None, strict=True)
    trainer(callbacks=[keep, monitor], max_epochs=1).fit(model, data)
    x, y = keep.batch
    model.eval()  # the monitor's BatchNorm uses the running statistics
    reference = subset_hessian(model, "block.0.weight", lambda call: F.cross_entropy(call(x), y))
    model.train()
    assert torch.allclose(monitor.latest.eigen.eigenvalues.double(), torch.linalg.eigvalsh(reference).flip(0)[:2], rtol=1e-4)
    assert monitor.latest.trace.trace == pytest.approx(float(reference.trace()), rel=1e-4)


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("16-true", torch.float16)])
def test_half_precision_models_get_statistics_close_to_float32(precision, dtype):
    model, keep = TinyRegressor(hidden=16, optimizer=lambda p: torch.optim.SGD(p, lr=0.0)), KeepFirstBatch()
    monitor = HessianMonitor(mse, stats=("trace", "eigenvalues", "density"), exact_up_to=0, max_overhead=None, strict=True)
    trainer(callbacks=[keep, monitor], max_epochs=1, precision=precision).fit(model, loader())
    assert model.net[0].weight.dtype == dtype
    x, y = keep.batch
    full = TinyRegressor(hidden=16).double()
    full.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    reference = reference_hessian(full, lambda m, params: F.mse_loss(functional_call(m, params, (x.double(),)), y.double()))
    top = float(torch.linalg.eigvalsh(reference)[-1])
    assert float(monitor.latest.eigen.eigenvalues[0]) == pytest.approx(top, rel=2e-3)  # measured: about 1e-4
    assert not monitor.latest.exact["trace"]  # an estimate: within its own error bar
    assert abs(monitor.latest.trace.trace - float(reference.trace())) <= 4 * monitor.latest.trace.stderr + 1e-3
    assert bool(torch.isfinite(monitor.latest.density.density).all())


def test_model_pruning_renames_and_only_unpruned_entries_count():
    model = TinyRegressor(hidden=8)
    pruning = ModelPruning("l1_unstructured", amount=0.5, parameters_to_prune=[(model.net[0], "weight")],
                           make_pruning_permanent=False, verbose=0)
    monitor = HessianMonitor(mse, stats=("trace",), params=["net.0.weight"], max_overhead=None, strict=True)
    fit = trainer(callbacks=[pruning, monitor], max_epochs=2)
    fit.fit(model, loader())
    assert "net.0.weight_orig" in dict(model.named_parameters())
    kept = int(model.net[0].weight_mask.sum())
    assert 0 < kept < 48
    assert monitor.latest.dim == kept
    assert math.isfinite(fit.callback_metrics["hessian/trace"])


class Tied(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encode = nn.Linear(6, 6)
        self.decode = nn.Linear(6, 6)
        self.decode.weight = self.encode.weight
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.decode(torch.tanh(self.encode(x)))))

    def training_step(self, batch, batch_idx):
        return mse(self, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_tied_weight_under_its_second_name_is_selected_once_and_its_mask_applies():
    frozen = torch.ones(6, 6, dtype=torch.bool)
    frozen[:3] = False
    monitor = HessianMonitor(mse, stats=("trace",), params="decode.weight", max_overhead=None, strict=True)
    trainer(callbacks=[GradientMask({"decode.weight": frozen}), monitor], max_epochs=1).fit(Tied(), loader())
    assert monitor.latest.dim == 18


class ReentrantCheckpointed(TinyRegressor):
    def forward(self, x):
        h = torch.tanh(self.net[0](x))
        return checkpoint(self.net[2], h, use_reentrant=True)


def test_reentrant_checkpointing_is_named_with_the_fix_before_any_step():
    model = ReentrantCheckpointed()
    before = snapshot(model)
    with pytest.raises(ValueError, match="use_reentrant=True.*use_reentrant=False"):
        trainer(callbacks=[HessianMonitor(mse)], max_epochs=1).fit(model, loader())
    for name, value in snapshot(model).items():
        assert torch.equal(value, before[name]), name


def test_mixed_precision_measures_the_float32_model_without_autocast():
    def top(precision):
        monitor = HessianMonitor(mse, stats=("trace", "eigenvalues"), max_overhead=None, save=False, strict=True)
        model = TinyRegressor(optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
        trainer(callbacks=[monitor], max_epochs=1, precision=precision).fit(model, loader())
        return monitor.latest

    mixed, full = top("bf16-mixed"), top("32-true")
    assert torch.equal(mixed.eigen.eigenvalues, full.eigen.eigenvalues) and mixed.trace.trace == full.trace.trace
