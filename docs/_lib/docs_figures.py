"""What the executed pages use to put a matplotlib figure into the page: an inline PNG, so the built
site needs no extra files and a figure is always the one this build computed."""

from __future__ import annotations

import base64
import inspect
import io

import matplotlib

matplotlib.use("Agg")  # no display at build time

import matplotlib.pyplot as plt  # noqa: E402


def show(fig, width: int | None = None, alt: str = "figure") -> None:
    """Print `fig` as an <img> (the block must have html="1"), then close it.

    markdown-exec captures a block's output through the `print` it puts in the block's globals (not
    sys.stdout), so the image is printed with the calling block's `print`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    style = f' style="max-width:{width}px"' if width else ""
    emit = inspect.currentframe().f_back.f_globals.get("print", print)
    emit(f'<img alt="{alt}" src="data:image/png;base64,{data}"{style}>')
