"""mkdocs hook: make docs/_lib importable by the pages' executed blocks (markdown-exec runs them in the
mkdocs process), so each page imports its figure helper in one hidden line."""

from __future__ import annotations

import sys
from pathlib import Path

LIB = str(Path(__file__).resolve().parent / "_lib")


def on_startup(**kwargs) -> None:
    if LIB not in sys.path:
        sys.path.insert(0, LIB)
