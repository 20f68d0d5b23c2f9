"""Every callback in one 2-process DDP run with bf16, accumulation, clipping, AdamW and a resume."""

import csv
import math
from pathlib import Path

import pytest
import torch

from utils import REPO_ROOT, run_script

SEVERED = [0, 1]
TRAINABLE = torch.ones(16, 6, dtype=torch.bool)
TRAINABLE[::2, 2:] = False


def test_all_callbacks_compose_under_ddp_and_resume(tmp_path):
    run_script(REPO_ROOT / "tests" / "ddp" / "everything_ddp.py", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    start = torch.load(tmp_path / "start_rank0.pt")
    assert all(r["epochs"] == 4 for r in ranks)

    # ranks identical
    for name, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][name]), name
    final = ranks[0]["final"]

    # severed weights exactly 0, and the trained model's outputs ignore the severed columns
    weight = final["net.0.weight"]
    assert torch.equal(weight[:, SEVERED], torch.zeros(16, 2))
    assert ranks[0]["independent"] and ranks[1]["independent"]

    # frozen edges bit-identical to their start (those not severed; severed ones are 0)
    frozen = ~TRAINABLE
    frozen[:, SEVERED] = False
    assert frozen.any()
    assert torch.equal(weight[frozen], start["net.0.weight"][frozen])
    assert torch.equal(final["net.2.bias"], start["net.2.bias"])
    trainable = TRAINABLE.clone()
    trainable[:, SEVERED] = False
    assert (weight[trainable] != start["net.0.weight"][trainable]).all()

    # the proximal L1 step reached exact zeros somewhere in net.2.weight
    assert (final["net.2.weight"] == 0).any()

    # Hessian statistics identical on both ranks, and in the logger's files
    assert ranks[0]["trace"] == ranks[1]["trace"] and math.isfinite(ranks[0]["trace"])
    assert torch.equal(ranks[0]["eigenvalues"], ranks[1]["eigenvalues"])
    with open(Path(ranks[0]["log_dir"]) / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("hessian/trace")]
    assert [int(row["epoch"]) for row in rows] == [2, 3]
    # the logger stores float32
    assert float(rows[-1]["hessian/trace"]) == pytest.approx(ranks[0]["trace"], rel=1e-6)
    assert float(rows[-1]["hessian/eigenvalue_1"]) == pytest.approx(float(ranks[0]["eigenvalues"][0]), rel=1e-6)
    assert (Path(ranks[0]["log_dir"]) / "hessian" / "epoch=3.pt").is_file()
