"""GradientMask through real Trainer.fit runs: frozen entries stay exact, trainable ones train."""

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_gradmask import GradientMask, MaskSpecError, UnsupportedStrategyError
from lightning_gradmask.functional.constraints import parameter_constraints

from utils import REPO_ROOT, TinyRegressor, loader, run_script, snapshot, trainer

EDGES = torch.zeros(8, 6, dtype=torch.bool)
EDGES[::2, 1::2] = True  # a checkerboard of trainable edges in net.0.weight
SPEC = {"net.0.weight": EDGES, "net.2.bias": False}

OPTIMIZERS = {
    "sgd-momentum-nesterov-decay": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
    "adamw-default-decay": lambda p: torch.optim.AdamW(p, lr=0.05),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.05, fused=True),
}


def assert_frozen(model, initial):
    final = snapshot(model)
    assert torch.equal(final["net.0.weight"][~EDGES], initial["net.0.weight"][~EDGES])
    assert torch.equal(final["net.2.bias"], initial["net.2.bias"])
    moved = final["net.0.weight"][EDGES] != initial["net.0.weight"][EDGES]
    assert moved.all(), "every trainable edge should have been updated"


class Probe(Callback):
    """Records the largest frozen-entry gradient seen by later hooks."""

    def __init__(self):
        self.after_backward, self.before_step = [], []

    def _largest(self, pl_module):
        bias = pl_module.net[2].bias.grad  # frozen whole: None after backward, as after requires_grad_(False)
        return max(pl_module.net[0].weight.grad[~EDGES].abs().max().item(), 0.0 if bias is None else bias.abs().max().item())

    def on_after_backward(self, trainer, pl_module):
        self.after_backward.append(self._largest(pl_module))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_step.append(self._largest(pl_module))


@pytest.mark.parametrize("optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_frozen_entries_are_bit_identical_for_every_optimizer(optimizer):
    model = TinyRegressor(optimizer=optimizer)
    initial = snapshot(model)
    trainer(callbacks=[GradientMask(SPEC)], max_epochs=3).fit(model, loader())
    assert_frozen(model, initial)


WIDE = 20_000  # Linear(6, WIDE): 120,000 entries, over the speed hint's threshold
WIDE_SPEC = {"net.0.weight": torch.arange(6 * WIDE).reshape(WIDE, 6) % 8 == 0, "net.2.bias": False}
SPEED_HINT_CASES = {
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.05), WIDE_SPEC, "105,001 frozen entries"),
    "adam-no-decay": (lambda p: torch.optim.Adam(p, lr=0.05), WIDE_SPEC, "105,001 frozen entries"),
    "adamw-fused": (lambda p: torch.optim.AdamW(p, lr=0.05, fused=True), WIDE_SPEC, None),
    "adam-l2": (lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1), WIDE_SPEC, None),  # L2: nonzero gradient
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.1), WIDE_SPEC, None),
    "few-frozen-entries": (lambda p: torch.optim.AdamW(p, lr=0.05), {"net.2.bias": False}, None),
}


@pytest.mark.parametrize("optimizer, spec, expected", SPEED_HINT_CASES.values(), ids=SPEED_HINT_CASES.keys())
def test_unfused_adam_on_many_frozen_cpu_entries_gets_one_speed_hint(optimizer, spec, expected):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[GradientMask(spec)], max_epochs=1, limit_train_batches=1).fit(
            TinyRegressor(hidden=WIDE, optimizer=optimizer), loader()
        )
    hints = [str(w.message) for w in caught if issubclass(w.category, PossibleUserWarning) and "fused=True" in str(w.message)]
    if expected is None:
        assert hints == []
    else:
        assert len(hints) == 1
        assert expected in hints[0] and "'net.0.weight', 'net.2.bias'" in hints[0]


def test_accumulation_clipping_and_later_hooks_see_zero_frozen_gradients():
    model = TinyRegressor(optimizer=OPTIMIZERS["adamw-default-decay"])
    initial = snapshot(model)
    probe = Probe()
    trainer(
        callbacks=[GradientMask(SPEC), probe], accumulate_grad_batches=2, gradient_clip_val=0.01
    ).fit(model, loader())
    assert_frozen(model, initial)
    assert len(probe.after_backward) == 8 and len(probe.before_step) == 4
    assert max(probe.after_backward) == 0.0 and max(probe.before_step) == 0.0


def test_bf16_mixed_precision():
    model = TinyRegressor(optimizer=OPTIMIZERS["adamw-default-decay"])
    initial = snapshot(model)
    trainer(callbacks=[GradientMask(SPEC)], precision="bf16-mixed").fit(model, loader())
    assert_frozen(model, initial)


def test_fp16_with_a_grad_scaler():
    model = TinyRegressor(optimizer=OPTIMIZERS["sgd-momentum-nesterov-decay"])
    initial = snapshot(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)
    trainer(callbacks=[GradientMask(SPEC)], plugins=[plugin]).fit(model, loader())
    assert_frozen(model, initial)


class TwoOptimizerManual(TinyRegressor):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        return [
            torch.optim.AdamW(self.net[0].parameters(), lr=0.05),
            torch.optim.SGD(self.net[2].parameters(), lr=0.1, momentum=0.9, weight_decay=0.1),
        ]


def test_manual_optimization_with_two_optimizers():
    model = TwoOptimizerManual()
    initial = snapshot(model)
    trainer(callbacks=[GradientMask(SPEC)]).fit(model, loader())
    assert_frozen(model, initial)


def test_trainable_entries_train_as_without_the_callback():
    """Freezing a whole tensor with the callback equals excluding it from training."""
    masked = TinyRegressor(optimizer=OPTIMIZERS["adamw-default-decay"])
    trainer(callbacks=[GradientMask({"net.2.bias": False})]).fit(masked, loader())

    baseline = TinyRegressor(optimizer=lambda p: torch.optim.AdamW([q for q in p if q.requires_grad], lr=0.05))
    baseline.net[2].bias.requires_grad_(False)
    trainer().fit(baseline, loader())
    for name, value in snapshot(baseline).items():
        assert torch.equal(value, snapshot(masked)[name]), name


def test_all_true_mask_changes_nothing():
    masked, plain = TinyRegressor(), TinyRegressor()
    trainer(callbacks=[GradientMask({"re:.*": True})]).fit(masked, loader())
    trainer().fit(plain, loader())
    for name, value in snapshot(plain).items():
        assert torch.equal(value, snapshot(masked)[name]), name


def test_model_is_not_reparametrized(tmp_path):
    model = TinyRegressor()
    keys = list(model.state_dict())
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[GradientMask(SPEC), checkpoint], enable_checkpointing=True).fit(model, loader())
    assert list(model.state_dict()) == keys
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    clone = copy.deepcopy(model)
    assert torch.equal(clone.net[0].weight, model.net[0].weight)

    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert torch.equal(state["callbacks"][GradientMask(SPEC).state_key]["masks"]["net.0.weight"], EDGES)
    plain = TinyRegressor(seed=1)
    plain.load_state_dict(state["state_dict"])  # strict: the keys are the plain model's
    assert torch.equal(plain.net[0].weight, model.net[0].weight)


def test_resume_from_checkpoint_with_a_fresh_callback(tmp_path):
    model = TinyRegressor(optimizer=OPTIMIZERS["adam-l2"])
    initial = snapshot(model)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[GradientMask(SPEC), checkpoint], enable_checkpointing=True, max_epochs=2).fit(model, loader())

    resumed = TinyRegressor(optimizer=OPTIMIZERS["adam-l2"], seed=7)  # different init: the checkpoint decides
    fresh = GradientMask(SPEC)
    trainer(callbacks=[fresh], max_epochs=4).fit(resumed, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert_frozen(resumed, initial)


def test_resume_with_a_changed_spec_warns_and_applies_the_new_one(tmp_path):
    model = TinyRegressor()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[GradientMask(SPEC), checkpoint], enable_checkpointing=True, max_epochs=1).fit(model, loader())

    resumed = TinyRegressor()
    new_spec = {"net.0.weight": EDGES, "net.2.weight": False}
    with pytest.warns(UserWarning, match=r"differ from the spec.*'net.2.bias', 'net.2.weight'"):
        trainer(callbacks=[GradientMask(new_spec)], max_epochs=2).fit(resumed, loader(), ckpt_path=tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(resumed.net[2].weight, state["net.2.weight"])  # newly frozen: kept its checkpoint value
    assert not torch.equal(resumed.net[2].bias, state["net.2.bias"])  # no longer frozen: trained


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"net.0.weight": torch.ones(6, 8, dtype=torch.bool)}, "mask shape [6, 8] does not match parameter shape [8, 6]"),
        ({"net.0.wieght": True}, "closest names: 'net.0.weight'"),
        ({"re:encoder\\..*": True}, "matches no parameter"),
        ({"re:net\\.0\\..*": True, "net.0.bias": False}, "both claim parameter 'net.0.bias'"),
        ({"net.0.weight": torch.full((8, 6), 2.0)}, "only 0 and 1; found 2"),
        ({"net.2.weight": [(0, 8)]}, "coordinate (0, 8) is out of range for parameter shape [1, 8]"),
        ("missing-masks.safetensors", "does not exist"),
    ],
)
def test_bad_input_fails_at_setup_and_leaves_the_model_untouched(spec, message):
    model = TinyRegressor()
    before = snapshot(model)
    steps = []

    class CountSteps(Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    with pytest.raises(MaskSpecError, match=re.escape(message)):
        trainer(callbacks=[GradientMask(spec), CountSteps()]).fit(model, loader())
    assert not steps
    for name, value in snapshot(model).items():
        assert torch.equal(value, before[name])


def test_constructor_rejects_a_spec_of_the_wrong_type():
    with pytest.raises(MaskSpecError, match=r"GradientMask\(trainable=...\) must be a mapping"):
        GradientMask([("net.0.weight", True)])


def test_two_gradient_masks_are_refused():
    # one callback holds the masks a checkpoint restores; Lightning refuses a second stateful twin
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `GradientMask`"):
        trainer(callbacks=[GradientMask(SPEC), GradientMask(SPEC)])


def test_sharding_strategies_are_refused_with_what_to_use_instead():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    # FSDP cannot be built on a CPU-only Trainer, so the check gets the real strategy object alone
    on_fsdp = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(UnsupportedStrategyError, match=r"FSDPStrategy.*Use ModelParallelStrategy.*or strategy='ddp'"):
        GradientMask(SPEC).setup(on_fsdp, TinyRegressor(), "fit")


def test_logs_frozen_fraction_and_removed_gradient_norm(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    trainer(callbacks=[GradientMask(SPEC)], logger=logger, log_every_n_steps=1).fit(TinyRegressor(), loader())
    text = (Path(logger.log_dir) / "metrics.csv").read_text()
    header, *rows = text.strip().splitlines()
    columns = header.split(",")
    fraction = [r.split(",")[columns.index("gradient_mask/frozen_fraction")] for r in rows]
    removed = [r.split(",")[columns.index("gradient_mask/removed_grad_norm")] for r in rows]
    expected = (48 - int(EDGES.sum()) + 1) / 49
    assert [float(v) for v in fraction if v] == pytest.approx([expected] * 8)
    assert all(float(v) > 0 for v in removed if v) and sum(1 for v in removed if v) == 8


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_ranks_end_identical_with_exact_frozen_entries(tmp_path, strategy):
    run_script(REPO_ROOT / "tests" / "ddp" / "gradient_mask_ddp.py", strategy, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    mask = ranks[0]["mask"]
    for name in ranks[0]["final"]:
        assert torch.equal(ranks[0]["final"][name], ranks[1]["final"][name]), name
    final, initial = ranks[0]["final"], ranks[0]["initial"]
    assert torch.equal(final["net.0.weight"][~mask], initial["net.0.weight"][~mask])
    assert torch.equal(final["net.2.bias"], initial["net.2.bias"])
    assert (final["net.0.weight"][mask] != initial["net.0.weight"][mask]).all()


def test_ddp_refuses_masks_that_differ_between_ranks(tmp_path):
    with pytest.raises(AssertionError, match="GradientMask masks differ between processes"):
        run_script(REPO_ROOT / "tests" / "ddp" / "gradient_mask_ddp.py", "ddp", str(tmp_path), "--differing-masks")


def test_memory_held_per_masked_entry_is_the_documented_nine_bytes():
    # docs/gradient_mask.md: bool mask (1 byte) + integer keep pattern (4) + snapshot (4) per float32 entry;
    # peak RSS is measured by `benchmarks/gradient_mask_benchmark.py --memory`
    model = TinyRegressor()
    mask = GradientMask({"net.0.weight": torch.arange(48).reshape(8, 6) % 3 == 0})
    held: dict[int, int] = {}

    class Count(Callback):
        def on_train_end(self, trainer, pl_module):
            constraints = parameter_constraints(pl_module)
            tensors = list(mask.masks.values()) + list(constraints.trainable_masks().values())
            for entry in constraints.frozen._entries.values():
                tensors += [t for t in (entry.keep, entry.snapshot, entry.param_bits, entry.snapshot_bits) if t is not None]
            for t in tensors:
                storage = t.untyped_storage()
                if storage.data_ptr() != pl_module.net[0].weight.data_ptr():  # views of the weight itself
                    held[storage.data_ptr()] = storage.nbytes()

    trainer(callbacks=[mask, Count()], max_epochs=1).fit(model, loader())
    assert sum(held.values()) == 48 * 9


# --------------------------------------------------------------------------- sparse gradients


class BagOfTokens(TinyRegressor):
    """``nn.Embedding(sparse=True)`` (sparse COO gradients) -> mean over tokens -> Linear."""

    def __init__(self, optimizer=None) -> None:
        super().__init__(optimizer=optimizer or (lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9)))
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 4, sparse=True)
        self.net = torch.nn.Linear(4, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(self.emb(tokens).mean(dim=1))


def token_loader():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 8, (32, 3), generator=g)  # rows 8 and 9 never appear; repeats within a sample
    return loader(torch.utils.data.TensorDataset(tokens, torch.randn(32, 1, generator=g)), batch_size=8)


class RawGradients(Callback):
    """Listed before GradientMask: the embedding's gradient as backward left it, and as the optimizer gets it."""

    def __init__(self):
        self.raw, self.stepped = [], []

    def on_after_backward(self, trainer, pl_module):
        grad = pl_module.emb.weight.grad  # None once a parameter frozen whole skips autograd
        self.raw.append(None if grad is None else grad.to_dense().clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grad = pl_module.emb.weight.grad
        assert grad is None or grad.layout == torch.sparse_coo  # still sparse for the optimizer
        self.stepped.append(None if grad is None else grad.to_dense().clone())


@pytest.mark.parametrize("log", [False, True], ids=["no-logging", "logging"])
@pytest.mark.parametrize("fully_frozen", [False, True], ids=["partly-frozen", "fully-frozen"])
def test_sparse_embedding_gradients_keep_frozen_entries_exact(tmp_path, fully_frozen, log):
    trainable = torch.ones(10, 4, dtype=torch.bool)
    trainable[1::2, 1:] = False  # odd rows: only their first column trains
    trainable[2] = False  # a whole row frozen
    spec = {"emb.weight": False} if fully_frozen else {"emb.weight": trainable}
    frozen = torch.ones(10, 4, dtype=torch.bool) if fully_frozen else ~trainable
    model = BagOfTokens()
    initial = snapshot(model)
    probe = RawGradients()
    logger = CSVLogger(tmp_path, name="run") if log else False
    trainer(callbacks=[probe, GradientMask(spec)], logger=logger, log_every_n_steps=1).fit(model, token_loader())
    final = snapshot(model)
    assert torch.equal(final["emb.weight"][frozen], initial["emb.weight"][frozen])
    if not fully_frozen:
        seen = torch.zeros(10, 4, dtype=torch.bool)
        seen[:8] = True
        assert (final["emb.weight"] != initial["emb.weight"])[trainable & seen].all()
    assert not torch.equal(final["net.weight"], initial["net.weight"])
    if fully_frozen:  # frozen whole: like requires_grad_(False), the optimizer never gets a gradient
        assert all(stepped is None for stepped in probe.stepped) and len(probe.stepped) == 8
        probe.raw, probe.stepped = [], []
    for raw, stepped in zip(probe.raw, probe.stepped, strict=True):
        assert torch.equal(stepped[frozen], torch.zeros(int(frozen.sum())))
        # duplicate indices summed once (coalescing may sum them in another order than to_dense)
        torch.testing.assert_close(stepped[~frozen], raw[~frozen], rtol=1e-6, atol=0)
    if log:
        text = (Path(logger.log_dir) / "metrics.csv").read_text()
        header, *rows = text.strip().splitlines()
        column = header.split(",").index("gradient_mask/removed_grad_norm")
        logged = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
        expected = [0.0] * 8 if fully_frozen else [float(raw[frozen].norm()) for raw in probe.raw]
        assert logged == pytest.approx(expected, rel=1e-5) and len(logged) == 8


@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")  # inside torch's Adagrad
def test_sparse_embedding_with_adagrad_and_sparse_adam_keeps_frozen_entries_exact():
    trainable = torch.ones(10, 4, dtype=torch.bool)
    trainable[::2, :2] = False

    class TwoOptimizers(BagOfTokens):  # SparseAdam takes only sparse gradients: the Linear gets Adagrad
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def configure_optimizers(self):
            return [torch.optim.SparseAdam([self.emb.weight], lr=0.1), torch.optim.Adagrad(self.net.parameters(), lr=0.1)]

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            for optimizer in self.optimizers():
                optimizer.zero_grad()
            self.manual_backward(loss)
            for optimizer in self.optimizers():
                optimizer.step()

    for model in (BagOfTokens(optimizer=lambda p: torch.optim.Adagrad(p, lr=0.1)), TwoOptimizers()):
        initial = snapshot(model)
        trainer(callbacks=[GradientMask({"emb.weight": trainable})]).fit(model, token_loader())
        final = snapshot(model)
        assert torch.equal(final["emb.weight"][~trainable], initial["emb.weight"][~trainable])
        assert (final["emb.weight"] != initial["emb.weight"])[:8][trainable[:8]].all()


class WritesGradients(TinyRegressor):
    """Its own ``on_after_backward`` (which Lightning runs after every callback's) adds to every gradient;
    ``configure_gradient_clipping`` records what clipping gets, after every ``on_before_optimizer_step``."""

    def __init__(self) -> None:
        super().__init__(optimizer=lambda p: torch.optim.AdamW(p, lr=0.05))
        self.clipped: list[dict[str, torch.Tensor]] = []

    def on_after_backward(self) -> None:
        for param in self.parameters():
            if param.grad is not None:  # a parameter frozen whole has none
                param.grad.add_(1.0)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clipped.append({n: None if p.grad is None else p.grad.clone() for n, p in self.named_parameters()})


def test_gradients_written_by_the_module_on_after_backward_are_masked_before_clipping():
    model = WritesGradients()
    initial = snapshot(model)
    trainer(callbacks=[GradientMask(SPEC)]).fit(model, loader())
    assert len(model.clipped) == 8
    for grads in model.clipped:
        assert torch.equal(grads["net.0.weight"][~EDGES], torch.zeros(int((~EDGES).sum())))
        assert grads["net.2.bias"] is None  # frozen whole: no gradient, as with requires_grad_(False)
        assert (grads["net.0.weight"][EDGES] != 0).all()
    assert_frozen(model, initial)
