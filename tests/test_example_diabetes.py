"""The main example runs, as a plain script and as a LightningCLI command with its YAML config."""

import re

from utils import REPO_ROOT, run_script

SCRIPT = REPO_ROOT / "examples" / "diabetes_blinding.py"
CONFIG = REPO_ROOT / "examples" / "configs" / "diabetes_blinding.yaml"


def test_plain_run_prints_the_report_and_writes_logs(tmp_path):
    result = run_script(SCRIPT, "--epochs", "2", "--log-dir", str(tmp_path))
    out = result.stdout
    assert re.search(r"without blinding\s+\d+\.\d\s+-?\d\.\d{3}", out)
    assert re.search(r"age, sex severed\s+\d+\.\d\s+-?\d\.\d{3}", out)
    assert "severed weights in net.0: max |w| = 0.0" in out
    assert "blinded model:   columns age, sex on 88 samples: INDEPENDENT" in out
    for perturbation in ("large", "inf", "nan"):
        assert re.search(rf"\b{perturbation} \(set to .*outputs identical, gradients identical", out)
    assert "unblinded model: columns age, sex on 88 samples: NOT independent" in out
    assert (tmp_path / "csv" / "blinded" / "version_0" / "metrics.csv").is_file()
    header = (tmp_path / "csv" / "blinded" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "blinding/net.0/weight_deviation" in header and "val_mse" in header
    assert str(tmp_path / "csv" / "blinded" / "version_0") in out


def test_lightning_cli_fit_with_the_yaml_config(tmp_path):
    result = run_script(
        SCRIPT,
        "fit",
        "--config",
        str(CONFIG),
        "--trainer.max_steps",
        "3",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path),
    )
    assert "independence check (sever on 'net.0'): columns age, sex on 88 samples: INDEPENDENT" in result.stdout
    assert "SensitiveColumnBlinding (sever): columns age, sex of layer 'net.0'" in result.stderr
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()
