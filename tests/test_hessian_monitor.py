"""HessianMonitor in real training runs: exact where affordable, side-effect free, rank-identical."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_gradmask import GradientMask, HessianMonitor
from lightning_gradmask.curvature import HessianOperator, hessian_statistics

from reference import reference_hessian
from utils import (
    FSDP2_RUNS_ON_CPU,
    FSDP2_SKIP_REASON,
    REPO_ROOT,
    TinyRegressor,
    loader,
    regression_data,
    run_script,
    snapshot,
    trainer,
)


def mse(module, batch):
    x, y = batch
    return F.mse_loss(module(x), y)


def exact_hessian(model, batch, mask=None):
    """Reference: torch.func.hessian of the loss (eval mode) over all parameters, restricted to ``mask``."""
    x, y = batch
    model.eval()
    hessian = reference_hessian(model, lambda m, params: F.mse_loss(torch.func.functional_call(m, params, (x,)), y))
    model.train()
    if mask is not None:
        keep = torch.cat([mask.get(n, torch.ones_like(p, dtype=torch.bool)).reshape(-1) for n, p in model.named_parameters()])
        hessian = hessian[keep][:, keep]
    return hessian.double()


class KeepFirstBatch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batch = batch


def test_logs_exact_trace_and_algebraically_largest_eigenvalues(tmp_path):
    model = TinyRegressor(optimizer=lambda p: torch.optim.SGD(p, lr=0.0))  # lr 0: the Hessian of the start
    monitor = HessianMonitor(loss_fn=mse, stats=("trace", "eigenvalues", "diagonal"), top_k=3, max_overhead=None)
    keep = KeepFirstBatch()
    logger = CSVLogger(tmp_path, name="run")
    trainer(callbacks=[keep, monitor], logger=logger, max_epochs=1).fit(model, loader())

    reference = exact_hessian(model, keep.batch)
    eigenvalues = torch.linalg.eigvalsh(reference).flip(0)[:3]
    assert monitor.latest.exact["trace"] and monitor.latest.exact["eigenvalues"]
    assert monitor.latest.trace.trace == pytest.approx(float(reference.trace()), rel=1e-5)
    assert torch.allclose(monitor.latest.eigen.eigenvalues.double(), eigenvalues, rtol=1e-4)
    diagonal = torch.cat([monitor.latest.diagonal.per_parameter[n].reshape(-1) for n, _ in model.named_parameters()])
    assert torch.allclose(diagonal.double(), reference.diagonal(), rtol=1e-5, atol=1e-7)

    metrics = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header, row = metrics[0].split(","), metrics[-1].split(",")
    logged = {key: row[header.index(key)] for key in header if key.startswith("hessian/")}
    assert float(logged["hessian/trace"]) == pytest.approx(float(reference.trace()), rel=1e-5)
    for k in range(3):
        assert float(logged[f"hessian/eigenvalue_{k + 1}"]) == pytest.approx(float(eigenvalues[k]), rel=1e-4)
    # exactly the keys of HessianStatistics.scalars(), plus the monitor's two timings
    assert set(logged) == set(monitor.latest.scalars()) | {"hessian/seconds", "hessian/overhead"}
    assert float(logged["hessian/matvecs"]) == monitor.latest.num_matvecs
    saved = torch.load(Path(logger.log_dir) / "hessian" / "epoch=0.pt", weights_only=False)
    assert torch.equal(saved["eigen"]["eigenvalues"], monitor.latest.eigen.eigenvalues)


def test_only_trainable_entries_of_a_gradient_mask_count():
    edges = torch.zeros(8, 6, dtype=torch.bool)
    edges[:4] = True
    mask = {"net.0.weight": edges, "net.2.bias": torch.zeros(1, dtype=torch.bool)}
    model = TinyRegressor(optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    monitor = HessianMonitor(loss_fn=mse, stats=("trace",), max_overhead=None)
    keep = KeepFirstBatch()
    trainer(callbacks=[GradientMask(mask), keep, monitor], max_epochs=1).fit(model, loader())
    reference = exact_hessian(model, keep.batch, mask)
    assert monitor.latest.dim == reference.shape[0] == 24 + 8 + 8
    assert monitor.latest.trace.trace == pytest.approx(float(reference.trace()), rel=1e-5)


class Watched(L.LightningModule):
    """BatchNorm, dropout and a counter of training_step calls: everything the monitor must not touch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1))
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return mse(self, batch)

    def hessian_loss(self, batch):
        return mse(self, batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class Spy(Callback):
    """After every epoch end: the grads, the optimizer state and the train mode as the user sees them."""

    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(
            (
                [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()],
                [m.training for m in pl_module.modules()],
                pl_module.net[1].running_mean.clone(),
                {k: v["exp_avg"].clone() for k, v in trainer.optimizers[0].state_dict()["state"].items()},
            )
        )


def test_never_touches_training_state_so_training_is_bit_identical():
    def run(with_monitor):
        L.seed_everything(0, verbose=False)
        model, spy = Watched(), Spy()
        callbacks = [HessianMonitor(stats=("trace", "eigenvalues"), max_overhead=None), spy] if with_monitor else [spy]
        trainer(callbacks=callbacks, max_epochs=3).fit(model, loader())
        return model, spy

    monitored, spy_on = run(True)
    plain, spy_off = run(False)
    for name, value in snapshot(plain).items():
        assert torch.equal(value, snapshot(monitored)[name]), name
    assert torch.equal(plain.net[1].running_mean, monitored.net[1].running_mean)
    for (grads_a, modes_a, bn_a, opt_a), (grads_b, modes_b, bn_b, opt_b) in zip(spy_on.seen, spy_off.seen):
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
        assert modes_a == modes_b and all(modes_a)
        assert torch.equal(bn_a, bn_b)
        assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    assert monitored.steps == plain.steps == 3 * 4  # training_step is never called by the monitor


def test_explicit_dataloader_and_subset_of_parameters():
    probe = loader(regression_data(n=16, seed=5), batch_size=16)
    model = TinyRegressor(optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    monitor = HessianMonitor(loss_fn=mse, stats=("trace",), dataloader=probe, params="re:net\\.2\\..*", max_overhead=None)
    trainer(callbacks=[monitor], max_epochs=1).fit(model, loader())
    batch = next(iter(probe))
    full = exact_hessian(model, batch)
    assert monitor.latest.dim == 9
    assert monitor.latest.trace.trace == pytest.approx(float(full.diagonal()[-9:].sum()), rel=1e-5)


def test_every_n_epochs_and_density_figure_for_tensorboard(tmp_path):
    monitor = HessianMonitor(loss_fn=mse, stats=("density",), every_n_epochs=2, max_overhead=None)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(callbacks=[monitor], logger=logger, max_epochs=4).fit(TinyRegressor(), loader())
    directory = Path(logger.log_dir) / "hessian"
    assert sorted(p.name for p in directory.iterdir()) == [
        "density_epoch=1.png",
        "density_epoch=3.png",
        "epoch=1.pt",
        "epoch=3.pt",
    ]
    density = monitor.latest.density.density.double()
    grid = monitor.latest.density.grid.double()
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=0.05)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0})
    events.Reload()
    assert "hessian/density" in events.Tags()["images"]


def test_nan_loss_is_logged_as_nan_with_a_warning_and_training_goes_on():
    def poisoned(module, batch):
        return mse(module, batch) * float("nan")

    monitor = HessianMonitor(loss_fn=poisoned, stats=("trace", "eigenvalues"), max_overhead=None)
    fit = trainer(callbacks=[monitor], max_epochs=2)
    with pytest.warns(UserWarning, match="not finite"):
        fit.fit(TinyRegressor(), loader())
    assert fit.current_epoch == 2
    assert math.isnan(fit.callback_metrics["hessian/trace"]) and math.isnan(fit.callback_metrics["hessian/eigenvalue_1"])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(stats=("trace", "curvature")), ValueError, "unknown statistics \\['curvature'\\]"),
        (dict(top_k=0), ValueError, "top_k=...\\) must be an integer >= 1"),
        (dict(every_n_epochs=0), ValueError, "every_n_epochs"),
        (dict(loss_fn=3), TypeError, "loss_fn"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(kwargs, error, message):
    with pytest.raises(error, match=message):
        HessianMonitor(**kwargs)


def test_bad_input_known_at_setup_or_train_start_fails_before_any_step():
    model = TinyRegressor()
    before = snapshot(model)
    with pytest.raises(ValueError, match="define `hessian_loss\\(self, batch\\)` on TinyRegressor"):
        trainer(callbacks=[HessianMonitor()]).fit(model, loader())
    with pytest.raises(ValueError, match="matches no parameter"):
        trainer(callbacks=[HessianMonitor(mse, params="re:encoder.*")]).fit(model, loader())
    with pytest.raises(ValueError, match="top_k=100\\) exceeds the 65 trainable entries"):
        trainer(callbacks=[HessianMonitor(mse, top_k=100)]).fit(model, loader())
    for name, value in snapshot(model).items():
        assert torch.equal(value, before[name])


def test_loss_that_is_not_a_scalar_with_a_graph_is_named_at_the_first_evaluation():
    with pytest.raises(ValueError, match="scalar"):
        trainer(callbacks=[HessianMonitor(lambda m, b: m(b[0]))], max_epochs=1).fit(TinyRegressor(), loader())
    with pytest.raises(ValueError, match="graph"):
        trainer(callbacks=[HessianMonitor(lambda m, b: mse(m, b).detach())], max_epochs=1).fit(TinyRegressor(), loader())


def test_ddp_an_evaluation_failing_on_one_rank_is_nan_on_every_rank_and_the_run_goes_on(tmp_path):
    # rank 1 alone: a loss that raises (epoch 1), a probe loader that raises (epoch 2), no probe batch (epoch 3);
    # without agreement rank 0 would wait forever in an all-reduce: the timeout turns that into a failure
    run_script(REPO_ROOT / "tests" / "ddp" / "hessian_failure_ddp.py", str(tmp_path), timeout=180)
    logged = []
    for rank in (0, 1):
        records = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        logged.append({(epoch, key): value for epoch, key, value in records})
    assert logged[0].keys() == logged[1].keys()
    for where, value in logged[0].items():  # every logged value, timings included, is rank 0's on every rank
        assert value == logged[1][where] or (math.isnan(value) and math.isnan(logged[1][where])), where
    values = logged[0]
    assert math.isnan(values[1, "hessian/trace"]) and math.isnan(values[1, "hessian/eigenvalue_1"])
    assert math.isnan(values[2, "probe/trace"]) and not math.isnan(values[1, "probe/trace"])
    assert (3, "probe/trace") not in values  # no batch on rank 1: nothing logged on either rank
    for epoch in (0, 2, 3):
        assert not math.isnan(values[epoch, "hessian/trace"])
    assert (0, "hessian/seconds") in values and (0, "probe/overhead") in values


FSDP2_REFUSAL = (
    r"ModelParallelStrategy \(FSDP2\): FSDP2 gathers .* outside autograd.*strategy='ddp'.*"
    r"save_distributed_checkpoint=False.*hessian_statistics\(HessianOperator.from_module"
)


@pytest.mark.parametrize(
    "namespace, strategy, message",
    [
        ("lightning.pytorch", "ModelParallelStrategy", FSDP2_REFUSAL),
        ("pytorch_lightning", "ModelParallelStrategy", FSDP2_REFUSAL),
        ("lightning.pytorch", "FSDPStrategy", r"FSDPStrategy.*Use strategy='ddp'"),
    ],
)
def test_sharding_strategies_are_refused_at_setup_with_what_to_do_instead(namespace, strategy, message):
    from types import SimpleNamespace

    from lightning_gradmask import UnsupportedStrategyError

    strategies = pytest.importorskip(f"{namespace}.strategies")
    # the real strategy object alone: neither can be set up on a one-process CPU Trainer
    on_sharded = SimpleNamespace(strategy=getattr(strategies, strategy)())
    with pytest.raises(UnsupportedStrategyError, match=message):
        HessianMonitor(mse).setup(on_sharded, TinyRegressor(), "fit")


@pytest.mark.skipif(not FSDP2_RUNS_ON_CPU, reason=FSDP2_SKIP_REASON)
def test_fsdp2_fit_is_refused_on_every_rank_before_any_step_and_the_offline_route_works(tmp_path):
    run_script(REPO_ROOT / "tests" / "ddp" / "hessian_fsdp2.py", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        assert "does not support ModelParallelStrategy (FSDP2)" in rank["refusal"]
        assert rank["training_steps"] == 0 and rank["untouched"]  # at setup: nothing sharded, no step taken

    # what the message says to do instead: the full checkpoint holds the trained weights, and the
    # statistics computed from it on the unsharded model are the exact ones
    offline = ranks[0]["offline"]
    for name, value in ranks[0]["trained"].items():
        assert torch.equal(offline["state"][name], value), name
    assert not torch.equal(offline["state"]["net.0.weight"], TinyRegressor().net[0].weight)
    model = TinyRegressor()
    model.load_state_dict(offline["state"])
    expected = exact_hessian(model, regression_data().tensors)
    assert offline["trace"] == pytest.approx(float(expected.trace()), rel=1e-6)
    assert torch.allclose(offline["eigenvalues"], torch.linalg.eigvalsh(expected).flip(0)[:2], rtol=1e-6)


def test_ddp_every_rank_logs_the_union_batch_statistics(tmp_path):
    run_script(REPO_ROOT / "tests" / "ddp" / "hessian_ddp.py", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert not torch.equal(ranks[0]["batch"][0], ranks[1]["batch"][0])  # the ranks saw different data
    assert ranks[0]["evaluations"] == ranks[1]["evaluations"] == 3  # rank 0's (unlimited) budget decided for both
    assert ranks[0]["trace"] == ranks[1]["trace"]
    assert torch.equal(ranks[0]["eigenvalues"], ranks[1]["eigenvalues"])
    for key in ("hessian/trace", "hessian/eigenvalue_1", "hessian/eigenvalue_2"):
        assert ranks[0]["logged"][key] == ranks[1]["logged"][key]

    # one process, both ranks' batches: the same Hessian
    model = TinyRegressor()
    model.load_state_dict(ranks[0]["state"])
    edges = torch.ones(8, 6, dtype=torch.bool)
    edges[:, 0] = False
    closures = [lambda b=b: mse(model, b) for b in (ranks[0]["batch"], ranks[1]["batch"])]
    operator = HessianOperator(closures, model.named_parameters(), masks={"net.0.weight": edges}, module=model, eval_mode=True)
    single = hessian_statistics(operator, ("trace", "eigenvalues", "diagonal"), top_k=2, seed=0)
    assert ranks[0]["trace"] == pytest.approx(single.trace.trace, rel=1e-6)
    assert torch.allclose(ranks[0]["eigenvalues"], single.eigen.eigenvalues, rtol=1e-6)
    for name, diagonal in single.diagonal.per_parameter.items():
        assert torch.allclose(ranks[0]["diagonal"][name], diagonal, rtol=1e-5, atol=1e-8, equal_nan=True), name
