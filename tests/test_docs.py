"""The documentation site's structure (the build itself, which executes the tutorials, is `mkdocs build
--strict` in .ci/run): every public name has an API reference entry that resolves to that very object,
and every page is in the navigation."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import neox_lab
import neox_lab.testing

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"


def reference_entries() -> dict[str, str]:
    """{identifier: page} of every `::: identifier` line of the API reference pages."""
    entries = {}
    for page in sorted(REFERENCE.glob("*.md")):
        for match in re.finditer(r"^::: ([\w.]+)\s*$", page.read_text(encoding="utf-8"), flags=re.M):
            entries[match.group(1)] = page.name
    return entries


def resolve(identifier: str):
    """The object a mkdocstrings identifier names: the longest importable module prefix, then attributes."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(identifier)


@pytest.mark.parametrize("package", [neox_lab, neox_lab.testing], ids=lambda p: p.__name__)
def test_every_public_name_has_a_reference_entry(package):
    entries = reference_entries()
    missing = []
    for name in package.__all__:
        wanted = getattr(package, name)
        if not any(ident.rsplit(".", 1)[-1] == name and resolve(ident) is wanted for ident in entries):
            missing.append(name)
    assert not missing, (f"{package.__name__}: {missing} have no `::: module.Name` entry in docs/reference/*.md "
                         "(add one where its page groups it, with the module that defines it)")


def test_every_reference_entry_resolves():
    for identifier, page in reference_entries().items():
        try:
            resolve(identifier)
        except (ImportError, AttributeError) as err:
            raise AssertionError(f"docs/reference/{page}: `::: {identifier}` names nothing ({err})") from err


def nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [p for value in node.values() for p in nav_pages(value)]
    return [p for item in node for p in nav_pages(item)]


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = nav_pages(yaml.safe_load(text)["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")
                   if not p.relative_to(DOCS).parts[0].startswith("_"))
    assert sorted(nav) == pages, (f"pages missing from mkdocs.yml's nav: {sorted(set(pages) - set(nav))}; "
                                  f"nav entries without a page: {sorted(set(nav) - set(pages))}")
