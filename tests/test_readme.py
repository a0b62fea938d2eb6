"""The README is the front page: the two commands, a short tour that runs, and a table of contents into
docs/ whose links resolve. Everything else lives in one page of the documentation site, whose examples
run when it is built (tests/test_docs_blocks.py says where each one runs).

The README's python blocks run, verbatim, in order, in one namespace, from a temporary working
directory; the tour is the site's home-page tour, so the two front pages show one tour."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```", flags=re.M | re.S)


def python_blocks(text: str = README) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(3)) for m in FENCE.finditer(text) if m.group(1) == "python"]


def test_readme_is_a_front_page():
    assert len(README.splitlines()) < 200
    assert len(python_blocks()) >= 1


def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for line, code in python_blocks():
        code = code.replace("/tmp/", f"{tmp_path}/")  # paths a block writes under /tmp are fresh each run
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            except Exception as err:  # name the block, keep the traceback
                raise AssertionError(f"README.md block at line {line} failed: {type(err).__name__}: {err}") from err


def test_the_tour_is_the_site_home_page_tour():
    home = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    site_tours = [m.group(3) for m in FENCE.finditer(home) if m.group(1) == "python" and 'session="home"' in m.group(2)]
    assert [code for _, code in python_blocks()] == site_tours, "README's tour and docs/index.md's differ"


def test_the_two_commands_come_first_and_ci_runs_the_second():
    lang, _, code = FENCE.search(README).groups()
    demo, tests = (line.split("#")[0].strip() for line in code.strip().splitlines())
    assert lang == "bash" and demo.endswith("neox-lab demo") and tests.endswith("python -m pytest -q")
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    ci = [[arg for arg in shlex.split(step) if arg != "-q"]
          for line in ci_lines if not line.startswith("#") for step in line.split("&&")]
    for step in tests.split("&&"):  # each step of the README's test command is a line of .ci/run (-q aside)
        assert [arg for arg in shlex.split(step) if arg != "-q"] in ci, step


def test_links_resolve_and_the_table_of_contents_covers_the_site():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    missing = [link for link in local if not (ROOT / link).is_file()]
    assert not missing, f"README links to files that do not exist: {missing}"
    docs = ROOT / "docs"
    pages = {str(p.relative_to(ROOT)) for p in docs.rglob("*.md")
             if p.relative_to(docs).parts[0] not in ("_lib", "reference")}
    pages.add("docs/reference/index.md")
    assert not pages - set(local), f"pages the README's table of contents does not link: {sorted(pages - set(local))}"
