"""``HessianMonitor``: second-order statistics of the training loss, logged during training."""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_gradmask._distributed import check_strategy
from lightning_gradmask._namespaces import Callback, lightning_classes, trainer_callbacks
from lightning_gradmask.callbacks._hessian_agreement import AgreeingReduce, PeerEvaluationError, agree
from lightning_gradmask.callbacks._hessian_budget import OverheadBudget
from lightning_gradmask.callbacks._hessian_output import density_figure, logger_step, run_directory, send_figure
from lightning_gradmask.callbacks._rng import preserved_rng_state
from lightning_gradmask.curvature import (
    STATS,
    HessianOperator,
    HessianStatistics,
    NonFiniteLossError,
    StatisticsOptions,
    hessian_statistics,
    planned_matvecs,
)
from lightning_gradmask.errors import GradmaskConfigError, GradmaskConfigTypeError
from lightning_gradmask.functional.constraints import parameter_constraints
from lightning_gradmask.functional.selection import ParameterTable, ParamSelector, normalize_selector

__all__ = ["HessianMonitor"]

LossFn = Callable[[pl.LightningModule, Any], torch.Tensor]
StatName = Literal["trace", "eigenvalues", "diagonal", "density"]

_HALF = (torch.float16, torch.bfloat16)


#: Why HessianMonitor refuses FSDP2, and what to do instead (measured: docs/hessian.md, 'Sharded training (FSDP2)').
MODEL_PARALLEL_REFUSAL = (
    "HessianMonitor does not support ModelParallelStrategy (FSDP2): FSDP2 gathers each sharded parameter outside "
    "autograd and frees the gathered copy after the backward, so torch.autograd.grad cannot reach the parameters "
    "and no Hessian-vector product can be taken (measured; see docs/hessian.md, 'Sharded training (FSDP2)'). "
    "Instead, run HessianMonitor under strategy='ddp' (or on one device) with a model that fits on one device, or "
    "compute the statistics offline from a full checkpoint: train with "
    "ModelParallelStrategy(save_distributed_checkpoint=False), load torch.load(path, weights_only=False)"
    "['state_dict'] into the unsharded model, and call lightning_gradmask.curvature.hessian_statistics("
    "HessianOperator.from_module(model, closure), stats)."
)


class HessianMonitor(Callback):
    r"""Log the sharpness of the training loss during training: trace, top eigenvalues, diagonal, density.

    The Hessian is that of ``loss_fn(pl_module, batch)`` averaged over ``num_batches`` batches (the
    first batches of the epoch's training data by default, the latest ones with ``every_n_steps``, or
    those of ``dataloader``), with respect to the trainable parameters: those with ``requires_grad``,
    restricted to the trainable entries of any attached ``GradientMask`` / ``SensitiveColumnBlinding``
    (the Hessian of what can move), and to ``params`` if given. Names are resolved at every
    evaluation (``ModelPruning``'s ``weight_orig`` answers to ``weight`` and only its unpruned entries
    count; a tied parameter counts once, under any of its names). It is evaluated on the unwrapped
    module in ``eval()`` mode with ``torch.autograd.grad`` and the math attention kernel (fused
    attention has no second derivative): the user's ``training_step`` is never called, and ``p.grad``,
    optimizer state, BatchNorm running statistics, the module's train/eval mode and every random
    number generator are left as they were.

    Where the number of selected entries is at most ``exact_up_to`` (by default: whenever that costs
    no more matvecs than the estimates), trace, eigenvalues and diagonal are computed exactly;
    otherwise the trace is an XTrace estimate with a standard error, the eigenvalues come from Lanczos
    with full reorthogonalization (the *algebraically* largest, in descending order; with
    ``every_n_steps`` warm-started from the previous top eigenvectors), and the diagonal is exact per
    layer where that is cheap, estimated otherwise. Half-precision models
    (``bf16-true``, ``16-true``): products run in the model's dtype, the algorithms in float32.

    Logged with ``pl_module.log`` (every logger gets them), identical on every DDP rank (the timings
    are rank 0's), under ``prefix`` (``hessian`` unless given):
    ``hessian/trace``, ``hessian/trace_stderr``, ``hessian/eigenvalue_1`` ... ``hessian/eigenvalue_k``,
    ``hessian/matvecs`` (Hessian-vector products spent), ``hessian/seconds`` (wall time),
    ``hessian/overhead`` (the monitor's time as a fraction of training time so far), and with
    ``per_parameter=True`` ``hessian/trace/<parameter>``: the keys of
    :meth:`~lightning_gradmask.curvature.HessianStatistics.scalars` plus the two timings. The full result is in :attr:`latest` and is
    saved as ``<run dir>/epoch=<n>.pt`` (``step=<n>.pt``); the spectral density is drawn to
    ``<run dir>/density_epoch=<n>.png`` and sent to TensorBoard, MLflow and W&B at the scalars' step.
    ``<run dir>`` is ``<log_dir>/hessian`` for TensorBoard and CSV loggers, otherwise
    ``<default_root_dir>/hessian/<run id>``: two runs never share files. With another ``prefix``,
    that directory is named after it instead of ``hessian``, and so are the keys: several monitors
    in one Trainer (each with its own ``state_key``) need prefixes of their own.

    Under DDP the ranks agree on failures: an evaluation that fails on one rank only (its loss on
    that rank's batch, out of memory in a product, the probe loader) makes every rank log NaN for
    it, with no rank left waiting in a collective.

    Args:
        loss_fn: ``(pl_module, batch) -> scalar loss``, or the name of a LightningModule method
            ``(batch) -> loss``. ``None``: the module's ``hessian_loss(batch)`` method.
        stats: any of ``"trace"``, ``"eigenvalues"``, ``"diagonal"``, ``"density"``.
        top_k: number of top eigenvalues.
        every_n_epochs: evaluate after every ``n``-th training epoch (default 1 unless
            ``every_n_steps`` is given).
        every_n_steps: evaluate after every ``n``-th optimizer step, on the latest ``num_batches``
            training batches (edge-of-stability studies track the top eigenvalue every ~100 steps).
        num_batches: batches that define the loss.
        dataloader: a fixed probe set instead of training batches (iterating it, also with
            shuffling, leaves the training run's random streams untouched).
        params: which parameters (default: all trainable ones): names, ``re:`` patterns or
            ``nn.Module`` subclasses, one or a list (see :mod:`lightning_gradmask.functional.selection`).
        per_parameter: also log the trace of each parameter's block.
        trace_matvecs: Hessian-vector products (matvecs) for the trace estimate.
        exact_up_to: compute every statistic exactly when the selected entries are at most this many
            (default: whenever exact is no more expensive than the estimates).
        seed: probes are drawn from ``seed`` and the epoch (or step), the same on every rank.
        save: save the full result (and the density figure) in the run's directory.
        options: the finer estimator options, a
            :class:`~lightning_gradmask.curvature.StatisticsOptions` (e.g.
            ``StatisticsOptions(lanczos_tol=1e-6)``; in a YAML config a mapping ``options: {lanczos_tol: 1.0e-6}``).
        max_overhead: the share of training time the monitor may take (default 0.1). An evaluation
            is skipped (with one warning) when it would bring the monitor's total time above
            ``max_overhead`` times the training time so far; its cost is the last evaluation's, or
            before the first one an estimate from the trial product at train start. Rank 0 decides
            for every rank. On a tiny model or a short run this can skip every evaluation (the
            warning says so, and how many were skipped when training ends). ``None``: evaluate on
            schedule whatever it costs (tiny models, short runs, tests).
        strict: raise when an evaluation fails. By default a failed evaluation warns once with the
            cause and a remedy, logs NaN and training goes on.
        prefix: the logged keys are ``<prefix>/trace`` ... and the files go to a directory named
            ``prefix`` (default ``"hessian"``); a second monitor in the Trainer needs its own, e.g.
            ``prefix="hessian_steps"``.

    Example::

        from lightning_gradmask import HessianMonitor

        monitor = HessianMonitor(
            loss_fn=lambda module, batch: F.mse_loss(module(batch[0]), batch[1]),
            stats=("trace", "eigenvalues", "density"),
            top_k=3,
        )
        trainer = L.Trainer(callbacks=[monitor], max_epochs=10)
        trainer.fit(model, data)
        monitor.latest.eigen.eigenvalues    # tensor of the 3 algebraically largest eigenvalues

        # sharpness every 100 steps, at most 5% of the training time, next to the monitor above
        HessianMonitor(loss_fn, stats="eigenvalues", every_n_steps=100, max_overhead=0.05, prefix="hessian_steps")

    Raises:
        ValueError: (at construction) unknown statistics, counts below 1, a ``loss_fn`` that cannot take ``(pl_module, batch)``; (at ``setup``) no ``loss_fn``
            and no ``hessian_loss`` method, a ``params`` item matching nothing, two monitors with
            the same ``prefix`` in one Trainer; (at train
            start, before the first optimizer step, by a trial evaluation) ``top_k`` above the
            number of trainable entries, a ``loss_fn`` that raises, returns a non-scalar or a tensor
            without a graph, or runs through reentrant activation checkpointing.
        TypeError: (at construction) arguments of the wrong type, e.g. ``dataloader="abc"`` or
            ``options`` that is not a ``StatisticsOptions``.
        UnsupportedStrategyError: (at ``setup``) ``ModelParallelStrategy`` (FSDP2: autograd cannot reach
            its sharded parameters, so no Hessian-vector product; the message says what to do instead),
            FSDP1, DeepSpeed and other sharding strategies.

    A NaN or infinite loss never stops training: the statistics are logged as NaN with a warning.
    """

    def __init__(
        self,
        loss_fn: Union[str, LossFn, None] = None,
        stats: Union[StatName, Sequence[StatName]] = ("trace", "eigenvalues"),
        top_k: int = 1,
        every_n_epochs: int | None = None,
        num_batches: int = 1,
        dataloader: Union[DataLoader, Iterable[Any], None] = None,
        params: Optional[ParamSelector] = None,
        per_parameter: bool = False,
        trace_matvecs: int = 40,
        exact_up_to: int | None = None,
        seed: int = 0,
        save: bool = True,
        options: StatisticsOptions | None = None,
        every_n_steps: int | None = None,
        max_overhead: float | None = 0.1,
        strict: bool = False,
        prefix: str = "hessian",
    ) -> None:
        _check_loss_fn(loss_fn)
        chosen = _check_stats(stats)
        if every_n_epochs is None and every_n_steps is None:
            every_n_epochs = 1
        _check_counts(
            top_k=top_k, num_batches=num_batches, trace_matvecs=trace_matvecs,
            every_n_epochs=every_n_epochs, every_n_steps=every_n_steps,
        )
        _check_exact_up_to(exact_up_to)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise GradmaskConfigTypeError(f"HessianMonitor(seed=...) must be an int, got {seed!r}")
        _check_dataloader(dataloader)
        params = None if params is None else normalize_selector(params, parameter="HessianMonitor(params=...)")
        for name, flag in (("per_parameter", per_parameter), ("save", save), ("strict", strict)):
            if not isinstance(flag, bool):
                raise GradmaskConfigTypeError(f"HessianMonitor({name}=...) must be True or False, got {flag!r}")
        _check_max_overhead(max_overhead)
        _check_prefix(prefix)
        if options is not None and not isinstance(options, StatisticsOptions):
            raise GradmaskConfigTypeError(
                "HessianMonitor(options=...) must be a lightning_gradmask.curvature.StatisticsOptions or None, "
                f"got {type(options).__name__}"
            )
        self.loss_fn = loss_fn
        self.stats = chosen
        self.top_k = top_k
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.params = params
        self.per_parameter = per_parameter
        self.trace_matvecs = trace_matvecs
        self.exact_up_to = exact_up_to
        self.seed = seed
        self.save = save
        self.options = options if options is not None else StatisticsOptions()
        self.max_overhead = max_overhead
        self.strict = strict
        self.prefix = prefix
        self.latest: HessianStatistics | None = None
        """The full result of the latest evaluation (on every rank)."""
        self._batches: deque[Any] = deque(maxlen=num_batches)
        self._overhead = OverheadBudget(max_overhead)
        self._trial_done = False
        self._warned: set[str] = set()
        self._warm_start: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._last_step_evaluated = -1
        self._directory: Path | None = None
        self._skipped = 0
        self._scheduled = 0

    # ------------------------------------------------------------------ setup-time checks
    @property
    @override
    def state_key(self) -> str:
        # several monitors may share a Trainer (say the trace every epoch, the top eigenvalue every 100 steps)
        settings: dict[str, Any] = dict(
            stats=self.stats,
            every_n_epochs=self.every_n_epochs,
            every_n_steps=self.every_n_steps,
            params=None if self.params is None else [p if isinstance(p, str) else p.__qualname__ for p in self.params],
            seed=self.seed,
        )
        if self.prefix != "hessian":  # the default keeps the key of checkpoints written before `prefix`
            settings["prefix"] = self.prefix
        return self._generate_state_key(**settings)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "HessianMonitor", sharded=False, model_parallel_refusal=MODEL_PARALLEL_REFUSAL)
        same = [cb for cb in trainer_callbacks(trainer) if isinstance(cb, HessianMonitor) and cb is not self and cb.prefix == self.prefix]
        if same:
            raise GradmaskConfigError(
                f"HessianMonitor(prefix={self.prefix!r}): {len(same) + 1} HessianMonitors in this Trainer share this "
                "prefix, so they would log the same keys and write the same files; give each its own prefix "
                "(e.g. prefix='hessian_steps')"
            )
        self._resolve_loss(pl_module)
        self._select(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names, params, masks = self._select(pl_module)
        entries = sum(int(masks[n].sum()) if n in masks else params[n].numel() for n in names)
        if "eigenvalues" in self.stats and self.top_k > entries:
            raise GradmaskConfigError(
                f"HessianMonitor(top_k={self.top_k}) exceeds the {entries} trainable entries being monitored"
            )
        self._trial_done = False
        self._warm_start = None
        self._last_step_evaluated = -1
        self._batches.clear()
        self._skipped = self._scheduled = 0
        self._directory = run_directory(trainer, self.prefix) if self.save else None  # a collective: every rank
        self._overhead.start()
        if self.dataloader is not None:
            self._trial(trainer, pl_module, None)

    # ------------------------------------------------------------------ batches
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps is None:
            self._batches.clear()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._trial_done:
            self._trial(trainer, pl_module, batch)
        if self.dataloader is not None:
            return
        if self.every_n_steps is not None or (self._due_epoch(trainer) and len(self._batches) < self.num_batches):
            # epochs: the epoch's first num_batches batches; steps: the latest num_batches (a bounded deque)
            self._batches.append(apply_to_collection(batch, torch.Tensor, lambda t: t.detach()))

    def _probe_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        if self.dataloader is None:
            return list(self._batches)
        batches = []
        for batch in self.dataloader:  # the caller preserves the RNG state (shuffling draws from it)
            batch = trainer.strategy.batch_to_device(batch, pl_module.device)
            batches.append(trainer.precision_plugin.convert_input(batch))
            if len(batches) == self.num_batches:
                break
        return batches

    # ------------------------------------------------------------------ schedule
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._last_step_evaluated:
            return
        self._last_step_evaluated = step
        self._evaluate(trainer, pl_module, f"step={step}", seed_index=step, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due_epoch(trainer):
            epoch = trainer.current_epoch
            self._evaluate(trainer, pl_module, f"epoch={epoch}", seed_index=epoch, on_step=False)

    def _due_epoch(self, trainer: pl.Trainer) -> bool:
        return self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str, seed_index: int, on_step: bool) -> None:
        started = time.perf_counter()
        self._scheduled += 1
        with preserved_rng_state():
            allowed, overhead = self._overhead.allows(), self._overhead.overhead()
            if trainer.world_size > 1:  # rank 0 decides for every rank, and its figure is the one logged
                allowed, overhead = trainer.strategy.broadcast((allowed, overhead))
            if not allowed:
                self._skip(tag)
                self._overhead.spend(time.perf_counter() - started, evaluation=False)
                _log_same_on_every_rank(pl_module, {f"{self.prefix}/overhead": overhead}, on_step)
                return
            # every rank says whether it has its batches before any rank builds an operator on them
            batches, error = self._fetch_batches(trainer, pl_module)
            ranks, _ = agree(trainer, {"failed": error is not None, "empty": not batches})
            if ranks["empty"] and not ranks["failed"]:
                where = "" if trainer.world_size == 1 else f" on rank(s) {ranks['empty']}"
                self._warn_once("no-batch", f"HessianMonitor: no batch to evaluate the Hessian on{where} at {tag}; nothing logged")
                self._overhead.spend(time.perf_counter() - started, evaluation=False)
                return
            result = None
            if ranks["failed"]:
                self._failed(error if error is not None else PeerEvaluationError(ranks["failed"]), tag)
            else:
                result = self._compute_safely(trainer, pl_module, batches, tag, seed_index)
            seconds = time.perf_counter() - started
            self._overhead.spend(seconds, evaluation=result is not None)  # a failure says nothing of the cost
            # every rank logs the same: NaN if the evaluation failed anywhere, rank 0's timings
            ranks, (seconds, overhead) = agree(trainer, {"failed": result is None}, (seconds, self._overhead.overhead()))
            if ranks["failed"]:
                if result is not None:  # it failed after the last collective on another rank
                    self._failed(PeerEvaluationError(ranks["failed"]), tag)
                self._log_nan(pl_module, overhead, on_step)
                return
            assert result is not None
            self.latest = result
            self._log(pl_module, result, seconds, overhead, on_step)
            if self.save and self._directory is not None and trainer.is_global_zero:
                saving = time.perf_counter()
                try:
                    self._save(trainer, result, tag, epoch_end=not on_step)
                except Exception as err:  # a full disk must not end the run either
                    if self.strict:
                        raise
                    self._warn_once("save", f"HessianMonitor: could not save the result of {tag}: {type(err).__name__}: {err}")
                self._overhead.spend(time.perf_counter() - saving, evaluation=False)

    def _skip(self, tag: str) -> None:
        self._skipped += 1
        self._warn_once(
            "budget",
            f"HessianMonitor: skipped the evaluation at {tag} to stay within max_overhead={self.max_overhead} of the "
            f"training time (an evaluation {'takes' if self._overhead.evaluations else 'is estimated to take'} "
            f"{self._overhead.last_cost:.3g} s; the monitor has used {self._overhead.spent:.3g} s of "
            f"{self._overhead.training_seconds():.3g} s of training). Evaluations are being skipped: every one that "
            "does not fit the budget is skipped, and how many were is reported when training ends. Pass "
            "max_overhead=None to evaluate on schedule whatever it costs (tiny models, short runs), or raise "
            "max_overhead, evaluate less often (every_n_epochs/every_n_steps) or ask for less (stats, num_batches, "
            "params).",
        )

    def _fetch_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[list[Any], Exception | None]:
        try:
            return self._probe_batches(trainer, pl_module), None
        except Exception as err:  # a failing probe loader is a failed evaluation, not the end of the run
            return [], err

    def _compute_safely(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any], tag: str, seed_index: int
    ) -> HessianStatistics | None:
        try:
            return self.compute(trainer, pl_module, batches, seed_index=seed_index)
        except NonFiniteLossError as err:
            rank_zero_warn(f"HessianMonitor: {err} ({tag}); statistics logged as NaN")
        except Exception as err:
            self._failed(err, tag)
        return None

    def _failed(self, err: Exception, tag: str) -> None:
        """A failed evaluation: raise (strict) or warn once with the cause; the caller logs NaN."""
        if self.strict:
            raise err
        peer = isinstance(err, PeerEvaluationError)
        self._warn_once(
            "failed",
            f"HessianMonitor: the evaluation at {tag} failed and was skipped: {type(err).__name__}: {err}. "
            f"{'' if peer else _remedy(err) + ' '}Training goes on and the statistics are logged as NaN; later "
            "failures are not reported (strict=True raises instead).",
            on_this_rank=not peer,  # the rank where it failed says why, whatever its number
        )

    def compute(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any], seed_index: int | None = None
    ) -> HessianStatistics | None:
        """Compute the statistics on ``batches`` now (every rank must call this together under DDP).

        Raises what goes wrong (the scheduled evaluations catch it, see ``strict``); a NaN loss raises
        :class:`~lightning_gradmask.curvature.NonFiniteLossError`.
        """
        seed_index = trainer.current_epoch if seed_index is None else seed_index
        with self._evaluation_context(trainer):
            operator = self._operator(trainer, pl_module, batches)
            try:
                warm = self._warm_vector(operator)
                result = hessian_statistics(
                    operator,
                    self.stats,
                    top_k=self.top_k,
                    exact_up_to=self.exact_up_to,
                    trace_matvecs=self.trace_matvecs,
                    seed=self.seed * 1_000_003 + seed_index,
                    options=self.options,
                    lanczos_v0=warm,
                    return_eigenvectors=self.every_n_steps is not None,
                )
            finally:
                operator.release()
        if result.eigen is not None and result.eigen.eigenvectors is not None:
            self._warm_start = (_layout(operator), result.eigen.eigenvectors.sum(dim=1).detach())
            result.eigen.eigenvectors = None  # (dim, k): kept for the warm start only, not in latest or files
        return result

    def _operator(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]) -> HessianOperator:
        loss = self._resolve_loss(pl_module)
        names, params, masks = self._select(pl_module)
        dtypes = {params[n].dtype for n in names}
        return HessianOperator(
            [_bind(loss, pl_module, batch) for batch in batches],
            [(n, params[n]) for n in names],
            masks={n: m.to(params[n].device) for n, m in masks.items()},
            reduce=AgreeingReduce(trainer) if trainer.world_size > 1 else None,  # ranks raise together
            module=pl_module,
            eval_mode=True,
            dtype=torch.float32 if dtypes <= set(_HALF) else None,
        )

    @contextlib.contextmanager
    def _evaluation_context(self, trainer: pl.Trainer) -> Iterator[None]:
        """The math attention kernel (it has a second derivative) and, for ``*-true`` precision, the
        Trainer's default dtype. Mixed precision: no autocast, the Hessian of the float32 model."""
        plugin = trainer.precision_plugin
        dtype = contextlib.nullcontext() if isinstance(plugin, lightning_classes("plugins.precision", "MixedPrecision")) else plugin.forward_context()
        with sdpa_kernel(SDPBackend.MATH), dtype:
            yield

    def _warm_vector(self, operator: HessianOperator) -> torch.Tensor | None:
        if self._warm_start is None or self._warm_start[0] != _layout(operator):
            return None
        return self._warm_start[1]

    # ------------------------------------------------------------------ trial at train start
    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Evaluate ``loss_fn`` once before the first optimizer step: configuration mistakes raise now."""
        self._trial_done = True
        started = time.perf_counter()
        with preserved_rng_state():
            error: Exception | None = None
            try:
                batch = self._trial_loss(trainer, pl_module, batch)
            except Exception as err:
                error = err
            failed, _ = agree(trainer, {"failed": error is not None})  # no rank goes on to a product alone
            if error is not None:
                raise error
            if failed["failed"]:
                raise GradmaskConfigError(
                    f"HessianMonitor(loss_fn={_describe(self.loss_fn)}): the trial evaluation at train start failed "
                    f"on rank(s) {failed['failed']} (their error says why)"
                )
            with self._evaluation_context(trainer), _modes_restored(pl_module):
                self._trial_matvec(trainer, pl_module, batch)
        self._overhead.spend(time.perf_counter() - started, evaluation=False)

    def _trial_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
        """Call ``loss_fn`` on ``batch`` (or the first probe batch) and check what it returns; that batch."""
        if batch is None:
            batches = self._probe_batches(trainer, pl_module)
            if not batches:
                raise GradmaskConfigError("HessianMonitor(dataloader=...) yielded no batch")
            batch = batches[0]
        loss = self._resolve_loss(pl_module)
        with self._evaluation_context(trainer), _modes_restored(pl_module):
            pl_module.eval()
            with torch.inference_mode(False), torch.enable_grad():
                value = _call_loss(self.loss_fn, loss, pl_module, batch)
                _check_graph(self.loss_fn, value)
        return batch

    def _trial_matvec(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """One matvec on ``batch``: the expected cost of an evaluation, and errors of the operator itself."""
        operator = None
        try:
            built = time.perf_counter()
            operator = self._operator(trainer, pl_module, [batch])
            multiplied = time.perf_counter()
            operator.matvec(torch.zeros(operator.dim, dtype=operator.dtype, device=operator.device))
            finished = time.perf_counter()
            planned = planned_matvecs(
                operator.dim, self.stats, top_k=self.top_k, exact_up_to=self.exact_up_to,
                trace_matvecs=self.trace_matvecs, options=self.options,
            )
            # the graph and every product scale with the number of batches
            self._overhead.expect(self.num_batches * (multiplied - built + planned * (finished - multiplied)))
        except NonFiniteLossError:
            pass  # not a configuration mistake: the evaluations log NaN
        except ValueError as err:
            raise GradmaskConfigError(f"HessianMonitor: {err}") from err
        except Exception as err:
            if self.strict:
                raise
            self._warn_once(
                "trial",
                f"HessianMonitor: a trial Hessian-vector product at train start failed: "
                f"{type(err).__name__}: {err}. {_remedy(err)} Training goes on; the evaluations will "
                "log NaN if this persists (strict=True raises instead).",
            )
        finally:
            if operator is not None:
                operator.release()

    # ------------------------------------------------------------------ end of fit
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skipped:
            rank_zero_warn(
                f"HessianMonitor: skipped {self._skipped} of {self._scheduled} scheduled evaluations in this run to "
                f"stay within max_overhead={self.max_overhead}; pass max_overhead=None to evaluate on schedule."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        """Drop what only the run needed: the cached training batches and the warm-start vectors."""
        self._batches.clear()
        self._warm_start = None

    # ------------------------------------------------------------------ selection
    def _select(self, pl_module: pl.LightningModule) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Trainable parameters (canonical names), restricted to ``params``, and their masks, resolved now."""
        table = ParameterTable(pl_module, aliases=_pruned_aliases(pl_module))
        trainable = [name for name in table.names if table.param(name).requires_grad]
        names = trainable if self.params is None else table.select(
            self.params, "HessianMonitor(params=...)", trainable, "the trainable parameters (requires_grad)"
        )
        chosen = set(names)
        aliases = set(table.all_names)
        if not names:
            raise GradmaskConfigError(
                "HessianMonitor: the model has no trainable parameter to monitor (layers created in "
                "configure_model() do not exist yet when callbacks run setup: build them in __init__)"
            )
        masks: dict[str, torch.Tensor] = {}
        for name, mask in parameter_constraints(pl_module).trainable_masks().items():
            target = table.canonical(table.param(name)) if name in aliases else None
            if target in chosen:
                masks[target] = masks[target] & mask if target in masks else mask
        for name in names:
            pruned = _pruning_mask(pl_module, name)
            if pruned is not None:
                masks[name] = masks[name] & pruned.to(masks[name].device) if name in masks else pruned
        return names, {name: table.param(name) for name in names}, masks

    # ------------------------------------------------------------------ output
    def _log(self, pl_module: pl.LightningModule, result: HessianStatistics, seconds: float, overhead: float, on_step: bool) -> None:
        values = result.scalars(f"{self.prefix}/", per_parameter=self.per_parameter)
        values[f"{self.prefix}/seconds"] = seconds
        values[f"{self.prefix}/overhead"] = overhead
        _log_same_on_every_rank(pl_module, values, on_step)

    def _log_nan(self, pl_module: pl.LightningModule, overhead: float, on_step: bool) -> None:
        keys = []
        if "trace" in self.stats:
            keys += ["trace", "trace_stderr"]
        if "eigenvalues" in self.stats:
            keys += [f"eigenvalue_{i}" for i in range(1, self.top_k + 1)]
        values = {f"{self.prefix}/{key}": math.nan for key in keys}
        values[f"{self.prefix}/overhead"] = overhead
        _log_same_on_every_rank(pl_module, values, on_step)

    def _save(self, trainer: pl.Trainer, result: HessianStatistics, tag: str, epoch_end: bool) -> None:
        assert self._directory is not None
        self._directory.mkdir(parents=True, exist_ok=True)
        record = {key: _to_cpu(value) for key, value in asdict(result).items()}  # eigenvectors: already dropped
        torch.save(record, self._directory / f"{tag}.pt")
        if result.density is None:
            return
        figure = density_figure(result, f"Hessian spectral density, {tag.replace('=', ' ')}")
        if figure is None:
            self._warn_once(
                "matplotlib",
                "HessianMonitor: matplotlib is not installed, so the spectral density is saved as numbers "
                "only (pip install matplotlib for the figure)",
            )
            return
        path = self._directory / f"density_{tag}.png"
        send_figure(trainer, figure, path, f"{self.prefix}/density", logger_step(trainer, epoch_end))
        rank_zero_info(f"HessianMonitor: spectral density drawn to {path}")

    # ------------------------------------------------------------------ helpers
    def _warn_once(self, key: str, message: str, on_this_rank: bool = False) -> None:
        """Warn once per ``key``: from rank 0, or with ``on_this_rank`` from whichever rank this is."""
        if key in self._warned:
            return
        self._warned.add(key)
        if on_this_rank and _global_rank() > 0:
            warnings.warn(f"[rank {_global_rank()}] {message}", UserWarning, stacklevel=2)
        else:
            rank_zero_warn(message)

    def _resolve_loss(self, pl_module: pl.LightningModule) -> LossFn:
        if callable(self.loss_fn):
            return self.loss_fn
        method_name = self.loss_fn if isinstance(self.loss_fn, str) else "hessian_loss"
        method = getattr(pl_module, method_name, None)
        if not callable(method):
            if self.loss_fn is None:
                raise GradmaskConfigError(
                    "HessianMonitor needs a loss: pass loss_fn=lambda module, batch: ... or define "
                    f"`hessian_loss(self, batch)` on {type(pl_module).__name__}"
                )
            raise GradmaskConfigError(f"HessianMonitor(loss_fn={self.loss_fn!r}): {type(pl_module).__name__} has no such method")
        return lambda module, batch: getattr(module, method_name)(batch)


# ---------------------------------------------------------------------- checks
_LOSS_FN_CONTRACT = (
    "loss_fn must be a callable (pl_module, batch) -> scalar loss tensor with an autograd graph "
    "(or the name of a LightningModule method (batch) -> loss)"
)


def _check_loss_fn(loss_fn: object) -> None:
    if loss_fn is None:
        return
    if isinstance(loss_fn, str):
        if not loss_fn.isidentifier():
            raise GradmaskConfigError(f"HessianMonitor(loss_fn={loss_fn!r}) is not a method name; {_LOSS_FN_CONTRACT}")
        return
    if not callable(loss_fn):
        raise GradmaskConfigTypeError(f"HessianMonitor(loss_fn=...) must be a callable or a method name, got {type(loss_fn).__name__}")
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # builtins and some C callables: the trial evaluation checks them
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise GradmaskConfigError(
            f"HessianMonitor(loss_fn=...): {getattr(loss_fn, '__name__', type(loss_fn).__name__)}{signature} cannot "
            f"be called as loss_fn(pl_module, batch); {_LOSS_FN_CONTRACT}"
        ) from None


def _check_stats(stats: Union[str, Sequence[str]]) -> tuple[str, ...]:
    chosen = (stats,) if isinstance(stats, str) else tuple(stats)
    unknown = [s for s in chosen if s not in STATS]
    if unknown or not chosen:
        raise GradmaskConfigError(f"HessianMonitor(stats=...): unknown statistics {unknown}; choose from {list(STATS)}")
    return chosen


def _check_counts(**counts: int | None) -> None:
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise GradmaskConfigError(f"HessianMonitor({name}=...) must be an integer >= 1, got {value!r}")


def _check_exact_up_to(exact_up_to: object) -> None:
    if exact_up_to is not None and (isinstance(exact_up_to, bool) or not isinstance(exact_up_to, int) or exact_up_to < 0):
        raise GradmaskConfigError(f"HessianMonitor(exact_up_to=...) must be a non-negative integer, got {exact_up_to!r}")


def _check_max_overhead(max_overhead: object) -> None:
    if max_overhead is not None and (
        isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)) or not max_overhead > 0
    ):
        raise GradmaskConfigError(f"HessianMonitor(max_overhead=...) must be a fraction > 0 (e.g. 0.1) or None, got {max_overhead!r}")


_PREFIX = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


def _check_prefix(prefix: object) -> None:
    if not isinstance(prefix, str):
        raise GradmaskConfigTypeError(f"HessianMonitor(prefix=...) must be a string, got {type(prefix).__name__}")
    if not _PREFIX.fullmatch(prefix) or ".." in prefix.split("/"):
        raise GradmaskConfigError(
            f"HessianMonitor(prefix={prefix!r}) must be a metric prefix and folder name: letters, digits, '_', '-', "
            "'.', parts separated by '/' (e.g. 'hessian_steps')"
        )


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _check_dataloader(dataloader: object) -> None:
    if dataloader is None:
        return
    if isinstance(dataloader, (str, bytes, Mapping, torch.Tensor)) or not isinstance(dataloader, Iterable):
        raise GradmaskConfigTypeError(
            "HessianMonitor(dataloader=...) must be a DataLoader (or another iterable of batches), "
            f"got {type(dataloader).__name__}"
        )


def _call_loss(loss_fn: object, loss: LossFn, module: pl.LightningModule, batch: Any) -> Any:
    try:
        return loss(module, batch)
    except Exception as err:
        raise GradmaskConfigError(
            f"HessianMonitor(loss_fn={_describe(loss_fn)}) raised {type(err).__name__}: {err} when called as "
            f"loss_fn(pl_module, batch) on the first training batch; {_LOSS_FN_CONTRACT}"
        ) from err


def _check_graph(loss_fn: object, value: Any) -> None:
    where = f"HessianMonitor(loss_fn={_describe(loss_fn)})"
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        got = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise GradmaskConfigError(f"{where} must return a scalar floating-point loss tensor, got {got}; {_LOSS_FN_CONTRACT}")
    if not value.requires_grad:
        raise GradmaskConfigError(
            f"{where} returned a loss without an autograd graph (computed under no_grad/inference_mode, detached, "
            f"from frozen parameters only, or through torch.utils.checkpoint(use_reentrant=True)); {_LOSS_FN_CONTRACT}"
        )
    if _uses_reentrant_checkpoint(value):
        raise GradmaskConfigError(
            f"{where}: the loss goes through torch.utils.checkpoint(use_reentrant=True), which does not support "
            "torch.autograd.grad and so no Hessian-vector products. Use use_reentrant=False (Hugging Face: "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})) or turn "
            "activation checkpointing off"
        )


def _uses_reentrant_checkpoint(value: torch.Tensor) -> bool:
    seen: set[int] = set()
    stack = [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "CheckpointFunction" in type(node).__name__:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _describe(loss_fn: object) -> str:
    if isinstance(loss_fn, str) or loss_fn is None:
        return repr(loss_fn if loss_fn is not None else "hessian_loss")
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


def _remedy(err: BaseException) -> str:
    text = str(err)
    if "derivative for" in text and "not implemented" in text:
        return (
            "An operation in the model has no second derivative (double backward); replace it (e.g. "
            "attn_implementation='eager' for attention) or monitor only the parameters before it (params=...)."
        )
    if "out of memory" in text.lower() or isinstance(err, MemoryError):
        return "Use fewer batches (num_batches), fewer parameters (params=...) or fewer statistics."
    if "checkpoint" in text:
        return "Activation checkpointing must use use_reentrant=False for Hessian-vector products."
    if isinstance(err, KeyError | ValueError):
        return "Check loss_fn, params and the masks against the model as it is now."
    return "See the traceback above with strict=True."


# ---------------------------------------------------------------------- small helpers
@contextlib.contextmanager
def _modes_restored(module: torch.nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _pruning_mask(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The ``<name>_mask`` buffer of ``torch.nn.utils.prune`` for a ``..._orig`` parameter, as bool."""
    if not name.endswith("_orig"):
        return None
    try:
        buffer = module.get_buffer(name[: -len("_orig")] + "_mask")
    except AttributeError:
        return None
    return buffer != 0


def _layout(operator: HessianOperator) -> tuple[Any, ...]:
    return tuple(operator.names), tuple(operator.sizes), operator.dim


def _log_same_on_every_rank(pl_module: pl.LightningModule, values: dict[str, float], on_step: bool = False) -> None:
    """Log values that every rank computed identically: no ``sync_dist`` collective is needed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")
        for key, value in values.items():
            pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, sync_dist=False)


def _bind(loss: LossFn, module: pl.LightningModule, batch: Any) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        return loss(module, batch)

    return closure


def _to_cpu(value: Any) -> Any:
    return apply_to_collection(value, torch.Tensor, lambda t: t.detach().cpu())


def _pruned_aliases(module: torch.nn.Module) -> dict[str, str]:
    """``torch.nn.utils.prune`` renames ``weight`` to ``weight_orig``: keep the old name selectable."""
    names = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    present = set(names)
    return {name[: -len("_orig")]: name for name in names if name.endswith("_orig") and name[: -len("_orig")] not in present}
