"""The layout's promise: the pure tensor code (functional/, curvature/, errors) never imports Lightning."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_gradmask"
PURE = sorted([*(PACKAGE / "functional").glob("*.py"), *(PACKAGE / "curvature").glob("*.py"), PACKAGE / "errors.py"])


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", PURE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_modules_import_no_lightning(path: Path) -> None:
    lightning = {m for m in imported_modules(path) if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_utilities")}
    assert not lightning, f"{path.name} imports {sorted(lightning)}"
    ours = {m for m in imported_modules(path) if m.startswith("lightning_gradmask.")}
    assert all(m.split(".")[1] in ("functional", "curvature", "errors") for m in ours), f"{path.name} imports {sorted(ours)}"
