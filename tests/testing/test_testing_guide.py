"""Every code block of the documentation's "Equivalence testing in CI" guide
(docs/guides/equivalence-testing.md) runs, verbatim, in a temporary
project holding the checkpoints the blocks name: python blocks are executed in order in one namespace,
except those that open with a file path comment (`# tests/test_my_port.py`, `# my_port.py`), which are
written there (the pytest example is run with the command the page gives, the port factory by the
`py:` commands); bash lines and the workflow's `run:` steps that call neox-lab or pytest are executed
and must exit 0, text blocks are not code."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neox_lab import NeoXForCausalLM
from neox_lab.cli import main
from neox_lab.testing.pairs import make_trained_like, tiny_config

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "guides" / "equivalence-testing.md"
TEXT = PAGE.read_text(encoding="utf-8")


def _blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(\w*)\n(.*?)```", TEXT, flags=re.S)


BLOCKS = _blocks()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """checkpoints/original (trained-like) and checkpoints/converted (a re-save)."""
    root = tmp_path_factory.mktemp("project")
    torch.manual_seed(0)
    model = make_trained_like(NeoXForCausalLM(tiny_config(num_hidden_layers=2)).eval(), seed=0, std=0.1)
    model.save_pretrained(root / "checkpoints" / "original")
    original = NeoXForCausalLM.from_pretrained(root / "checkpoints" / "original")
    original.save_pretrained(root / "checkpoints" / "converted")
    (root / "tests").mkdir()
    return root


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return env


def _pytest(line: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "pytest"], line
    argv = [sys.executable, *argv[1:], "-p", "no:cacheprovider"]
    return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def _is_file(code: str) -> bool:
    return re.match(r"# [\w/.-]+\.py\n", code) is not None


def test_the_section_has_the_blocks_this_test_knows():
    kinds = [lang for lang, _ in BLOCKS]
    assert kinds.count("python") == 4 and "bash" in kinds and "yaml" in kinds
    assert sum(_is_file(c) for lang, c in BLOCKS if lang == "python") == 2
    assert set(kinds) <= {"python", "bash", "yaml", "text"}  # no unlabelled block escapes this test


def test_python_examples_run(project, monkeypatch):
    monkeypatch.chdir(project)
    namespace = {"__name__": "guide"}
    for code in [c for lang, c in BLOCKS if lang == "python" and not _is_file(c)]:
        exec(compile(code, str(PAGE.relative_to(ROOT)), "exec"), namespace)


def _write_files(project: Path) -> None:
    for code in [c for lang, c in BLOCKS if lang == "python" and _is_file(c)]:
        path = code.splitlines()[0].removeprefix("# ").strip()
        (project / path).write_text(code)


def test_pytest_example_passes_with_the_page_command(project):
    _write_files(project)
    command = re.search(r"Run it with `([^`]+)`", TEXT).group(1)
    result = _pytest(command, project)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 passed" in result.stdout


def test_bash_and_workflow_commands_run(project, monkeypatch):
    lines = []
    for lang, code in BLOCKS:
        if lang == "bash":
            lines += [ln for ln in code.splitlines() if ln.strip() and not ln.startswith("#")]
        if lang == "yaml":
            lines += re.findall(r"^\s*(?:- )?run: (?!\|)(.+)$", code, flags=re.M)
            assert any(ln.strip().startswith("pip install") for ln in code.splitlines())  # not repeated here
    page_pytest = re.search(r"Run it with `([^`]+)`", TEXT).group(1).split()
    _write_files(project)  # the port factory the py: commands name
    monkeypatch.chdir(project)
    ran = 0
    for line in dict.fromkeys(lines):  # the bash block and the workflow share commands: run each once
        argv = shlex.split(line, comments=True)
        if argv[:3] == ["python", "-m", "pytest"]:
            # the same run as test_pytest_example_passes_with_the_page_command, -q aside
            assert sorted(a for a in argv if a != "-q") == sorted(page_pytest), line
            continue
        assert argv[0] == "neox-lab", f"the page runs an unexpected command: {line}"
        assert main(argv[1:]) == 0, line
        ran += 1
    assert ran >= 3 and (project / "reports" / "fp16.json").is_file() and (project / "reports" / "port.json").is_file()
