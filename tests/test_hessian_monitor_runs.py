"""HessianMonitor left on in real runs: it never ends one, costs what the user allows, changes no
random stream, tracks sharpness every n steps, and reports to every logger in a directory of its own."""

import contextlib
import csv
import math
import random
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradmask import HessianMonitor
from lightning_gradmask.callbacks._hessian_output import density_figure
from lightning_gradmask.curvature import StatisticsOptions

from reference import reference_hessian
from utils import TinyRegressor, loader, regression_data, snapshot, trainer


def mse(module, batch):
    x, y = batch
    return F.mse_loss(module(x), y)


def hessian_warnings(record, text):
    return [w for w in record if text in str(w.message)]


# ---------------------------------------------------------------------- never ends a run
class NoSecondDerivative(torch.autograd.Function):
    """Identity in the gradient whose own derivative is not implemented (like a fused kernel)."""

    @staticmethod
    def forward(ctx, grad):
        return grad.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("derivative for fused_kernel_backward is not implemented")


class NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward has a graph that cannot be differentiated: every Hessian-vector product fails."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return NoSecondDerivative.apply(grad) * (1 - y * y)


def test_an_evaluation_that_fails_warns_once_logs_nan_and_training_goes_on():
    def loss(module, batch):
        x, y = batch
        return F.mse_loss(module.net[2](NoDoubleBackward.apply(module.net[0](x))), y)

    monitor = HessianMonitor(loss, stats=("trace", "eigenvalues"), max_overhead=None)
    fit = trainer(callbacks=[monitor], max_epochs=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit.fit(TinyRegressor(), loader())
    assert fit.current_epoch == 3
    assert len(hessian_warnings(record, "HessianMonitor: a trial Hessian-vector product")) == 1
    failures = hessian_warnings(record, "failed and was skipped")
    assert len(failures) == 1  # once for three evaluations
    assert "no second derivative" in str(failures[0].message)  # the remedy
    assert math.isnan(fit.callback_metrics["hessian/trace"]) and math.isnan(fit.callback_metrics["hessian/eigenvalue_1"])
    assert monitor.latest is None


def test_strict_mode_raises_the_failure():
    def loss(module, batch):
        if module.current_epoch == 1:
            raise ZeroDivisionError("data-dependent failure")
        return mse(module, batch)

    with pytest.raises(ZeroDivisionError, match="data-dependent"):
        trainer(callbacks=[HessianMonitor(loss, max_overhead=None, strict=True)], max_epochs=2).fit(TinyRegressor(), loader())
    monitor = HessianMonitor(loss, max_overhead=None)
    with pytest.warns(UserWarning, match="ZeroDivisionError: data-dependent failure"):
        trainer(callbacks=[monitor], max_epochs=3).fit(TinyRegressor(), loader())
    assert monitor.latest is not None  # epochs 0 and 2 evaluated


class FailingProbe:
    """A probe set whose iterator raises from the second pass on (the trial at train start is the first)."""

    def __init__(self):
        self.passes = 0
        self.data = DataLoader(regression_data(n=16, seed=5), batch_size=8)

    def __iter__(self):
        self.passes += 1
        if self.passes == 3:  # the evaluation at epoch=1
            raise OSError("the probe file vanished")
        return iter(self.data)


class LoggedPerEpoch(L.Callback):
    def __init__(self):
        self.traces = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.traces.append(float(trainer.callback_metrics["hessian/trace"]))


def test_a_failing_probe_dataloader_is_a_failed_evaluation_not_the_end_of_the_run():
    monitor, seen = HessianMonitor(mse, dataloader=FailingProbe(), max_overhead=None, save=False), LoggedPerEpoch()
    fit = trainer(callbacks=[monitor, seen], max_epochs=3)
    with pytest.warns(UserWarning, match="epoch=1 failed and was skipped: OSError: the probe file vanished"):
        fit.fit(TinyRegressor(), loader())
    assert fit.current_epoch == 3
    assert not math.isnan(seen.traces[0]) and math.isnan(seen.traces[1]) and not math.isnan(seen.traces[2])
    with pytest.raises(OSError, match="the probe file vanished"):
        trainer(callbacks=[HessianMonitor(mse, dataloader=FailingProbe(), max_overhead=None, strict=True)], max_epochs=3).fit(
            TinyRegressor(), loader()
        )


class RaiseAtEpoch(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("the run broke")


def test_cached_batches_and_warm_start_vectors_are_released_after_fit_and_on_exception():
    for every_n_steps, extra in ((2, []), (None, [RaiseAtEpoch()])):
        monitor = HessianMonitor(
            mse, stats="eigenvalues", every_n_steps=every_n_steps, exact_up_to=0, max_overhead=None, save=False
        )
        kept = []

        class Peek(L.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                kept.append((len(monitor._batches), monitor._warm_start is not None))

        fit = trainer(callbacks=[monitor, Peek(), *extra], max_epochs=2)
        with pytest.raises(RuntimeError, match="the run broke") if extra else contextlib.nullcontext():
            fit.fit(TinyRegressor(), loader())
        assert kept and kept[0][0] == 1  # the monitor did hold a batch during the run
        if every_n_steps:
            assert kept[0][1]  # and warm-start vectors
        assert len(monitor._batches) == 0 and monitor._warm_start is None


# ---------------------------------------------------------------------- several monitors
def test_monitors_with_their_own_prefix_log_and_save_apart_and_a_shared_prefix_is_refused(tmp_path):
    epochs = HessianMonitor(mse, stats="trace", max_overhead=None)
    steps = HessianMonitor(mse, stats="eigenvalues", every_n_steps=2, max_overhead=None, prefix="hessian_steps")
    logger = CSVLogger(tmp_path, name="run")
    fit = trainer(callbacks=[epochs, steps], logger=logger, max_epochs=1)
    fit.fit(TinyRegressor(), loader())
    assert {"hessian/trace", "hessian_steps/eigenvalue_1"} <= set(fit.callback_metrics)
    assert "hessian/eigenvalue_1" not in fit.callback_metrics and "hessian_steps/trace" not in fit.callback_metrics
    run = Path(logger.log_dir)
    assert (run / "hessian" / "epoch=0.pt").exists()  # the default: paths as before
    assert (run / "hessian_steps" / "step=2.pt").exists() and not (run / "hessian" / "step=2.pt").exists()

    twin = HessianMonitor(mse, stats="eigenvalues", every_n_steps=2)
    model = TinyRegressor()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"prefix='hessian'.*share this prefix"):
        trainer(callbacks=[HessianMonitor(mse), twin], max_epochs=1).fit(model, loader())
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    with pytest.raises(ValueError, match="prefix"):
        HessianMonitor(mse, prefix="../elsewhere")


# ---------------------------------------------------------------------- trial evaluation
class StepCounter(L.Callback):
    def __init__(self):
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1


@pytest.mark.parametrize(
    "loss_fn, message",
    [
        (lambda batch, module: mse(module, batch), "loss_fn=<lambda>\\) raised .*must be a callable \\(pl_module, batch\\)"),
        (lambda module, batch: 1 / 0, "raised ZeroDivisionError: division by zero"),
        (lambda module, batch: module(batch[0]), "must return a scalar floating-point loss tensor, got a tensor of shape \\(16, 1\\)"),
        (lambda module, batch: mse(module, batch).item(), "got float"),
        (lambda module, batch: mse(module, batch).detach(), "without an autograd graph"),
    ],
)
def test_loss_fn_mistakes_are_raised_by_the_trial_before_the_first_optimizer_step(loss_fn, message):
    model, steps = TinyRegressor(), StepCounter()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        trainer(callbacks=[steps, HessianMonitor(loss_fn)], max_epochs=1).fit(model, loader())
    assert steps.steps == 0
    for name, value in snapshot(model).items():
        assert torch.equal(value, before[name]), name


def test_trial_with_a_probe_dataloader_runs_at_train_start():
    steps = StepCounter()
    with pytest.raises(ValueError, match="raised TypeError"):
        trainer(callbacks=[steps, HessianMonitor(lambda m, b: b["x"], dataloader=loader())], max_epochs=1).fit(TinyRegressor(), loader())
    assert steps.steps == 0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(dataloader="abc"), TypeError, "dataloader=...\\) must be a DataLoader.*got str"),
        (dict(dataloader={"x": 1}), TypeError, "got dict"),
        (dict(loss_fn=lambda batch: batch), ValueError, "cannot be called as loss_fn\\(pl_module, batch\\)"),
        (dict(loss_fn="not a name"), ValueError, "is not a method name"),
        (dict(options={"lanczos_tol": 1e-3}), TypeError, "options=...\\) must be a lightning_gradmask.curvature.StatisticsOptions"),
        (dict(options=[("lanczos_tol", 1)]), TypeError, "StatisticsOptions or None, got list"),
        (dict(exact_up_to=-1), ValueError, "exact_up_to=...\\) must be a non-negative integer"),
        (dict(max_overhead=0), ValueError, "max_overhead"),
        (dict(max_overhead="10%"), ValueError, "max_overhead"),
        (dict(every_n_steps=0), ValueError, "every_n_steps"),
        (dict(params=[3]), TypeError, "params"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(strict="yes"), TypeError, "strict"),
    ],
)
def test_every_constructor_argument_is_checked_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        HessianMonitor(**({"loss_fn": mse} | kwargs))


def test_estimator_options_are_checked_when_made():
    with pytest.raises(TypeError, match="lanczos_tolerance"):  # not an option
        StatisticsOptions(lanczos_tolerance=1e-3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="top_k"):  # an argument of the monitor itself, not an option
        StatisticsOptions(top_k=2)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="choose from \\['auto', 'adaptive'"):
        StatisticsOptions(trace_method="exactly")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- random streams
class Dropped(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return mse(self, batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_probe_loader_with_shuffling_leaves_every_random_stream_as_it_was():
    def run(with_monitor):
        L.seed_everything(0, verbose=False)
        probe = DataLoader(regression_data(n=32, seed=4), batch_size=8, shuffle=True)
        callbacks = [HessianMonitor(mse, num_batches=2, dataloader=probe, every_n_steps=2, max_overhead=None)] if with_monitor else []
        model = Dropped()
        data = DataLoader(regression_data(), batch_size=16, shuffle=True)
        trainer(callbacks=callbacks, max_epochs=3).fit(model, data)
        return snapshot(model), (torch.rand(3), random.random(), np.random.rand())

    (monitored, draws_on), (plain, draws_off) = run(True), run(False)
    for name, value in plain.items():
        assert torch.equal(value, monitored[name]), name
    assert torch.equal(draws_on[0], draws_off[0]) and draws_on[1:] == draws_off[1:]


# ---------------------------------------------------------------------- cost budget
def slow_mse(module, batch):
    time.sleep(0.02)  # an evaluation far above 10% of this tiny model's training time
    return mse(module, batch)


def test_budget_skips_evaluations_warns_once_and_logs_the_overhead(tmp_path):
    monitor = HessianMonitor(slow_mse, stats=("trace",), max_overhead=0.1)
    logger = CSVLogger(tmp_path, name="run")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(callbacks=[monitor], logger=logger, max_epochs=4).fit(TinyRegressor(), loader())
    skipped = hessian_warnings(record, "skipped the evaluation")
    assert len(skipped) == 1  # once, at the first skip
    assert "at epoch=0 to stay within max_overhead=0.1" in str(skipped[0].message)
    assert "is estimated to take" in str(skipped[0].message)  # from the trial product at train start
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    overhead = [float(r["hessian/overhead"]) for r in rows if r.get("hessian/overhead")]
    assert len(overhead) == 4 and not any(r.get("hessian/trace") for r in rows)
    assert overhead == sorted(overhead, reverse=True)  # only the trial was spent: the share falls
    assert monitor.latest is None
    message = str(skipped[0].message)
    assert "Evaluations are being skipped" in message and "max_overhead=None to evaluate on schedule" in message
    summary = hessian_warnings(record, "scheduled evaluations in this run")
    assert len(summary) == 1 and "skipped 4 of 4 scheduled evaluations" in str(summary[0].message)


def test_budget_allows_an_evaluation_once_training_has_paid_for_it():
    monitor = HessianMonitor(mse, stats=("trace",), max_overhead=0.5, save=False)

    class SlowStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            time.sleep(0.08)  # training pays for an evaluation within 3 epochs, even on a loaded machine

    trainer(callbacks=[SlowStep(), monitor], max_epochs=3).fit(TinyRegressor(), loader())
    assert monitor._overhead.evaluations >= 1
    assert monitor._overhead.overhead() <= 0.5


def test_no_budget_evaluates_on_schedule():
    monitor = HessianMonitor(slow_mse, stats=("trace",), max_overhead=None, save=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|log_every_n_steps).*")
        trainer(callbacks=[monitor], max_epochs=3).fit(TinyRegressor(), loader())
    assert monitor._overhead.evaluations == 3


# ---------------------------------------------------------------------- every n steps, warm start
class Evaluations(L.Callback):
    """(global step, products) of every new result the monitor publishes."""

    def __init__(self, monitor):
        self.monitor, self.seen, self.last = monitor, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.monitor.latest is not None and self.monitor.latest is not self.last:
            self.last = self.monitor.latest
            self.seen.append((trainer.global_step, self.last.num_matvecs))


def test_every_n_steps_tracks_the_top_eigenvalue_with_warm_started_lanczos():
    model = TinyRegressor(hidden=48, optimizer=lambda p: torch.optim.SGD(p, lr=1e-3))  # 385 entries: Lanczos
    probe = loader(regression_data(n=16, seed=5), batch_size=16)
    monitor = HessianMonitor(mse, stats=("eigenvalues",), every_n_steps=2, dataloader=probe, max_overhead=None,
                             options=StatisticsOptions(lanczos_tol=1e-6))
    evaluations = Evaluations(monitor)
    fit = trainer(callbacks=[monitor, evaluations], max_epochs=3)
    fit.fit(model, loader())
    assert [step for step, _ in evaluations.seen] == [2, 4, 6, 8, 10, 12]
    cold, warm = evaluations.seen[0][1], [products for _, products in evaluations.seen[1:]]
    assert max(warm) < cold
    assert "hessian/eigenvalue_1" in fit.callback_metrics
    batch = next(iter(probe))
    reference = reference_hessian(model, lambda m, params: mse(lambda x: torch.func.functional_call(m, params, (x,)), batch))
    assert float(monitor.latest.eigen.eigenvalues[0]) == pytest.approx(float(torch.linalg.eigvalsh(reference.double())[-1]), rel=1e-5)


# ---------------------------------------------------------------------- pictures and files
def density_run(logger, root):
    monitor = HessianMonitor(mse, stats=("eigenvalues", "density"), top_k=2, max_overhead=None)
    trainer(callbacks=[monitor], logger=logger, default_root_dir=root, max_epochs=1).fit(TinyRegressor(), loader())
    return monitor


def test_mlflow_gets_the_figure_and_each_run_has_its_own_files(tmp_path):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    directories = []
    for _ in range(2):
        logger = MLFlowLogger(experiment_name="hessian", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
        density_run(logger, tmp_path)
        artifacts = [a.path for a in logger.experiment.list_artifacts(logger.run_id, "hessian")]
        assert artifacts == ["hessian/density_epoch=0.png"]
        directory = tmp_path / "hessian" / logger.run_id
        assert sorted(p.name for p in directory.iterdir()) == ["density_epoch=0.png", "epoch=0.pt"]
        directories.append(directory)
        assert "hessian/eigenvalue_1" in logger.experiment.get_run(logger.run_id).data.metrics
    assert directories[0] != directories[1]


def test_wandb_gets_the_figure_in_an_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="hessian", save_dir=str(tmp_path), offline=True)
    try:
        density_run(logger, tmp_path)
        run_dir = Path(logger.experiment.dir)
    finally:
        wandb.finish()
    images = list((run_dir / "media" / "images" / "hessian").glob("density_*.png"))
    assert len(images) == 1  # one evaluation, one figure
    assert (tmp_path / "hessian" / f"WandbLogger-{logger.version}" / "density_epoch=0.png").is_file()


def test_csv_and_no_logger_runs_write_files_of_their_own(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    density_run(logger, tmp_path)
    assert (Path(logger.log_dir) / "hessian" / "density_epoch=0.png").is_file()
    density_run(False, tmp_path)
    density_run(False, tmp_path)
    runs = list((tmp_path / "hessian").iterdir())
    assert len(runs) == 2 and all((run / "epoch=0.pt").is_file() for run in runs)


def test_tensorboard_figure_at_the_scalars_step_and_the_global_backend_untouched(tmp_path):
    import matplotlib
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    backend = matplotlib.get_backend()
    logger = TensorBoardLogger(tmp_path, name="tb")
    density_run(logger, tmp_path)
    assert matplotlib.get_backend() == backend
    events = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    image_steps = [e.step for e in events.Images("hessian/density")]
    scalar_steps = [e.step for e in events.Scalars("hessian/eigenvalue_1")]
    assert image_steps == scalar_steps == [3]


def test_density_figure_has_a_readable_scale_labels_and_eigenvalue_markers():
    monitor = HessianMonitor(mse, stats=("eigenvalues", "density"), top_k=2, max_overhead=None, save=False)
    trainer(callbacks=[monitor], max_epochs=1).fit(TinyRegressor(), loader())
    figure = density_figure(monitor.latest, "title")
    axes = figure.axes[0]
    low, high = axes.get_ylim()
    assert axes.get_yscale() == "log" and 3 <= math.log10(high / low) <= 5
    assert axes.get_xlabel() == "eigenvalue" and "density" in axes.get_ylabel()
    marked = sorted(line.get_xdata()[0] for line in axes.get_lines()[1:])
    assert marked == pytest.approx(sorted(monitor.latest.eigen.eigenvalues.tolist()))
