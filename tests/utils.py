"""Small models, data and Trainer settings shared by the tests (no test logic here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO_ROOT = Path(__file__).resolve().parents[1]

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]

#: FSDP2 (``fully_shard``) runs on CPU processes only where torch's CPU stream can record events
#: (torch 2.6, the floor, has FSDP2 for CUDA only: its all-gather fails on CPU).
FSDP2_RUNS_ON_CPU = hasattr(torch.cpu.Stream, "record_event")
FSDP2_SKIP_REASON = f"FSDP2 does not run on CPU processes with torch {torch.__version__}"

#: Scratch space of this test process (Trainer root dirs, generated scripts), removed when it exits.
_SCRATCH = tempfile.TemporaryDirectory(prefix="gradmask-test-")


def scratch_dir() -> str:
    """A fresh directory under this process's scratch space: nothing lands in the checkout or stays behind."""
    return tempfile.mkdtemp(dir=_SCRATCH.name)


def regression_data(n: int = 64, features: int = 6, seed: int = 0) -> TensorDataset:
    """A seeded regression set: y depends on every feature."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, 1, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loader(dataset: TensorDataset | None = None, batch_size: int = 16) -> DataLoader:
    return DataLoader(dataset if dataset is not None else regression_data(), batch_size=batch_size, shuffle=False)


class TinyRegressor(L.LightningModule):
    """Linear(features, hidden) -> Tanh -> Linear(hidden, 1), MSE loss, configurable optimizer."""

    def __init__(
        self,
        features: int = 6,
        hidden: int = 8,
        optimizer: OptimizerFactory | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self._optimizer = optimizer or (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._optimizer(self.parameters())


def trainer(trainer_class: Callable[..., Any] = L.Trainer, **overrides: Any) -> Any:
    """A quiet CPU Trainer (``trainer_class``: another namespace's, e.g. ``pytorch_lightning.Trainer``);
    keyword arguments override the defaults."""
    settings: dict[str, Any] = dict(
        default_root_dir=scratch_dir(),  # nothing lands in the checkout
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    settings.update(overrides)
    return trainer_class(**settings)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def run_distributed(main: Callable[[], None]) -> None:
    """Run a DDP test script's ``main`` on this rank, then leave the process without finalizing it.

    Once ``main`` returns on a rank, every collective of the script has completed on every rank (each one
    needs all of them), so nothing is left to run. Exiting normally was flaky in two ways:

    * interpreter finalization could abort with "terminate called without an active exception" while a
      collective issued just before exit (``trainer.log_dir`` broadcasts) was still releasing its tensors
      on gloo's worker thread;
    * ``torch.distributed.destroy_process_group()``, which avoided that, hung on rank 0 in about one run
      in three of ``everything_ddp.py`` with torch 2.6 (faulthandler: the main thread in
      ``destroy_process_group``, the results already written).

    ``os._exit`` after flushing stdout and stderr skips both.
    """
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_script(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a test script in a fresh interpreter (DDP re-launches its script), raising on failure.

    Past ``timeout`` seconds the script and every process it started are killed and
    ``subprocess.TimeoutExpired`` is raised: a DDP hang fails the test instead of stalling the suite.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), str(REPO_ROOT / "tests"), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    # a session of its own: on a timeout (a hang in a collective) every rank is killed, not only rank 0
    with subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=str(REPO_ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if result.returncode != 0:
        raise AssertionError(
            f"{script.name} {' '.join(args)} exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-8000:]}"
        )
    return result
