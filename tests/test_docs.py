"""The documentation site, API reference included, builds from the docstrings without warnings."""

import shutil
import subprocess
import sys

import pytest

from utils import REPO_ROOT


def test_mkdocs_builds_strict(tmp_path):
    if shutil.which("mkdocs") is None and subprocess.run([sys.executable, "-m", "mkdocs", "--version"]).returncode:
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("GradientMask", "SensitiveColumnBlinding", "HessianMonitor", "GradientNoise", "WeightNoise", "MaskedL1Mixin"):
        assert name in api, name
