#!/usr/bin/env bash
# Run the test suite against the LOWEST supported versions: every `name>=X` in pyproject.toml's
# [project] dependencies is installed as `name==X` (plus pytorch-lightning at lightning's floor) in a
# fresh virtual environment under .venv-lowest/, then the package is installed and pytest runs.
#
#   .ci/lowest.sh               # lowest lightning/lightning-utilities, the torch already installed here
#   LOWEST_TORCH=1 .ci/lowest.sh  # also the lowest torch (LOWEST_TORCH_INDEX picks the index)
#
# Not part of .ci/run: it installs packages (a minute or two) and runs the whole suite again.
# Extra arguments go to pytest, e.g. `.ci/lowest.sh -x -q tests/test_gradient_mask.py`.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-lowest
# --system-site-packages: reuse the torch installed on this machine unless LOWEST_TORCH=1 (torch
# from the public index would be the multi-GB CUDA build).
python3 -m venv --clear --system-site-packages "$venv"
py="$venv/bin/python"

pins=$("$py" - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
floors = {}
for dep in deps:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)\s*", dep)
    if not match:
        raise SystemExit(f"lowest.sh: cannot read a floor from {dep!r} (expected 'name>=version')")
    floors[match.group(1).lower()] = match.group(2)
floors.pop("typing-extensions", None)  # its floor is torch's own (torch 2.13 needs a newer one)
floors["pytorch-lightning"] = floors["lightning"]  # the second namespace, tested at the same floor
print(" ".join(f"{name}=={version}" for name, version in floors.items()))
PY
)
torch_pin=$(tr ' ' '\n' <<<"$pins" | grep '^torch==')
others=$(tr ' ' '\n' <<<"$pins" | grep -v '^torch==' | tr '\n' ' ')

if [[ "${LOWEST_TORCH:-0}" == 1 ]]; then
    # from pip's configured index: on PyPI that is the (large) CUDA build, which runs on CPU too;
    # LOWEST_TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU-only build instead
    "$py" -m pip install --quiet "$torch_pin" ${LOWEST_TORCH_INDEX:+--index-url "$LOWEST_TORCH_INDEX"}
fi
# shellcheck disable=SC2086
"$py" -m pip install --quiet $others
"$py" -m pip install --quiet --no-deps -e .
"$py" -c "import torch, lightning, pytorch_lightning, lightning_utilities as lu
print('lowest run on: torch', torch.__version__, '| lightning', lightning.__version__,
      '| pytorch_lightning', pytorch_lightning.__version__, '| lightning_utilities', lu.__version__)"
PYTHONPATH="$PWD" "$py" -m pytest -p no:cacheprovider "$@"
