"""The dependency rules import-linter cannot see (docs/architecture.md): no neox_lab module is imported
inside a function, no private name is imported from another file, and the moved modules' old paths
are the moved modules themselves.

Layers and circles are import-linter's job (`lint-imports`, contracts in pyproject.toml); these two
rules keep that check honest, since an import hidden in a function is how a circle hides.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import neox_lab

PACKAGE = Path(neox_lab.__file__).parent


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported_module(node: ast.ImportFrom | ast.Import, path: Path) -> list[str]:
    """The absolute names `node` imports from, as far as neox_lab is concerned."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not node.level:
        return [node.module or ""]
    package = path.parent.relative_to(PACKAGE.parent).parts
    base = ".".join(package[: len(package) - node.level + 1])
    return [f"{base}.{node.module}" if node.module else base]


def test_no_neox_lab_module_is_imported_inside_a_function():
    # In-function imports are for optional third-party packages only (transformers, hypothesis,
    # flash-attn, huggingface_hub, ...); one of a neox_lab module is how a circle hides.
    found = []
    for path in package_files():
        for func in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    own = [m for m in imported_module(node, path) if m.split(".")[0] == "neox_lab"]
                    found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {m}" for m in own]
    assert not found, "move these imports to the top of their files:\n" + "\n".join(found)


def test_no_private_name_is_imported_from_another_file():
    found = []
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("neox_lab")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {name}" for name in private]
    assert not found, "make these public, or keep their users in the same file:\n" + "\n".join(found)


@pytest.mark.parametrize("name", ["patching", "interventions", "plotting"])
def test_moved_module_paths_are_the_moved_modules(name):
    old = importlib.import_module(f"neox_lab.{name}")
    assert old is importlib.import_module(f"neox_lab.analysis.{name}")


def test_every_exported_name_resolves():
    assert neox_lab.ActivationStore is neox_lab.CachedActivations
    for name in neox_lab.__all__:
        assert getattr(neox_lab, name) is not None, name
