"""examples/sparse_finetune.py: a tiny BERT fine-tuned at 1% density, compact optimizer state, exact frozen entries."""

import re

from utils import REPO_ROOT, run_script

SCRIPT = REPO_ROOT / "examples" / "sparse_finetune.py"


def test_prints_memory_and_exactness():
    out = run_script(SCRIPT, "--epochs", "1").stdout
    assert "frozen entries bit-identical in 41 of 41 parameters: EXACT" in out
    plain = float(re.search(r"plain AdamW.*?(\d+\.\d) KiB", out).group(1))
    compact = float(re.search(r"compact=True\), 1%.*?(\d+\.\d) KiB", out).group(1))
    assert compact < plain / 50  # state for ~1% of the entries only
