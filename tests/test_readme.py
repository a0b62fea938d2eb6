"""The README's python blocks run, verbatim, in order, in one namespace (later blocks use the `model` an
earlier one made), from a temporary working directory. The "Equivalence testing in CI" section is left
to tests/testing/test_testing_readme.py, which builds the checkpoints its blocks name."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_SECTION = "## Equivalence testing in CI"


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block outside the equivalence section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SKIP_SECTION)
    end = text.index("\n## ", start + len(SKIP_SECTION))
    blocks = []
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        if not start <= match.start() < end:
            blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def test_readme_has_python_blocks_outside_the_equivalence_section():
    assert len(python_blocks()) >= 5


def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")  # the "Bigger than one GPU" block places a model
    pytest.importorskip("zstandard")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for line, code in python_blocks():
        # Paths the blocks write under /tmp are made fresh for each run.
        code = code.replace("/tmp/", f"{tmp_path}/")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            except Exception as err:  # name the block, keep the traceback
                raise AssertionError(f"README.md block at line {line} failed: {type(err).__name__}: {err}") from err
