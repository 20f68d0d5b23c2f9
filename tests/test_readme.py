"""The README's Python snippets run as written, one after the other."""

import re

from utils import REPO_ROOT


def test_readme_python_snippets_run_in_order(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)  # anything a snippet writes lands here
    namespace: dict = {"__name__": "readme"}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message says which block broke
            raise AssertionError(f"README python block {index + 1} failed: {err!r}\n{block}") from err
    assert not list(tmp_path.iterdir()), "the README's snippets should leave no files in the working directory"
