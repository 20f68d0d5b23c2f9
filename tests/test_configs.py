"""Every LightningCLI config in examples/configs runs (`fit --config ...`, a few steps)."""

import runpy
import sys
from pathlib import Path

import pytest
import yaml

from utils import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "examples" / "configs").glob("*.yaml"))


def command_of(config: Path) -> list[str]:
    """The `python examples/X.py fit --config ...` line each config documents in its comments."""
    for line in config.read_text().splitlines():
        words = line.lstrip("# ").split()
        if words[:1] == ["python"] and "--config" in words:
            return words[1:]
    raise AssertionError(f"{config.name} does not say which command runs it")


def test_there_is_a_config_for_every_callback():
    text = "\n".join(c.read_text() for c in CONFIGS)
    for name in ("GradientMask", "SensitiveColumnBlinding", "HessianMonitor", "GradientNoise", "WeightNoise", "l1_strength"):
        assert name in text, name


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs(config, tmp_path, monkeypatch):
    script, *args = command_of(config)
    settings = yaml.safe_load(config.read_text())
    logger = settings.get("trainer", {}).get("logger")
    if isinstance(logger, dict):  # keep the run's logs out of the checkout
        logger.setdefault("init_args", {})["save_dir"] = str(tmp_path)
    local = tmp_path / config.name
    local.write_text(yaml.safe_dump(settings))
    args = [str(local) if a == str(config.relative_to(REPO_ROOT)) else a for a in args]
    args += ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4", "--trainer.log_every_n_steps", "1",
             "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.chdir(tmp_path)  # scripts that log relative to the working directory log here
    runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
    assert list(tmp_path.rglob("*.ckpt")), "the fit should have written a checkpoint"


def stats_typo(init_args):
    init_args["stats"] = ["trace", "eigenvalue"]


def trace_method_typo(init_args):
    init_args["options"]["trace_method"] = "exactly"


@pytest.mark.parametrize(
    "typo, message",
    [
        (stats_typo, "Literal['trace', 'eigenvalues', 'diagonal', 'density']. Got value: eigenvalue"),
        (trace_method_typo, "Got value: exactly"),
    ],
    ids=["stats", "estimator-options"],
)
def test_a_choice_typo_in_a_config_names_the_choices(tmp_path, monkeypatch, capsys, typo, message):
    config = REPO_ROOT / "examples" / "configs" / "hessian_monitor.yaml"
    settings = yaml.safe_load(config.read_text())
    typo(settings["trainer"]["callbacks"][0]["init_args"])
    local = tmp_path / "typo.yaml"
    local.write_text(yaml.safe_dump(settings))
    monkeypatch.setattr(sys, "argv", ["frozen_edges.py", "fit", "--config", str(local)])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        runpy.run_path(str(REPO_ROOT / "examples" / "frozen_edges.py"), run_name="__main__")
    assert message in capsys.readouterr().err


def test_fit_from_a_config_prints_a_summary(tmp_path, monkeypatch, capsys):
    config = REPO_ROOT / "examples" / "configs" / "gradient_mask.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    local = tmp_path / "gradient_mask.yaml"
    local.write_text(yaml.safe_dump(settings))
    argv = ["frozen_edges.py", "fit", "--config", str(local), "--trainer.max_epochs", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(REPO_ROOT / "examples" / "frozen_edges.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "fit summary" in out and "train_loss" in out
    assert "GradientMask net.0.weight: 123 of 128 entries frozen, bit-identical to their start: True" in out
    assert (tmp_path / "gradient_mask" / "version_0" / "metrics.csv").read_text().count("\n") > 2  # metrics logged
