"""mkdocs hooks: make docs/_lib importable by the pages' executed blocks (markdown-exec runs them in the
mkdocs process), so each page imports its figure helper in one hidden line; and check that every
`show(...)` call of a page put a figure into the built page (a warning otherwise, which --strict turns
into a failed build), so a figure cannot silently go missing."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

LIB = str(Path(__file__).resolve().parent / "_lib")
EXEC_BLOCK = re.compile(r'^```python[^\n]*\bexec="[^"]+"[^\n]*\n(.*?)^```', flags=re.M | re.S)
SHOW_CALL = re.compile(r"(?<![\w.])show\(")
FIGURE = 'src="data:image/png;base64,'

log = logging.getLogger("mkdocs.hooks.figures")
expected: dict[str, int] = {}


def on_startup(**kwargs) -> None:
    if LIB not in sys.path:
        sys.path.insert(0, LIB)


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    expected[page.file.src_uri] = sum(len(SHOW_CALL.findall(code)) for code in EXEC_BLOCK.findall(markdown))
    return markdown


def on_post_page(output: str, page, **kwargs) -> str:
    want, got = expected.get(page.file.src_uri, 0), output.count(FIGURE)
    if got < want:
        log.warning(f"{page.file.src_uri}: {want} show(...) calls but {got} figures in the built page")
    return output
