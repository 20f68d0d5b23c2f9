"""GradientMask(compact=True): the optimizer holds only the trainable entries; frozen ones stay exact."""

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from test_gradient_mask import EDGES, OPTIMIZERS, SPEC, TwoOptimizerManual, assert_frozen

from lightning_gradmask import GradientMask, GradientNoise
from lightning_gradmask.errors import GradmaskConfigError
from lightning_gradmask.functional.compact import CompactEntries

from utils import REPO_ROOT, TinyRegressor, loader, run_script, snapshot, trainer

TRAINABLE = int(EDGES.sum())


class StateProbe(Callback):
    """Records, during training, what the optimizer holds for net.0.weight's place and its dense gradient."""

    def __init__(self):
        self.state_sizes, self.param_shapes, self.dense_grads = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.dense_grads.append(pl_module.net[0].weight.grad)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        first = optimizer.param_groups[0]["params"][0]
        self.param_shapes.append(tuple(first.shape))
        state = optimizer.state.get(first, {})
        self.state_sizes.append({k: v.numel() for k, v in state.items() if torch.is_tensor(v) and v.dim()})


@pytest.mark.parametrize("optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_frozen_entries_are_exact_and_the_optimizer_holds_only_trainable_entries(optimizer):
    model = TinyRegressor(optimizer=optimizer)
    initial = snapshot(model)
    probe = StateProbe()
    fit = trainer(callbacks=[GradientMask(SPEC, compact=True), probe])
    fit.fit(model, loader())
    assert_frozen(model, initial)
    assert set(probe.param_shapes) == {(TRAINABLE,)}
    assert all(size == TRAINABLE for sizes in probe.state_sizes for size in sizes.values())
    assert probe.dense_grads and all(g is None for g in probe.dense_grads), "dense gradients are freed once gathered"
    # after fit the user's optimizer holds the parameter again, its state re-expanded (zeros at frozen entries)
    optimizer = fit.optimizers[0]
    assert optimizer.param_groups[0]["params"][0] is model.net[0].weight
    for value in optimizer.state[model.net[0].weight].values():
        if torch.is_tensor(value) and value.dim():
            assert value.shape == EDGES.shape and not value[~EDGES].any()


@pytest.mark.parametrize("name", ["sgd-momentum-nesterov-decay", "adamw-default-decay"])
def test_compact_training_equals_dense_masking_bit_for_bit(name):
    dense, compact = TinyRegressor(optimizer=OPTIMIZERS[name]), TinyRegressor(optimizer=OPTIMIZERS[name])
    trainer(callbacks=[GradientMask(SPEC)]).fit(dense, loader())
    trainer(callbacks=[GradientMask(SPEC, compact=True)]).fit(compact, loader())
    for key, value in snapshot(dense).items():
        assert torch.equal(value, snapshot(compact)[key]), key


def test_accumulation_and_clipping_over_the_trainable_entries():
    dense, compact = (TinyRegressor(optimizer=OPTIMIZERS["adamw-default-decay"]) for _ in range(2))
    initial = snapshot(compact)
    options = dict(accumulate_grad_batches=2, gradient_clip_val=0.01)
    trainer(callbacks=[GradientMask(SPEC)], **options).fit(dense, loader())
    trainer(callbacks=[GradientMask(SPEC, compact=True)], **options).fit(compact, loader())
    assert_frozen(compact, initial)
    for key, value in snapshot(dense).items():  # the clipping norm sums in another order
        torch.testing.assert_close(value, snapshot(compact)[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-grad-scaler"])
def test_mixed_precision(precision):
    model = TinyRegressor(optimizer=OPTIMIZERS["sgd-momentum-nesterov-decay"])
    initial = snapshot(model)
    if precision == "fp16-grad-scaler":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        options = {"plugins": [MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)]}
    else:
        options = {"precision": precision}
    trainer(callbacks=[GradientMask(SPEC, compact=True)], **options).fit(model, loader())
    assert_frozen(model, initial)


def test_manual_optimization_with_two_optimizers():
    model = TwoOptimizerManual()
    initial = snapshot(model)
    trainer(callbacks=[GradientMask(SPEC, compact=True)]).fit(model, loader())
    assert_frozen(model, initial)


def test_resume_with_a_fresh_callback_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    whole = TinyRegressor(optimizer=OPTIMIZERS["adam-l2"])
    trainer(callbacks=[GradientMask(SPEC, compact=True)], max_epochs=4).fit(whole, loader())

    first = TinyRegressor(optimizer=OPTIMIZERS["adam-l2"])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(
        callbacks=[GradientMask(SPEC, compact=True), checkpoint], enable_checkpointing=True, max_epochs=2
    ).fit(first, loader())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["optimizer_states"][0]["state"][0]
    assert saved["exp_avg"].shape == (TRAINABLE,), "the checkpoint holds the compact optimizer state"

    resumed = TinyRegressor(optimizer=OPTIMIZERS["adam-l2"], seed=7)  # different init: the checkpoint decides
    trainer(callbacks=[GradientMask(SPEC, compact=True)], max_epochs=4).fit(
        resumed, loader(), ckpt_path=tmp_path / "last.ckpt"
    )
    for key, value in snapshot(whole).items():
        assert torch.equal(value, snapshot(resumed)[key]), key


def test_model_is_not_reparametrized_and_the_optimizer_is_restored_after_an_exception():
    class Boom(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")

    model = TinyRegressor()
    keys, initial = list(model.state_dict()), snapshot(model)
    fit = trainer(callbacks=[GradientMask(SPEC, compact=True), Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        fit.fit(model, loader())
    assert list(model.state_dict()) == keys and all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert [p for group in fit.optimizers[0].param_groups for p in group["params"]] == list(model.parameters())
    assert torch.equal(copy.deepcopy(model).net[0].weight[~EDGES], initial["net.0.weight"][~EDGES])


class SharedParameter(TwoOptimizerManual):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD([self.net[0].weight], lr=0.1)]


@pytest.mark.parametrize(
    "model, callbacks, message",
    [
        (lambda: TinyRegressor(optimizer=lambda p: torch.optim.LBFGS(p)), [], "LBFGS"),
        (TinyRegressor, [GradientNoise(std=0.1)], "GradientNoise"),
        (SharedParameter, [], "'net.0.weight' is in 2 optimizer parameter groups"),
    ],
    ids=["lbfgs", "gradient-noise", "two-optimizers"],
)
def test_unsupported_combinations_fail_before_the_first_step(model, callbacks, message):
    module = model()
    initial = snapshot(module)
    with pytest.raises(GradmaskConfigError, match=message):
        trainer(callbacks=[GradientMask(SPEC, compact=True), *callbacks]).fit(module, loader())
    for key, value in initial.items():
        assert torch.equal(value, snapshot(module)[key]), key


def test_compact_argument_is_checked():
    with pytest.raises(GradmaskConfigError, match="compact"):
        GradientMask(SPEC, compact="yes")


def test_compact_entries_without_lightning():
    layer = torch.nn.Linear(4, 3)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    before = layer.weight.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.5)
    entries = CompactEntries({"weight": (layer.weight, mask)})
    entries.swap_in([opt])
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(2, 4)).sum().backward()
        entries.gather_grads_()
        entries.refresh_()
        opt.step()
        entries.scatter_()
    assert torch.equal(layer.weight[~mask], before[~mask]) and (layer.weight[mask] != before[mask]).all()
    entries.swap_out()
    assert opt.param_groups[0]["params"][0] is layer.weight


def test_ddp_with_accumulation_matches_the_dense_mask(tmp_path):
    script = REPO_ROOT / "tests" / "ddp" / "gradient_mask_ddp.py"
    (tmp_path / "dense").mkdir()
    (tmp_path / "compact").mkdir()
    run_script(script, "ddp", str(tmp_path / "dense"), "--accumulate")
    run_script(script, "ddp", str(tmp_path / "compact"), "--accumulate", "--compact")
    dense = [torch.load(tmp_path / "dense" / f"rank{r}.pt") for r in (0, 1)]
    compact = [torch.load(tmp_path / "compact" / f"rank{r}.pt") for r in (0, 1)]
    mask = compact[0]["mask"]
    final, initial = compact[0]["final"], compact[0]["initial"]
    assert torch.equal(final["net.0.weight"][~mask], initial["net.0.weight"][~mask])
    for name in final:
        assert torch.equal(compact[1]["final"][name], final[name]), name
        assert torch.equal(dense[0]["final"][name], final[name]), name


@pytest.mark.parametrize("deterministic", [False, True])
def test_write_back_is_bit_exact_for_special_values_and_non_contiguous_parameters(deterministic):
    torch.use_deterministic_algorithms(deterministic)  # (put_ has no deterministic kernel; the conftest restores)
    for weight in (torch.randn(5, 4), torch.randn(4, 5).T):  # contiguous, and a transposed view
        param = torch.nn.Parameter(weight)
        mask = torch.zeros(5, 4, dtype=torch.bool)
        mask[::2] = True
        entries = CompactEntries({"w": (param, mask)})
        before = param.detach().clone()
        values = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf"), 1e-45] + [2.0] * 7)
        entries.compact("w").data.copy_(values)
        entries.scatter_()
        assert torch.equal(param.detach()[mask].view(torch.int32), values.view(torch.int32))
        assert torch.equal(param.detach()[~mask], before[~mask])


def test_compact_mode_trains_under_deterministic_algorithms():
    model = TinyRegressor()
    initial = snapshot(model)
    trainer(callbacks=[GradientMask(SPEC, compact=True)], deterministic=True).fit(model, loader())
    assert_frozen(model, initial)


class HeadFirst(TinyRegressor):
    """Trains only net.2 at first; net.0 joins the optimizer at the second epoch (as BackboneFinetuning does)."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net[2].parameters(), lr=0.05)

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            self.optimizers().optimizer.add_param_group({"params": list(self.net[0].parameters())})


def test_a_masked_parameter_added_to_the_optimizer_later_stays_exact():
    model = HeadFirst()
    initial = snapshot(model)
    trainer(callbacks=[GradientMask(SPEC, compact=True)]).fit(model, loader())
    assert_frozen(model, initial)  # net.0.weight: the dense mechanism keeps its frozen entries


def test_hessian_monitor_sees_the_same_masks_as_in_the_dense_mode():
    from lightning_gradmask import HessianMonitor

    def loss(module, batch):
        return torch.nn.functional.mse_loss(module(batch[0]), batch[1])

    results = []
    for compact in (False, True):
        monitor = HessianMonitor(loss, stats=("trace", "eigenvalues"), max_overhead=None)
        trainer(callbacks=[GradientMask(SPEC, compact=compact), monitor], max_epochs=1).fit(TinyRegressor(), loader())
        results.append(monitor.latest)
    assert results[0].trace.trace == results[1].trace.trace and torch.equal(results[0].eigen.eigenvalues, results[1].eigen.eigenvalues)


def logged(tmp_path, compact, key):
    from pathlib import Path

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name=f"compact{compact}")
    trainer(callbacks=[GradientMask(SPEC, compact=compact)], logger=logger, log_every_n_steps=1).fit(
        TinyRegressor(), loader()
    )
    header, *rows = (Path(logger.log_dir) / "metrics.csv").read_text().strip().splitlines()
    column = header.split(",").index(key)
    return [float(v) for v in (r.split(",")[column] for r in rows) if v]


def test_removed_gradient_norm_is_logged_as_in_the_dense_mode(tmp_path):
    dense = logged(tmp_path, False, "gradient_mask/removed_grad_norm")
    compact = logged(tmp_path, True, "gradient_mask/removed_grad_norm")
    assert len(compact) == 8 and all(v > 0 for v in compact)
    assert compact == pytest.approx(dense, rel=1e-4)


def test_a_dense_checkpoint_resumes_into_compact_mode_with_its_state_gathered(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = TinyRegressor(optimizer=OPTIMIZERS["adam-l2"])
    trainer(callbacks=[GradientMask(SPEC), checkpoint], enable_checkpointing=True, max_epochs=2).fit(first, loader())
    dense_whole = TinyRegressor(optimizer=OPTIMIZERS["adam-l2"], seed=7)
    trainer(callbacks=[GradientMask(SPEC)], max_epochs=4).fit(dense_whole, loader(), ckpt_path=tmp_path / "last.ckpt")
    compact_resumed = TinyRegressor(optimizer=OPTIMIZERS["adam-l2"], seed=7)
    trainer(callbacks=[GradientMask(SPEC, compact=True)], max_epochs=4).fit(
        compact_resumed, loader(), ckpt_path=tmp_path / "last.ckpt"
    )
    for key, value in snapshot(dense_whole).items():
        assert torch.equal(value, snapshot(compact_resumed)[key]), key


def test_a_compact_checkpoint_resumes_densely_with_its_state_expanded(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = TinyRegressor(optimizer=OPTIMIZERS["adam-l2"])
    trainer(
        callbacks=[GradientMask(SPEC, compact=True), checkpoint], enable_checkpointing=True, max_epochs=2
    ).fit(first, loader())
    compact_whole = TinyRegressor(optimizer=OPTIMIZERS["adam-l2"], seed=7)
    trainer(callbacks=[GradientMask(SPEC, compact=True)], max_epochs=4).fit(
        compact_whole, loader(), ckpt_path=tmp_path / "last.ckpt"
    )
    dense_resumed = TinyRegressor(optimizer=OPTIMIZERS["adam-l2"], seed=7)
    trainer(callbacks=[GradientMask(SPEC)], max_epochs=4).fit(dense_resumed, loader(), ckpt_path=tmp_path / "last.ckpt")
    for key, value in snapshot(compact_whole).items():
        assert torch.equal(value, snapshot(dense_resumed)[key]), key


def test_write_back_over_several_slices_is_exact_and_leaves_frozen_entries_alone():
    # more trainable entries than one write-back slice (65,536), int32 positions widened slice by slice
    param = torch.nn.Parameter(torch.randn(400, 400))
    mask = torch.rand(400, 400, generator=torch.Generator().manual_seed(3)) < 0.6
    entries = CompactEntries({"w": (param, mask)})
    before = param.detach().clone()
    values = torch.randn(int(mask.sum()))
    entries.compact("w").data.copy_(values)
    entries.scatter_()
    assert int(mask.sum()) > 65_536
    assert torch.equal(param.detach()[mask], values) and torch.equal(param.detach()[~mask], before[~mask])


def test_frozen_gradient_norm_is_the_norm_of_the_dropped_entries():
    param = torch.nn.Parameter(torch.zeros(300, 300))
    mask = torch.rand(300, 300, generator=torch.Generator().manual_seed(4)) < 0.3
    entries = CompactEntries({"w": (param, mask)})
    param.grad = torch.randn(300, 300)
    expected = torch.linalg.vector_norm(param.grad[~mask].double())
    torch.testing.assert_close(entries.frozen_grad_norm(param), expected, rtol=1e-9, atol=0)
    entries.gather_grad_(param)
    assert entries.frozen_grad_norm(param) is None  # the dense gradient is gone once gathered
