"""Where ``HessianMonitor`` puts its results: a directory unique to the run, figures for every logger."""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_gradmask._namespaces import lightning_classes
from lightning_gradmask.curvature import HessianStatistics

DECADES_SHOWN = 4
"""The density's log axis spans this many decades under its peak."""


def run_directory(trainer: pl.Trainer, name: str = "hessian") -> Path:
    """``<dir>/<name>`` for this run only; call on every rank (rank 0's answer is broadcast).

    ``name`` is the monitor's ``prefix``, so two monitors of one run never share files.

    TensorBoard and CSV loggers: under their versioned ``log_dir``. MLflow: under the Trainer's
    ``default_root_dir``, in a folder named by the MLflow run id. Other loggers: named by their
    ``version``. No logger: a fresh id per fit, so two runs never share files.
    """
    path: str | None = None
    if trainer.is_global_zero:
        logger: Any = trainer.loggers[0] if trainer.loggers else None  # of either Lightning namespace
        root = Path(trainer.default_root_dir) / name
        if _is_logger(logger, "TensorBoardLogger", "CSVLogger"):
            path = str(Path(str(logger.log_dir)) / name)
        elif _is_logger(logger, "MLFlowLogger"):
            path = str(root / str(logger.run_id))
        elif logger is not None and logger.version is not None:
            path = str(root / f"{type(logger).__name__}-{logger.version}")
        else:
            path = str(root / uuid.uuid4().hex[:12])
    chosen = trainer.strategy.broadcast(path)
    assert chosen is not None  # rank 0 always chooses one
    return Path(chosen)


def logger_step(trainer: pl.Trainer, epoch_end: bool) -> int:
    """The step Lightning gives the scalars logged now through ``pl_module.log``.

    In ``on_train_batch_end`` that is the count of batches that stepped before this one; at epoch end
    Lightning logs the epoch's metrics one step back (``fit_loop`` decrements the counter around it).
    """
    loop = getattr(trainer, "fit_loop", None)
    stepped = getattr(getattr(loop, "epoch_loop", None), "_batches_that_stepped", None)
    step = int(stepped) if isinstance(stepped, int) else int(trainer.global_step)
    return max(step - 1, 0) if epoch_end else step


def density_figure(result: HessianStatistics, title: str) -> Any:
    """The spectral density on a log axis floored ``DECADES_SHOWN`` decades under the peak.

    Drawn on a ``matplotlib.figure.Figure`` (pyplot and the global backend are never touched); the top
    eigenvalues are marked. ``None`` when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    assert result.density is not None
    grid = result.density.grid.double().cpu()
    density = result.density.density.double().cpu()
    finite = density[density.isfinite()]
    peak = float(finite.max()) if finite.numel() else 1.0
    peak = peak if peak > 0 and math.isfinite(peak) else 1.0
    floor = peak * 10.0 ** (-DECADES_SHOWN)
    figure = Figure(figsize=(5.5, 3.4))
    axes = figure.add_subplot()
    axes.plot(grid.numpy(), density.clamp_min(floor).numpy(), color="tab:blue", label="density")
    axes.set_yscale("log")
    axes.set_ylim(floor, peak * 2.0)
    if result.eigen is not None:
        for index, value in enumerate(result.eigen.eigenvalues.tolist(), start=1):
            axes.axvline(value, color="tab:red", linestyle="--", linewidth=0.8,
                         label="top eigenvalues" if index == 1 else None)
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel(f"density (log, {DECADES_SHOWN} decades)")
    axes.set_title(title)
    axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    return figure


def send_figure(trainer: pl.Trainer, figure: Any, path: Path, key: str, step: int) -> None:
    """Save ``figure`` to ``path`` and send it to every logger that takes images, at ``step``.

    TensorBoard: ``add_figure``. MLflow: ``log_figure`` into the run's artifacts (under ``hessian/``).
    Weights & Biases: ``log_image``. Any other logger: the file only.
    """
    figure.savefig(path, dpi=100)
    loggers: list[Any] = list(trainer.loggers)  # of either Lightning namespace
    for logger in loggers:
        try:
            if _is_logger(logger, "TensorBoardLogger"):
                logger.experiment.add_figure(key, figure, global_step=step, close=False)
            elif _is_logger(logger, "MLFlowLogger"):
                logger.experiment.log_figure(logger.run_id, figure, f"hessian/{path.name}")
            elif type(logger).__name__ == "WandbLogger":
                logger.log_image(key=key, images=[str(path)], step=step)
        except Exception as err:  # a logger's own failure must not end the run
            rank_zero_warn(f"HessianMonitor: could not send the figure to {type(logger).__name__}: {err}")


def _is_logger(logger: Any, *names: str) -> bool:
    """Whether ``logger`` is one of Lightning's loggers ``names``, of either namespace."""
    return any(isinstance(logger, lightning_classes("loggers", name)) for name in names)
