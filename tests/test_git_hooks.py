"""The git hooks in hooks/ name test files by path; a file that moves leaves a pre-push hook that fails
with "file or directory not found" only when someone pushes. Every path they name must exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted((ROOT / "hooks").glob("pre-*"))


@pytest.mark.parametrize("hook", HOOKS, ids=lambda p: p.name)
def test_every_test_path_a_git_hook_names_exists(hook):
    named = re.findall(r"\btests/[\w/.-]+", hook.read_text())
    missing = [path for path in named if not (ROOT / path).exists()]
    assert not missing, f"{hook.relative_to(ROOT)} names test paths that do not exist: {missing}"


def test_the_git_hooks_are_found():
    assert {hook.name for hook in HOOKS} >= {"pre-commit", "pre-push"}
