"""Train a diabetes-progression regressor that provably does not use age or sex.

scikit-learn ships the diabetes data (442 patients, 10 features: age, sex, bmi, bp, s1..s6; the
target is a disease-progression score), so nothing is downloaded. The model is a small MLP; the
callback ``SensitiveColumnBlinding`` severs the ``age`` and ``sex`` columns of its first layer.

Plain run (trains a model with and one without blinding, then prints a report: test error of
both, a proof that the blinded model's outputs do not change when age/sex are set to huge values,
inf or NaN, and where the logs are)::

    python examples/diabetes_blinding.py
    python examples/diabetes_blinding.py --epochs 80 --log-dir my_logs

As a LightningCLI command with a YAML config (trains the blinded model and prints the
independence check after fit)::

    python examples/diabetes_blinding.py fit --config examples/configs/diabetes_blinding.yaml
    python examples/diabetes_blinding.py fit --config examples/configs/diabetes_blinding.yaml --trainer.max_epochs 5

Logs go to a CSV logger, and to TensorBoard too when ``tensorboard`` is installed
(``tensorboard --logdir lightning_logs/tensorboard``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning_gradmask  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gradmask import IndependenceReport, SensitiveColumnBlinding, verify_independence  # noqa: E402

SENSITIVE = ["age", "sex"]
CLI_COMMANDS = {"fit", "validate", "test", "predict"}

# a 442-row table is loaded in the main process; worker processes would only add start-up time
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
# a deprecation notice raised inside Lightning itself, not about this example's code
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class DiabetesData(L.LightningDataModule):
    """scikit-learn's bundled diabetes data, split into train/val/test and standardized.

    Every column is standardized with the training split's mean and standard deviation, one
    column at a time (a per-column scaling mixes no features, so blinding still holds). The
    target is standardized the same way: a mean squared error of 1.0 means "no better than
    predicting the mean"; :meth:`to_original_units` turns predictions back into the score.

    Args:
        batch_size: training batch size.
        val_fraction: share of the patients held out for validation.
        test_fraction: share of the patients held out for the test report.
        split_seed: seed of the random split (independent of the training seed).
    """

    def __init__(
        self, batch_size: int = 32, val_fraction: float = 0.15, test_fraction: float = 0.2, split_seed: int = 0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        raw = load_diabetes(as_frame=False)  # bundled with scikit-learn, no download
        self.feature_names: list[str] = [str(n) for n in raw.feature_names]
        x = torch.tensor(raw.data, dtype=torch.float32)
        y = torch.tensor(raw.target, dtype=torch.float32)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
        n_test, n_val = round(len(x) * test_fraction), round(len(x) * val_fraction)
        test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        self.x_mean, self.x_std = x[train].mean(0), x[train].std(0)
        self.y_mean, self.y_std = y[train].mean(), y[train].std()
        scale_x = lambda idx: (x[idx] - self.x_mean) / self.x_std  # noqa: E731
        scale_y = lambda idx: (y[idx] - self.y_mean) / self.y_std  # noqa: E731
        self.train_set = TensorDataset(scale_x(train), scale_y(train))
        self.val_set = TensorDataset(scale_x(val), scale_y(val))
        self.test_set = TensorDataset(scale_x(test), scale_y(test))

    def to_original_units(self, standardized: torch.Tensor) -> torch.Tensor:
        return standardized * self.y_std + self.y_mean

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=len(self.test_set))


class DiabetesRegressor(L.LightningModule):
    """An MLP ``net = Linear(n_features, hidden) -> ReLU -> Linear(hidden, hidden) -> ReLU -> Linear(hidden, 1)``.

    ``net.0`` reads the raw (standardized) features: it is the layer to blind.

    Args:
        n_features: number of input columns.
        hidden: width of the two hidden layers.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (decoupled; severed weights stay exactly 0 anyway).
    """

    def __init__(self, n_features: int = 10, hidden: int = 16, lr: float = 1e-3, weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def _mse(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._mse(batch)
        self.log("train_mse", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_mse", self._mse(batch), prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_mse", self._mse(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


# ------------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------------
def make_loggers(log_dir: str | Path, name: str, tensorboard: bool = True) -> list[Logger]:
    """A CSV logger, plus a TensorBoard logger when ``tensorboard`` is installed."""
    loggers: list[Logger] = [CSVLogger(save_dir=Path(log_dir) / "csv", name=name)]
    if tensorboard and _tensorboard_installed():
        loggers.append(TensorBoardLogger(save_dir=Path(log_dir) / "tensorboard", name=name, default_hp_metric=False))
    return loggers


def _tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def independence_report(model: nn.Module, data: DiabetesData, columns: list[Any]) -> IndependenceReport:
    """Perturb ``columns`` of the test inputs (huge values, inf, NaN, noise, other rows' values)."""
    x_test = data.test_set.tensors[0]
    return verify_independence(model, x_test, columns, feature_names=data.feature_names)


def test_set_errors(model: nn.Module, data: DiabetesData) -> tuple[float, float]:
    """Test RMSE in the original score units, and R^2."""
    x, y = data.test_set.tensors
    model.eval()
    with torch.no_grad():
        pred = data.to_original_units(model(x))
    truth = data.to_original_units(y)
    rmse = float((pred - truth).square().mean().sqrt())
    r2 = 1.0 - float((pred - truth).square().sum() / (truth - truth.mean()).square().sum())
    return rmse, r2


# ------------------------------------------------------------------------------------------------
# plain run: train without and with blinding, print a report
# ------------------------------------------------------------------------------------------------
def train(data: DiabetesData, blinded: bool, args: argparse.Namespace) -> tuple[DiabetesRegressor, L.Trainer]:
    L.seed_everything(args.seed, verbose=False)
    model = DiabetesRegressor(n_features=len(data.feature_names), hidden=args.hidden)
    callbacks = []
    if blinded:
        callbacks.append(
            SensitiveColumnBlinding(columns=SENSITIVE, feature_names=data.feature_names, layer="net.0", mode="sever")
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=make_loggers(args.log_dir, "blinded" if blinded else "unblinded", tensorboard=not args.no_tensorboard),
        enable_model_summary=False,
        log_every_n_steps=5,
        deterministic=True,
    )
    print(f"\n=== training {'with age, sex severed' if blinded else 'without blinding'} ({args.epochs} epochs)")
    trainer.fit(model, datamodule=data)
    return model, trainer


def report(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    start = time.perf_counter()
    data = DiabetesData(batch_size=args.batch_size)
    plain, plain_trainer = train(data, blinded=False, args=args)
    blind, blind_trainer = train(data, blinded=True, args=args)

    rmse_plain, r2_plain = test_set_errors(plain, data)
    rmse_blind, r2_blind = test_set_errors(blind, data)
    check_blind = independence_report(blind, data, SENSITIVE)
    check_plain = independence_report(plain, data, SENSITIVE)
    severed = blind.net[0].weight.detach()[:, [data.feature_names.index(c) for c in SENSITIVE]]

    n_test = len(data.test_set)
    print("\n" + "=" * 78)
    print(f"Diabetes progression, {len(data.feature_names)} features, sensitive: {', '.join(SENSITIVE)}")
    print(f"test set: {n_test} patients, error in score units (target std {float(data.y_std):.1f})")
    print(f"  {'model':<28}{'test RMSE':>10}{'test R^2':>10}")
    print(f"  {'without blinding':<28}{rmse_plain:>10.1f}{r2_plain:>10.3f}")
    print(f"  {'age, sex severed':<28}{rmse_blind:>10.1f}{r2_blind:>10.3f}")
    print(f"\nproof of independence: test inputs with {', '.join(SENSITIVE)} replaced, outputs compared exactly")
    print(f"  severed weights in net.0: max |w| = {float(severed.abs().max()):.1f} ({severed.numel()} weights)")
    print("  blinded model:   " + _indent(str(check_blind)))
    print("  unblinded model: " + check_plain.summary())
    rows = next((c for c in check_plain.checks if c.name == "rows"), None)
    if rows is not None and not rows.outputs_identical:
        print(f"                   (giving patients each other's age and sex moves a prediction by up to "
              f"{rows.max_abs_difference * float(data.y_std):.1f} score points)")
    print("\nlogs:")
    for tag, trainer in (("unblinded", plain_trainer), ("blinded", blind_trainer)):
        for logger in trainer.loggers:
            kind = "TensorBoard" if isinstance(logger, TensorBoardLogger) else "CSV"
            print(f"  {tag:<10} {kind:<12} {logger.log_dir}")
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path:
            print(f"  {tag:<10} {'checkpoint':<12} {trainer.checkpoint_callback.best_model_path}")
    if any(isinstance(lg, TensorBoardLogger) for lg in blind_trainer.loggers):
        print(f"  view: tensorboard --logdir {Path(args.log_dir) / 'tensorboard'}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    if not check_blind.independent:
        raise SystemExit("the blinded model is NOT independent of the sensitive columns")


def _indent(text: str) -> str:
    return text.replace("\n", "\n" + " " * 19)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="LightningCLI form: python examples/diabetes_blinding.py fit --config examples/configs/diabetes_blinding.yaml",
    )
    parser.add_argument("--epochs", type=int, default=40, help="training epochs per model (default 40)")
    parser.add_argument("--hidden", type=int, default=16, help="hidden width (default 16)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="lightning_logs", help="root of the CSV/TensorBoard logs")
    parser.add_argument("--no-tensorboard", action="store_true", help="log to CSV only")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# LightningCLI form
# ------------------------------------------------------------------------------------------------
class DiabetesCLI(LightningCLI):
    """``fit`` trains as configured; afterwards the blinded columns are checked on the test set."""

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        blinders = [cb for cb in self.trainer.callbacks if isinstance(cb, SensitiveColumnBlinding)]
        for blinder in blinders:
            model = self.model.cpu()
            check = verify_independence(
                model, self.datamodule.test_set.tensors[0], list(blinder.blinded_columns), feature_names=self.datamodule.feature_names
            )
            print(f"\nindependence check ({blinder.mode} on {blinder.layer_name!r}): {check}")
        if not blinders:
            print("\nno SensitiveColumnBlinding callback configured: the model reads every column")
        for logger in self.trainer.loggers:
            print(f"logs: {logger.log_dir}")


def cli_main(args: Optional[list[str]] = None) -> DiabetesCLI:
    loggers: list[dict[str, Any]] = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": "lightning_logs/csv", "name": "diabetes_cli"}},
    ]  # fmt: skip
    if _tensorboard_installed():
        loggers.append(
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
             "init_args": {"save_dir": "lightning_logs/tensorboard", "name": "diabetes_cli", "default_hp_metric": False}}
        )  # fmt: skip
    return DiabetesCLI(
        DiabetesRegressor,
        DiabetesData,
        args=args,
        trainer_defaults={"logger": loggers, "accelerator": "cpu", "devices": 1},
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str]) -> None:
    if argv and (argv[0] in CLI_COMMANDS or argv[0] in {"--print_config", "--config"}):
        torch.set_num_threads(1)
        # from the command line LightningCLI reads sys.argv itself (args= is for calls from Python)
        cli_main(None if argv == sys.argv[1:] else argv)
    else:
        report(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
