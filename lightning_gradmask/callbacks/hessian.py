"""``HessianMonitor``: second-order statistics of the training loss, logged at train epoch end."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import DataLoader

from lightning_gradmask._distributed import all_reduce_mean, check_strategy
from lightning_gradmask._namespaces import Callback, lightning_classes
from lightning_gradmask.callbacks._constraints import constraints_for
from lightning_gradmask.curvature import (
    STATS,
    HessianOperator,
    HessianStatistics,
    NonFiniteLossError,
    hessian_statistics,
)
from lightning_gradmask.specs import match_parameters

__all__ = ["HessianMonitor"]

LossFn = Callable[[pl.LightningModule, Any], torch.Tensor]


class HessianMonitor(Callback):
    r"""Log the sharpness of the training loss every few epochs: trace, top eigenvalues, diagonal, density.

    The Hessian is that of ``loss_fn(pl_module, batch)`` averaged over ``num_batches`` batches (the
    first batches of the epoch's training data by default, or those of ``dataloader``), with respect
    to the trainable parameters: those with ``requires_grad``, restricted to the trainable entries of
    any attached ``GradientMask`` / ``SensitiveColumnBlinding`` (the Hessian of what can move), and to
    ``parameters`` if given. It is evaluated on the unwrapped module in ``eval()`` mode with
    ``torch.autograd.grad``: the user's ``training_step`` is never called, and ``p.grad``, optimizer
    state, BatchNorm running statistics and the module's train/eval mode are left as they were.

    Where the number of selected entries is within the product budget, trace, eigenvalues and
    diagonal are computed exactly; otherwise the trace is an XTrace estimate with a standard error,
    the eigenvalues come from Lanczos with full reorthogonalization (the *algebraically* largest, in
    descending order), and the diagonal is exact per layer where that is cheap, estimated otherwise.

    Logged with ``pl_module.log`` (every logger gets them), identical on every DDP rank:
    ``hessian/trace``, ``hessian/trace_stderr``, ``hessian/eigenvalue_1`` ... ``hessian/eigenvalue_k``,
    ``hessian/products`` (Hessian-vector products spent), ``hessian/seconds`` (wall time), and with
    ``per_parameter=True`` ``hessian/trace/<parameter>``. The full result is in :attr:`latest` and is
    saved as ``<log_dir>/hessian/epoch=<n>.pt``; the spectral density is drawn to
    ``<log_dir>/hessian/density_epoch=<n>.png`` and sent to a TensorBoard logger as a figure.

    Args:
        loss_fn: ``(pl_module, batch) -> scalar loss``, or the name of a LightningModule method
            ``(batch) -> loss``. ``None``: the module's ``hessian_loss(batch)`` method.
        stats: any of ``"trace"``, ``"eigenvalues"``, ``"diagonal"``, ``"density"``.
        top_k: number of top eigenvalues.
        every_n_epochs: evaluate after every ``n``-th training epoch.
        num_batches: batches that define the loss.
        dataloader: a fixed probe set instead of the first training batches of the epoch.
        parameters: names or ``re:`` patterns selecting a subset of parameters (default: all
            trainable ones).
        per_parameter: also log the trace of each parameter's block.
        trace_products: Hessian-vector products for the trace estimate.
        budget: compute every statistic exactly when the selected entries are at most this many
            (default: whenever exact is no more expensive than the estimates).
        seed: probes are drawn from ``seed`` and the epoch, the same on every rank.
        save: save the full result (and the density figure) under the log directory.
        statistics_kwargs: further keyword arguments for
            :func:`lightning_gradmask.curvature.hessian_statistics` (e.g. ``lanczos_tol``).

    Example::

        from lightning_gradmask import HessianMonitor

        monitor = HessianMonitor(
            loss_fn=lambda module, batch: F.mse_loss(module(batch[0]), batch[1]),
            stats=("trace", "eigenvalues", "density"),
            top_k=3,
        )
        trainer = L.Trainer(callbacks=[monitor], max_epochs=10)
        trainer.fit(model, data)
        monitor.latest.eigenvalues    # tensor of the 3 algebraically largest eigenvalues

    Raises:
        ValueError: (at construction or ``setup``) unknown statistics, ``top_k``/``every_n_epochs``/
            ``num_batches`` below 1, no ``loss_fn`` and no ``hessian_loss`` method, a ``parameters``
            pattern matching nothing; (at train start) ``top_k`` above the number of trainable entries;
            (at the first evaluation) a ``loss_fn`` returning a non-scalar or a tensor without a graph.
        UnsupportedStrategyError: FSDP, DeepSpeed and other sharding strategies.

    A NaN or infinite loss never stops training: the statistics are logged as NaN with a warning.
    """

    def __init__(
        self,
        loss_fn: Union[str, LossFn, None] = None,
        stats: Sequence[Literal["trace", "eigenvalues", "diagonal", "density"]] = ("trace", "eigenvalues"),
        top_k: int = 1,
        every_n_epochs: int = 1,
        num_batches: int = 1,
        dataloader: DataLoader | None = None,
        parameters: Union[str, Sequence[str], None] = None,
        per_parameter: bool = False,
        trace_products: int = 40,
        budget: int | None = None,
        seed: int = 0,
        save: bool = True,
        statistics_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if loss_fn is not None and not callable(loss_fn) and not isinstance(loss_fn, str):
            raise TypeError(f"HessianMonitor(loss_fn=...) must be a callable or a method name, got {type(loss_fn).__name__}")
        stats = (stats,) if isinstance(stats, str) else tuple(stats)  # type: ignore[assignment]  # a single name is accepted too
        unknown = [s for s in stats if s not in STATS]
        if unknown or not stats:
            raise ValueError(f"HessianMonitor(stats=...): unknown statistics {unknown}; choose from {list(STATS)}")
        for name, value in (("top_k", top_k), ("every_n_epochs", every_n_epochs), ("num_batches", num_batches), ("trace_products", trace_products)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HessianMonitor({name}=...) must be an integer >= 1, got {value!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"HessianMonitor(budget=...) must be a non-negative integer, got {budget!r}")
        if dataloader is not None and not isinstance(dataloader, Iterable):
            raise TypeError("HessianMonitor(dataloader=...) must be an iterable of batches (a DataLoader)")
        self.loss_fn = loss_fn
        self.stats = stats
        self.top_k = top_k
        self.every_n_epochs = every_n_epochs
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.parameters = [parameters] if isinstance(parameters, str) else parameters
        self.per_parameter = per_parameter
        self.trace_products = trace_products
        self.budget = budget
        self.seed = seed
        self.save = save
        self.statistics_kwargs = dict(statistics_kwargs or {})
        self.latest: HessianStatistics | None = None
        """The full result of the latest evaluation (on every rank)."""
        self._batches: list[Any] = []
        self._selected: list[str] = []

    # ------------------------------------------------------------------ setup-time checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "HessianMonitor")
        self._resolve_loss(pl_module)
        names = [name for name, p in pl_module.named_parameters() if p.requires_grad]
        if self.parameters is None:
            self._selected = names
        else:
            chosen: set[str] = set()
            for key in self.parameters:
                chosen.update(match_parameters(key, names, parameter="HessianMonitor(parameters=...)"))
            self._selected = [name for name in names if name in chosen]
        if not self._selected:
            raise ValueError("HessianMonitor: the model has no trainable parameter to monitor")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masks = self._masks(pl_module)
        params = dict(pl_module.named_parameters())
        entries = sum(int(masks[n].sum()) if n in masks else params[n].numel() for n in self._selected)
        if "eigenvalues" in self.stats and self.top_k > entries:
            raise ValueError(
                f"HessianMonitor(top_k={self.top_k}) exceeds the {entries} trainable entries being monitored"
            )

    # ------------------------------------------------------------------ batches
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.dataloader is None and self._due(trainer) and len(self._batches) < self.num_batches:
            self._batches.append(apply_to_collection(batch, torch.Tensor, lambda t: t.detach()))

    def _probe_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        if self.dataloader is None:
            return self._batches
        batches = []
        for batch in self.dataloader:
            batches.append(trainer.strategy.batch_to_device(batch, pl_module.device))
            if len(batches) == self.num_batches:
                break
        return batches

    # ------------------------------------------------------------------ evaluation
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        batches = self._probe_batches(trainer, pl_module)
        if not batches:
            rank_zero_warn("HessianMonitor: no batch to evaluate the Hessian on this epoch; nothing logged")
            return
        started = time.perf_counter()
        result = self.compute(trainer, pl_module, batches)
        seconds = time.perf_counter() - started
        if result is None:
            return
        self.latest = result
        self._log(pl_module, result, seconds)
        if self.save:
            directory = Path(trainer.log_dir or trainer.default_root_dir) / "hessian"  # a collective: every rank
            if trainer.is_global_zero:
                self._save(trainer, result, directory)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]) -> HessianStatistics | None:
        """Compute the statistics on ``batches`` now (every rank must call this together under DDP)."""
        loss = self._resolve_loss(pl_module)
        closures = [_bind(loss, pl_module, batch) for batch in batches]
        params = dict(pl_module.named_parameters())
        masks = {n: m for n, m in self._masks(pl_module).items() if n in self._selected}
        reduce = (lambda t: all_reduce_mean(trainer, t)) if trainer.world_size > 1 else None
        seed = self.seed * 1_000_003 + trainer.current_epoch
        operator = None
        try:
            operator = HessianOperator(
                closures,
                [(n, params[n]) for n in self._selected],
                masks={n: m.to(params[n].device) for n, m in masks.items()},
                reduce=reduce,
                module=pl_module,
                eval_mode=True,
            )
            return hessian_statistics(
                operator,
                self.stats,
                top_k=self.top_k,
                budget=self.budget,
                seed=seed,
                trace_products=self.trace_products,
                **self.statistics_kwargs,
            )
        except NonFiniteLossError as err:
            rank_zero_warn(f"HessianMonitor: {err} (epoch {trainer.current_epoch}); statistics logged as NaN")
            self._log_nan(pl_module)
            return None
        finally:
            if operator is not None:
                operator.release()

    # ------------------------------------------------------------------ output
    def _log(self, pl_module: pl.LightningModule, result: HessianStatistics, seconds: float) -> None:
        values: dict[str, float] = {"hessian/products": float(result.num_products), "hessian/seconds": seconds}
        if result.trace is not None:
            values["hessian/trace"] = float(result.trace)
            values["hessian/trace_stderr"] = float(result.trace_stderr or 0.0)
            if self.per_parameter and result.trace_per_parameter:
                for name, value in result.trace_per_parameter.items():
                    values[f"hessian/trace/{name}"] = float(value)
        if result.eigenvalues is not None:
            for index, value in enumerate(result.eigenvalues.tolist(), start=1):
                values[f"hessian/eigenvalue_{index}"] = float(value)
        _log_same_on_every_rank(pl_module, values)

    def _log_nan(self, pl_module: pl.LightningModule) -> None:
        keys = []
        if "trace" in self.stats:
            keys += ["hessian/trace", "hessian/trace_stderr"]
        if "eigenvalues" in self.stats:
            keys += [f"hessian/eigenvalue_{i}" for i in range(1, self.top_k + 1)]
        _log_same_on_every_rank(pl_module, dict.fromkeys(keys, math.nan))

    def _save(self, trainer: pl.Trainer, result: HessianStatistics, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        epoch = trainer.current_epoch
        record = {key: _to_cpu(value) for key, value in asdict(result).items()}
        torch.save(record, directory / f"epoch={epoch}.pt")
        if result.density is not None:
            self._draw_density(trainer, result, directory / f"density_epoch={epoch}.png")

    def _draw_density(self, trainer: pl.Trainer, result: HessianStatistics, path: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            rank_zero_warn(
                "HessianMonitor: matplotlib is not installed, so the spectral density is saved as numbers "
                "only (pip install matplotlib for the figure)"
            )
            return
        figure, axes = plt.subplots(figsize=(5, 3.2))
        axes.plot(result.density_grid.cpu().numpy(), result.density.cpu().numpy())  # type: ignore[union-attr]  # the density stat is present when this runs
        axes.set_yscale("log")
        axes.set_xlabel("eigenvalue")
        axes.set_ylabel("density")
        axes.set_title(f"Hessian spectral density, epoch {trainer.current_epoch}")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        for logger in trainer.loggers:
            if isinstance(logger, lightning_classes("loggers", "TensorBoardLogger")):
                logger.experiment.add_figure("hessian/density", figure, global_step=trainer.global_step, close=False)  # type: ignore[attr-defined]  # a TensorBoardLogger has experiment
        plt.close(figure)
        rank_zero_info(f"HessianMonitor: spectral density drawn to {path}")

    # ------------------------------------------------------------------ helpers
    def _due(self, trainer: pl.Trainer) -> bool:
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return constraints_for(pl_module).trainable_masks()

    def _resolve_loss(self, pl_module: pl.LightningModule) -> LossFn:
        if callable(self.loss_fn):
            return self.loss_fn
        method_name = self.loss_fn if isinstance(self.loss_fn, str) else "hessian_loss"
        method = getattr(pl_module, method_name, None)
        if not callable(method):
            if self.loss_fn is None:
                raise ValueError(
                    "HessianMonitor needs a loss: pass loss_fn=lambda module, batch: ... or define "
                    f"`hessian_loss(self, batch)` on {type(pl_module).__name__}"
                )
            raise ValueError(f"HessianMonitor(loss_fn={self.loss_fn!r}): {type(pl_module).__name__} has no such method")
        return lambda module, batch: getattr(module, method_name)(batch)


def _log_same_on_every_rank(pl_module: pl.LightningModule, values: dict[str, float]) -> None:
    """Log values that every rank computed identically: no ``sync_dist`` collective is needed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")
        for key, value in values.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=False)


def _bind(loss: LossFn, module: pl.LightningModule, batch: Any) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        return loss(module, batch)

    return closure


def _to_cpu(value: Any) -> Any:
    return apply_to_collection(value, torch.Tensor, lambda t: t.detach().cpu())
