"""GradientNoise and WeightNoise through real Trainer.fit runs."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_gradmask.callbacks.gradient_mask import GradientMask
from lightning_gradmask.callbacks.gradient_noise import GradientNoise
from lightning_gradmask.callbacks.weight_noise import WeightNoise
from lightning_gradmask.errors import MaskSpecError, NoiseStdError
from lightning_gradmask.functional.noise import noise_for

from utils import FSDP2_RUNS_ON_CPU, FSDP2_SKIP_REASON, REPO_ROOT, TinyRegressor, loader, run_script, snapshot, trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
    "ignore:LightningCLI's args parameter",
)

SGD = lambda lr: (lambda p: torch.optim.SGD(p, lr=lr))  # noqa: E731


class GradProbe(Callback):
    """Records every gradient and the step index at on_before_optimizer_step (put it where it should look)."""

    def __init__(self):
        self.grads, self.steps = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(trainer.global_step)
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


class Recorder(TinyRegressor):
    """Records the weights each training / validation / test step sees."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = {"train": [], "val": [], "test": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append((self.trainer.global_step, snapshot(self)))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(snapshot(self))

    def test_step(self, batch, batch_idx):
        self.seen["test"].append(snapshot(self))


def expected_noise(targets, seed, step, std, stream):
    """``{name: std * noise}`` that a callback adds for ``targets`` (``{name: tensor}`` in parameter order)."""
    return {name: noise.mul_(std) for name, noise in zip(targets, noise_for(list(targets.values()), seed, step, stream=stream))}


# --------------------------------------------------------------------------- GradientNoise


def test_gradient_noise_once_per_step_on_unscaled_gradients_before_clipping():
    model = TinyRegressor(optimizer=SGD(1.0))
    initial = snapshot(model)
    before, after = GradProbe(), GradProbe()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)
    trainer(
        callbacks=[before, GradientNoise(std=100.0, seed=3), after],
        accumulate_grad_batches=2,
        gradient_clip_val=1e-3,
        plugins=[plugin],
        max_epochs=1,
    ).fit(model, loader())
    assert before.steps == after.steps == [0, 1]  # 4 micro-batches, 2 optimizer steps
    for k, step in enumerate(before.steps):
        noise = expected_noise(dict(model.named_parameters()), 3, step, 100.0, "gradient")
        for name in noise:
            # unscaled units: the noise is std * N(0, 1), not std * N(0, 1) / loss scale
            want = before.grads[k][name] + noise[name]
            assert torch.equal(after.grads[k][name], want), (name, step)
    # clipping came after the noise: each update has norm <= lr * clip value
    change = torch.cat([(snapshot(model)[n] - initial[n]).flatten() for n in initial]).norm()
    assert change <= 2 * 1e-3 * (1 + 1e-5)


EDGES = torch.zeros(8, 6, dtype=torch.bool)
EDGES[::2, 1::2] = True
MASK_SPEC = {"net.0.weight": EDGES, "net.2.bias": False}


def test_frozen_entries_never_receive_noise_whatever_the_callback_order():
    finals = []
    for mask_first in (True, False):
        model = TinyRegressor()
        initial = snapshot(model)
        probe = GradProbe()
        callbacks = [GradientMask(MASK_SPEC), GradientNoise(std=0.5)]
        callbacks = (callbacks if mask_first else callbacks[::-1]) + [probe]
        trainer(callbacks=callbacks, max_epochs=1).fit(model, loader())
        final = snapshot(model)
        assert torch.equal(final["net.0.weight"][~EDGES], initial["net.0.weight"][~EDGES])
        assert torch.equal(final["net.2.bias"], initial["net.2.bias"])
        assert (final["net.0.weight"][EDGES] != initial["net.0.weight"][EDGES]).all()
        for grads in probe.grads:  # what clipping and the optimizer see
            # net.2.bias is frozen whole: no gradient at all (requires_grad is off in the step, as after a manual freeze)
            assert not grads["net.0.weight"][~EDGES].any() and not grads.get("net.2.bias", torch.zeros(1)).any()
        finals.append(final)
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])  # same training either way


def test_annealed_std_is_logged_and_callable_std_respects_params():
    model = TinyRegressor()
    annealed = GradientNoise(eta=0.3, gamma=0.55)
    fit = trainer(callbacks=[annealed], max_epochs=1)
    fit.fit(model, loader())
    last = fit.global_step - 1
    assert annealed.last_std == pytest.approx(math.sqrt(0.3 / (1 + last) ** 0.55))
    assert fit.callback_metrics["gradient_noise/std"].item() == pytest.approx(annealed.last_std)

    model = TinyRegressor()
    before, after = GradProbe(), GradProbe()
    scheduled = GradientNoise(std=lambda t: 0.1 * (t + 1), params="re:net\\.0\\..*", seed=5)
    trainer(callbacks=[before, scheduled, after], max_epochs=1).fit(model, loader())
    assert scheduled.target_names == ["net.0.weight", "net.0.bias"]
    for k, step in enumerate(before.steps):
        targets = {n: p for n, p in model.named_parameters() if n.startswith("net.0")}
        noise = expected_noise(targets, 5, step, 0.1 * (step + 1), "gradient")
        for name, _ in model.named_parameters():
            want = before.grads[k][name] + noise[name] if name in noise else before.grads[k][name]
            assert torch.equal(after.grads[k][name], want), (name, step)


def test_offset_is_added_to_its_gradient():
    offset = torch.linspace(-1, 1, 48).reshape(8, 6)
    before, after = GradProbe(), GradProbe()
    callback = GradientNoise(offset={"net.0.weight": offset, "net.2.bias": [0.5]})
    trainer(callbacks=[before, callback, after], max_epochs=1).fit(TinyRegressor(), loader())
    assert callback.last_std is None
    for b, a in zip(before.grads, after.grads):
        assert torch.equal(a["net.0.weight"], b["net.0.weight"] + offset)
        assert torch.equal(a["net.2.bias"], b["net.2.bias"] + 0.5)
        assert torch.equal(a["net.2.weight"], b["net.2.weight"])


def test_schedule_going_bad_mid_training_names_the_step():
    callback = GradientNoise(std=lambda t: 0.1 if t < 2 else float("nan"))
    with pytest.raises(NoiseStdError, match="at optimizer step 2 is NaN"):
        trainer(callbacks=[callback], max_epochs=1).fit(TinyRegressor(), loader())


class TwoOptimizerManual(TinyRegressor):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(snapshot(self))
        first, second = self.optimizers()
        x, y = batch
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(F.mse_loss(self(x), y))
        first.step()
        second.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.0), torch.optim.SGD(self.net[2].parameters(), lr=0.0)]


def test_manual_optimization_with_two_optimizers():
    model = TwoOptimizerManual()
    initial = snapshot(model)
    before, after = GradProbe(), GradProbe()
    weight_noise = WeightNoise(std=0.1)
    callbacks = [before, GradientNoise(std=0.5, seed=1), weight_noise, after]
    trainer(callbacks=callbacks, max_epochs=1).fit(model, loader())
    assert before.steps == list(range(8))  # each optimizer.step() is one step
    for k, step in enumerate(before.steps):
        stepped = ("net.0.",) if k % 2 == 0 else ("net.2.",)  # only the stepping optimizer's parameters
        noise = expected_noise(dict(model.named_parameters()), 1, step, 0.5, "gradient")  # drawn for every target
        for name in noise:
            want = before.grads[k][name] + noise[name] if name.startswith(stepped) else before.grads[k][name]
            assert torch.equal(after.grads[k][name], want), (name, step)
    # WeightNoise: perturbed during each forward, clean weights back, bit-identical with lr=0
    assert all(not torch.equal(seen["net.0.weight"], initial["net.0.weight"]) for seen in model.seen)
    assert all(torch.equal(v, initial[n]) for n, v in snapshot(model).items())


# --------------------------------------------------------------------------- WeightNoise


def test_weight_noise_one_draw_per_window_clean_weights_outside_training():
    model = Recorder(optimizer=SGD(0.0))
    initial = snapshot(model)
    callback = WeightNoise(std=0.05, relative=True, seed=4)
    fit = trainer(callbacks=[callback], accumulate_grad_batches=2, max_epochs=2, val_check_interval=3, limit_val_batches=1)
    fit.fit(model, loader(), loader())
    fit.test(model, loader(), verbose=False)
    assert callback.target_names == ["net.0.weight", "net.2.weight"]
    train = model.seen["train"]
    assert [step for step, _ in train] == [0, 0, 1, 1, 2, 2, 3, 3]
    for step, weights in train:  # w + std * |w| * N(0, 1) on the weights, biases untouched
        noise = expected_noise({n: initial[n] for n in ("net.0.weight", "net.2.weight")}, 4, step, 0.05, "weight")
        for name in noise:
            clean = initial[name]
            want = clean + noise[name].mul_(clean.abs())
            assert torch.equal(weights[name], want), (name, step)
        assert torch.equal(weights["net.0.bias"], initial["net.0.bias"])
    # validation after batch 3 (mid-window), at epoch ends, and test: all clean
    assert len(model.seen["val"]) >= 3 and model.seen["test"]
    for weights in model.seen["val"] + model.seen["test"]:
        assert all(torch.equal(weights[n], initial[n]) for n in initial)
    # learning rate 0: the weights come back bit-identical
    assert all(torch.equal(v, initial[n]) for n, v in snapshot(model).items())
    assert not callback.perturbed


def test_gradient_is_taken_at_the_perturbed_point_and_applied_to_the_clean_weights():
    class StepRecorder(Recorder):
        def on_before_optimizer_step(self, optimizer):  # runs after the callbacks' hooks
            self.grads = {n: p.grad.clone() for n, p in self.named_parameters()}
            self.clean = snapshot(self)

    model = StepRecorder(optimizer=SGD(0.1))
    reference = copy.deepcopy(model.net)
    trainer(callbacks=[WeightNoise(std=0.2)], max_epochs=1, limit_train_batches=1).fit(model, loader())
    _, perturbed = model.seen["train"][0]
    assert not torch.equal(perturbed["net.0.weight"], model.clean["net.0.weight"])
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(perturbed["net." + name])
    x, y = next(iter(loader()))
    F.mse_loss(reference(x), y).backward()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(model.grads["net." + name], param.grad, rtol=1e-6, atol=1e-7)
    for name, value in snapshot(model).items():
        assert torch.equal(value, model.clean[name].add(model.grads[name], alpha=-0.1)), name


def test_weight_noise_respects_frozen_and_severed_entries():
    model = Recorder(optimizer=lambda p: torch.optim.AdamW(p, lr=0.05))
    with torch.no_grad():
        model.net[0].weight[:, 2] = 0.0  # a severed input column: zero and frozen
    initial = snapshot(model)
    trainable = torch.ones(8, 6, dtype=torch.bool)
    trainable[:, 2] = False
    trainable[0] = False
    callbacks = [WeightNoise(std=0.5, params=nn.Linear), GradientMask({"net.0.weight": trainable})]
    trainer(callbacks=callbacks, max_epochs=1).fit(model, loader())
    for _, seen in model.seen["train"]:
        assert torch.equal(seen["net.0.weight"][~trainable], initial["net.0.weight"][~trainable])
        assert (seen["net.0.weight"][trainable] != initial["net.0.weight"][trainable]).any()
    final = model.net[0].weight.detach()
    assert torch.equal(final[:, 2], torch.zeros(8)) and torch.equal(final[0], initial["net.0.weight"][0])


def test_severed_columns_of_blinding_stay_exactly_zero_under_both_noises():
    blinding = pytest.importorskip("lightning_gradmask.callbacks.sensitive_column_blinding")
    model = Recorder(optimizer=lambda p: torch.optim.AdamW(p, lr=0.05))
    callbacks = [WeightNoise(std=0.5), GradientNoise(std=0.5), blinding.SensitiveColumnBlinding(columns=[2])]
    trainer(callbacks=callbacks, max_epochs=1).fit(model, loader())
    for _, seen in model.seen["train"]:
        assert torch.equal(seen["net.0.weight"][:, 2], torch.zeros(8))
    assert torch.equal(model.net[0].weight.detach()[:, 2], torch.zeros(8))


def test_checkpoints_hold_clean_weights_even_when_saved_mid_window(tmp_path):
    class SavesMidWindow(Recorder):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:  # second micro-batch of the first window: weights hold noise
                self.live = snapshot(self)
                self.trainer.save_checkpoint(tmp_path / "full.ckpt")
                self.trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
                self.state = {k: v.clone() for k, v in self.state_dict().items()}
            return super().training_step(batch, batch_idx)

    model = SavesMidWindow(optimizer=SGD(0.0))
    initial = snapshot(model)
    trainer(callbacks=[WeightNoise(std=0.1)], accumulate_grad_batches=2, max_epochs=1).fit(model, loader())
    assert not torch.equal(model.live["net.0.weight"], initial["net.0.weight"])
    for state in (
        torch.load(tmp_path / "full.ckpt", weights_only=True)["state_dict"],
        torch.load(tmp_path / "weights.ckpt", weights_only=True)["state_dict"],
        model.state,
    ):
        assert all(torch.equal(state[n], initial[n]) for n in initial)
    assert all(torch.equal(v, initial[n]) for n, v in snapshot(model).items())  # training went on


def test_weights_are_clean_after_an_exception_mid_window():
    class Fails(TinyRegressor):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Fails()
    initial = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(callbacks=[WeightNoise(std=0.1)], accumulate_grad_batches=2).fit(model, loader())
    assert all(torch.equal(v, initial[n]) for n, v in snapshot(model).items())


def test_weights_are_clean_when_an_epoch_ends_mid_window():
    class StopsEpochEarly(TinyRegressor):
        def on_train_batch_start(self, batch, batch_idx):
            self.saw_noise = not torch.equal(self.net[0].weight, initial["net.0.weight"])
            return -1 if batch_idx == 1 else None  # ends the epoch inside the first window

        def on_train_epoch_end(self):
            self.at_epoch_end = snapshot(self)

    model = StopsEpochEarly()
    initial = snapshot(model)
    trainer(callbacks=[WeightNoise(std=0.1)], accumulate_grad_batches=2, max_epochs=1).fit(model, loader())
    assert model.saw_noise
    assert all(torch.equal(model.at_epoch_end[n], initial[n]) for n in initial)


# --------------------------------------------------------------------------- both


def fit_final(gradient_seed, weight_seed, epochs=2, ckpt=None, save=None, precision="32-true"):
    model = TinyRegressor(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    callbacks = [GradientNoise(std=0.05, seed=gradient_seed), WeightNoise(std=0.1, relative=True, seed=weight_seed)]
    fit = trainer(callbacks=callbacks, accumulate_grad_batches=2, max_epochs=epochs, precision=precision)
    fit.fit(model, loader(), ckpt_path=ckpt)
    if save is not None:
        fit.save_checkpoint(save)
    return model, snapshot(model)


def test_same_seed_same_result_other_seed_other_result():
    _, reference = fit_final(0, 0)
    for seeds, same in (((0, 0), True), ((1, 0), False), ((0, 1), False)):
        _, final = fit_final(*seeds)
        assert all(torch.equal(final[n], reference[n]) for n in final) is same, seeds


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    _, uninterrupted = fit_final(0, 0, epochs=2)
    fit_final(0, 0, epochs=1, save=tmp_path / "epoch1.ckpt")
    _, resumed = fit_final(0, 0, epochs=2, ckpt=tmp_path / "epoch1.ckpt")
    assert all(torch.equal(resumed[n], uninterrupted[n]) for n in resumed)


def test_bf16_mixed_keeps_fp32_parameters():
    model, final = fit_final(0, 0, epochs=1, precision="bf16-mixed")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(v).all() for v in final.values())


BAD_AT_SETUP = {
    "gradient-nan-schedule": (lambda: GradientNoise(std=lambda t: float("nan")), NoiseStdError, "step 0 is NaN"),
    "gradient-negative-schedule": (lambda: GradientNoise(std=lambda t: -1.0), NoiseStdError, "step 0 is negative"),
    "gradient-params-match-nothing": (
        lambda: GradientNoise(std=0.1, params=["net.0.weight", "re:encoder\\..*"]),
        MaskSpecError,
        "matches no parameter",
    ),
    "offset-wrong-shape": (
        lambda: GradientNoise(offset={"net.0.weight": torch.zeros(6, 8)}),
        MaskSpecError,
        r"offset shape \[6, 8\] does not match parameter shape \[8, 6\]",
    ),
    "offset-unknown-parameter": (
        lambda: GradientNoise(offset={"net.0.wieght": torch.zeros(8, 6)}),
        MaskSpecError,
        "no parameter of that name; closest names: 'net.0.weight'",
    ),
    "weight-modules-match-nothing": (
        lambda: WeightNoise(std=0.1, params=nn.Conv2d),
        ValueError,
        "no module of type Conv2d .*Linear",
    ),
    "weight-no-such-parameter": (
        lambda: WeightNoise(std=0.1, params="net.0.gamma"),
        MaskSpecError,
        "no parameter of that name; closest names: .*'net.0.weight'",
    ),
    "weight-nan-schedule": (lambda: WeightNoise(std=lambda t: float("nan")), NoiseStdError, "step 0 is NaN"),
}


@pytest.mark.parametrize("case", BAD_AT_SETUP.values(), ids=BAD_AT_SETUP.keys())
def test_bad_input_fails_at_setup_and_leaves_the_model_untouched(case):
    make, error, message = case
    model = TinyRegressor()
    initial = snapshot(model)
    with pytest.raises(error, match=message):
        trainer(callbacks=[make()]).fit(model, loader())
    assert all(torch.equal(v, initial[n]) for n, v in snapshot(model).items())


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: GradientNoise(std=-1e-3), NoiseStdError, "negative"),
        (lambda: GradientNoise(), ValueError, "give std"),
        (lambda: GradientNoise(std=0.1, eta=0.1), ValueError, "not both"),
        (lambda: GradientNoise(offset={"net.0.weight": torch.zeros(8, 6)}, seed=1.5), TypeError, "seed"),
        (lambda: WeightNoise(std=-0.1), NoiseStdError, "negative"),
        (lambda: WeightNoise(std=0.1, params=[int]), TypeError, "an nn.Module subclass"),
    ],
)
def test_bad_arguments_fail_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_two_noise_callbacks_with_the_same_seed_are_refused():
    with pytest.raises(ValueError, match="two GradientNoise callbacks use seed=0"):
        trainer(callbacks=[GradientNoise(std=0.1), GradientNoise(eta=0.1, params="net.0.weight")]).fit(TinyRegressor(), loader())


@pytest.mark.parametrize("kind", [GradientNoise, WeightNoise])
def test_two_noise_callbacks_with_the_same_seed_and_params_get_the_documented_error(kind):
    # same seed and params: Lightning would refuse the equal state keys with a RuntimeError first
    callbacks = [kind(std=0.1, seed=4), kind(std=0.2, seed=4)]
    with pytest.raises(ValueError, match=f"two {kind.__name__} callbacks use seed=4"):
        trainer(callbacks=callbacks).fit(TinyRegressor(), loader())


_WRITE_NOISE_CHECKPOINT = """
import sys
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_gradmask import GradientNoise
from utils import TinyRegressor, loader, trainer

noise = GradientNoise(std=0.1, seed=2)
print("KEY=" + noise.state_key)
checkpoint = ModelCheckpoint(dirpath=sys.argv[1], filename="noise", save_last=False)
trainer(max_epochs=1, callbacks=[noise, checkpoint], enable_checkpointing=True).fit(TinyRegressor(), loader())
"""


def test_noise_checkpoint_key_does_not_depend_on_other_instances_in_the_process(tmp_path):
    # a checkpoint written by a fresh process, where this GradientNoise was the only one
    script = tmp_path / "write_noise_checkpoint.py"
    script.write_text(_WRITE_NOISE_CHECKPOINT)
    written = run_script(script, str(tmp_path))
    fresh_key = next(line[4:] for line in written.stdout.splitlines() if line.startswith("KEY="))
    saved = torch.load(tmp_path / "noise.ckpt", weights_only=False)
    assert fresh_key in saved["callbacks"]
    # here, identical instances already live in the process (a notebook that built them before)
    strays = [GradientNoise(std=0.1, seed=2), GradientNoise(std=0.1, seed=2)]
    noise = GradientNoise(std=0.1, seed=2)
    loaded = []
    noise.load_state_dict = loaded.append  # type: ignore[method-assign]
    model = TinyRegressor()
    resumed = trainer(max_epochs=2, callbacks=[noise])
    resumed.fit(model, loader(), ckpt_path=str(tmp_path / "noise.ckpt"))
    assert loaded == [{"seed": 2}]  # Lightning found the entry under the key of this process
    assert noise.state_key == fresh_key
    assert resumed.global_step == 8
    assert len(strays) == 2


def test_twin_noise_callbacks_are_still_refused_after_one_of_them_has_trained():
    first = GradientNoise(std=0.1, seed=6)
    trainer(max_epochs=1, callbacks=[first]).fit(TinyRegressor(), loader())
    with pytest.raises(ValueError, match="two GradientNoise callbacks use seed=6"):
        trainer(callbacks=[first, GradientNoise(std=0.1, seed=6)]).fit(TinyRegressor(), loader())


def test_params_selects_by_pattern():
    callback = WeightNoise(std=0.1, params="re:net\\.2\\.weight")
    trainer(callbacks=[callback], max_steps=1).fit(TinyRegressor(), loader())
    assert callback.target_names == ["net.2.weight"]


def test_yaml_config_builds_both_callbacks(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  callbacks:
    - class_path: lightning_gradmask.callbacks.gradient_noise.GradientNoise
      init_args: {eta: 0.3, gamma: 0.55, params: ["re:net\\\\.0\\\\..*"], seed: 7}
    - class_path: lightning_gradmask.callbacks.weight_noise.WeightNoise
      init_args: {std: 0.01, params: ["re:net\\\\.[02]\\\\..*"], relative: true}
"""
    )
    cli = LightningCLI(TinyRegressor, run=False, args=["--config", str(config)], save_config_callback=None)
    gradient, weight = [cb for cb in cli.trainer.callbacks if isinstance(cb, (GradientNoise, WeightNoise))]
    assert gradient.params == ["re:net\\.0\\..*"] and gradient.seed == 7
    assert weight.params == ["re:net\\.[02]\\..*"] and weight.relative


def test_ddp_ranks_draw_the_same_noise_and_end_identical(tmp_path):
    run_script(REPO_ROOT / "tests" / "ddp" / "noise_ddp.py", str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("final", "perturbed", "noised_grads"):
        assert rank0[key].keys() == rank1[key].keys()
        assert all(torch.equal(rank0[key][n], rank1[key][n]) for n in rank0[key]), key
    # the noise was really there and the data differed between ranks
    assert not torch.equal(rank0["perturbed"]["net.0.weight"], rank0["initial"]["net.0.weight"])
    assert rank0["first_loss"] != rank1["first_loss"]
    assert not torch.equal(rank0["final"]["net.0.weight"], rank0["initial"]["net.0.weight"])


@pytest.mark.skipif(not FSDP2_RUNS_ON_CPU, reason=FSDP2_SKIP_REASON)
def test_fsdp2_run_adds_the_noise_of_the_ddp_run(tmp_path):
    # the same model, data and seeds under strategy="ddp" and under ModelParallelStrategy (FSDP2, fully_shard)
    run_script(REPO_ROOT / "tests" / "ddp" / "noise_fsdp.py", str(tmp_path))
    ddp, fsdp, fsdp1 = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("ddp_rank0", "fsdp_rank0", "fsdp_rank1"))
    names = list(ddp["final"])
    for name in names:
        # the weight noise is computed from the same weights, entry by entry: the same bits on the shards
        assert torch.equal(fsdp["initial"][name], ddp["initial"][name]), name
        assert torch.equal(fsdp["perturbed"][name], ddp["perturbed"][name]), name
        # a state dict taken while the weights hold noise holds the clean ones (DTensors under FSDP2)
        for run in (ddp, fsdp):
            assert torch.equal(run["state_while_perturbed"][name], run["initial"][name]), name
        # the gradient noise comes on top of a gradient reduced another way: float tolerance
        torch.testing.assert_close(fsdp["noised_grads"][name], ddp["noised_grads"][name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fsdp["final"][name], ddp["final"][name], rtol=1e-5, atol=1e-5)
        assert torch.equal(fsdp["final"][name], fsdp1["final"][name]), name  # ranks hold the same whole weights
    # both runs added the documented gradient noise (std 0.05, far above the tolerance) and the offset at step 0
    noise = expected_noise(ddp["initial"], 1, 0, 0.05, "gradient")
    noise["net.2.bias"] += 0.25
    for run in (ddp, fsdp):
        for name in names:
            added = run["noised_grads"][name] - run["clean_grads"][name]
            torch.testing.assert_close(added, noise[name], rtol=0, atol=1e-6)
    assert not torch.equal(ddp["perturbed"]["net.0.weight"], ddp["initial"]["net.0.weight"])
    assert not torch.equal(ddp["final"]["net.0.weight"], ddp["initial"]["net.0.weight"])
