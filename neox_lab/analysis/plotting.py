"""Matplotlib figures for attention patterns, activation patching, logit lens, induction scores, and a
measurement over training checkpoints.

Every function builds a ``matplotlib.figure.Figure`` directly (no pyplot), so it works headless
without selecting a backend, and returns it; pass ``save=`` to also write a PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

__all__ = [
    "format_token", "attention_pattern", "attention_patterns", "patching_heatmap", "logit_lens",
    "induction_scores", "over_training", "save_png",
]  # fmt: skip

_DPI = 120
_SEQ_CMAP = "Blues"
_DIV_CMAP = "RdBu"


def format_token(tok: str) -> str:
    """Render a token string so whitespace is visible in tick labels and annotations.

    Backslashes and control characters are escaped repr-style (``"\\n"`` -> ``\\n``, tab ->
    ``\\t``) without surrounding quotes, and each leading space becomes ``␣``. A token that
    is entirely spaces becomes all ``␣``; an empty token becomes ``""``.
    """
    tok = str(tok)
    if tok == "":
        return '""'
    # repr() escapes control chars and non-printables; strip its quotes and undo quote-escaping
    # so an apostrophe inside the token is not shown as \'.
    body = repr(tok)[1:-1].replace("\\'", "'").replace('\\"', '"')
    stripped = body.lstrip(" ")
    return "␣" * (len(body) - len(stripped)) + stripped


def _to_numpy(x: Any) -> np.ndarray:
    # Duck-typed so torch stays an optional dependency of this module.
    if hasattr(x, "detach"):
        x = x.detach()
    if hasattr(x, "cpu"):
        x = x.cpu()
    if hasattr(x, "float") and not isinstance(x, np.ndarray):
        x = x.float()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        x = x.numpy()
    return np.asarray(x, dtype=float)


def _require_ndim(arr: np.ndarray, ndim: int, name: str) -> None:
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)}")


def _require_len(labels: Sequence[Any], expected: int, name: str, shape: tuple[int, ...]) -> None:
    if len(labels) != expected:
        raise ValueError(f"{name} has length {len(labels)} but data of shape {shape} needs {expected}")


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    """Write `fig` as a PNG at the resolution every figure here uses, creating the folder (for figures
    composed from several of these functions' panels)."""
    _save(fig, path)


def _save(fig: Figure, save: str | os.PathLike | None) -> None:
    if save is None:
        return
    path = Path(save)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI, bbox_inches="tight")


def _finish(fig: Figure, ax, im, *, xlabel: str, ylabel: str, title: str | None, cbar_label: str,
            save: str | os.PathLike | None) -> None:
    """Axis labels, optional title, a labelled colour bar, then write the PNG if asked."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    fig.colorbar(im, ax=ax).set_label(cbar_label)
    _save(fig, save)


def _fig_size(rows: int, cols: int, cell: float = 0.45, min_w: float = 4.0, min_h: float = 3.0):
    # Scale with the grid so long token sequences keep readable tick labels.
    return (max(min_w, cols * cell + 2.0), max(min_h, rows * cell + 1.5))


def _set_ticks(ax: Axes, xlabels: Sequence[str], ylabels: Sequence[str], rotate_x: bool = True) -> None:
    ax.set_xticks(range(len(xlabels)))
    ax.set_xticklabels(list(xlabels), rotation=90 if rotate_x else 0)
    ax.set_yticks(range(len(ylabels)))
    ax.set_yticklabels(list(ylabels))


def _annotate(ax: Axes, texts: np.ndarray, colours: np.ndarray, norm: Normalize, fontsize: float = 7) -> None:
    for (i, j), text in np.ndenumerate(texts):
        # Light text on dark cells keeps annotations legible across the colour scale.
        dark = norm(colours[i, j]) > 0.6
        ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def attention_pattern(
    pattern: Any,
    tokens: Sequence[str],
    *,
    title: str | None = None,
    save: str | os.PathLike | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Plot one attention head's pattern as a heatmap.

    ``pattern`` is a ``[query_pos, key_pos]`` tensor or array of probabilities (colour scale
    fixed to 0..1). ``tokens`` label the key positions (x, rotated 90°) and query positions (y).
    If ``ax`` is given the heatmap is drawn there and its figure is returned. Raises
    ``ValueError`` if ``len(tokens)`` does not match the pattern's shape.
    """
    arr = _to_numpy(pattern)
    _require_ndim(arr, 2, "pattern")
    tokens = list(tokens)
    if arr.shape[0] != len(tokens) or arr.shape[1] != len(tokens):
        raise ValueError(
            f"pattern shape {tuple(arr.shape)} does not match len(tokens)={len(tokens)}; "
            f"expected ({len(tokens)}, {len(tokens)})"
        )
    if ax is None:
        fig = Figure(figsize=_fig_size(*arr.shape))
        ax = fig.add_subplot(1, 1, 1)
        own_fig = True
    else:
        fig = ax.figure
        own_fig = False
    im = ax.imshow(arr, cmap=_SEQ_CMAP, vmin=0.0, vmax=1.0, aspect="auto")
    labels = [format_token(t) for t in tokens]
    _set_ticks(ax, labels, labels)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title is not None:
        ax.set_title(title)
    if own_fig:
        # Only add a colorbar to a figure we own; a caller-supplied ax may share one.
        fig.colorbar(im, ax=ax)
    _save(fig, save)
    return fig


def attention_patterns(
    patterns: Any,
    tokens: Sequence[str],
    *,
    labels: Sequence[str],
    ncols: int = 4,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Plot several heads' attention patterns in a grid with one shared 0..1 colorbar.

    ``patterns`` is ``[n, query_pos, key_pos]``; ``labels`` gives the n subplot titles (e.g.
    ``"L1H3"``). Unused grid cells are hidden. ``title`` becomes the figure's suptitle.
    """
    arr = _to_numpy(patterns)
    _require_ndim(arr, 3, "patterns")
    n = arr.shape[0]
    _require_len(labels, n, "labels", tuple(arr.shape))
    if n == 0:
        raise ValueError("patterns must contain at least one head")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    seq = max(arr.shape[1], 1)
    side = max(2.5, seq * 0.3 + 1.0)
    fig = Figure(figsize=(ncols * side + 1.0, nrows * side + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for idx, ax in enumerate(axes.flat):
        if idx >= n:
            ax.set_visible(False)
            continue
        attention_pattern(arr[idx], tokens, title=str(labels[idx]), ax=ax)
    fig.colorbar(axes.flat[0].images[0], ax=axes, shrink=0.8)
    if title is not None:
        fig.suptitle(title)
    _save(fig, save)
    return fig


def patching_heatmap(
    values: Any,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    save: str | os.PathLike | None = None,
    cbar_label: str = "metric",
) -> Figure:
    """Plot a ``[rows, cols]`` patching result with a diverging colormap centred at zero.

    The colour limits are ``±max|values|`` so zero is always white. ``col_labels`` are passed
    through :func:`format_token` so token positions render legibly; use it for layers ×
    positions or layers × heads.
    """
    arr = _to_numpy(values)
    _require_ndim(arr, 2, "values")
    _require_len(row_labels, arr.shape[0], "row_labels", tuple(arr.shape))
    _require_len(col_labels, arr.shape[1], "col_labels", tuple(arr.shape))
    finite = arr[np.isfinite(arr)]
    m = float(np.abs(finite).max()) if finite.size else 0.0
    if m == 0.0:
        m = 1e-12
    fig = Figure(figsize=_fig_size(*arr.shape))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(arr, cmap=_DIV_CMAP, vmin=-m, vmax=m, aspect="auto")
    _set_ticks(ax, [format_token(c) for c in col_labels], [str(r) for r in row_labels])
    _finish(fig, ax, im, xlabel=xlabel, ylabel=ylabel, title=title, cbar_label=cbar_label, save=save)
    return fig


def logit_lens(
    top_tokens: Sequence[Sequence[str]],
    values: Any,
    *,
    layer_labels: Sequence[str],
    position_labels: Sequence[str],
    title: str | None = None,
    save: str | os.PathLike | None = None,
    cbar_label: str = "p(top token)",
) -> Figure:
    """Plot a logit-lens grid: layers on y, positions on x, colour = ``values`` (0..1).

    ``top_tokens[layer][pos]`` is the decoded top prediction; each cell is annotated with it,
    formatted by :func:`format_token` and shortened to 6 characters (``…`` marks a cut).
    ``position_labels`` (usually the input tokens) are formatted the same way.
    """
    arr = _to_numpy(values)
    _require_ndim(arr, 2, "values")
    shape = tuple(arr.shape)
    _require_len(top_tokens, arr.shape[0], "top_tokens", shape)
    for row in top_tokens:
        _require_len(row, arr.shape[1], "top_tokens row", shape)
    _require_len(layer_labels, arr.shape[0], "layer_labels", shape)
    _require_len(position_labels, arr.shape[1], "position_labels", shape)
    texts = np.empty(arr.shape, dtype=object)
    for i, row in enumerate(top_tokens):
        for j, tok in enumerate(row):
            texts[i, j] = _shorten(format_token(tok), 6)
    fig = Figure(figsize=_fig_size(*arr.shape, cell=0.7))
    ax = fig.add_subplot(1, 1, 1)
    norm = Normalize(vmin=0.0, vmax=1.0)
    im = ax.imshow(arr, cmap=_SEQ_CMAP, norm=norm, aspect="auto")
    _annotate(ax, texts, arr, norm)
    _set_ticks(ax, [format_token(p) for p in position_labels], [str(layer) for layer in layer_labels])
    _finish(fig, ax, im, xlabel="position", ylabel="layer", title=title, cbar_label=cbar_label, save=save)
    return fig


def induction_scores(
    scores: Any,
    *,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Plot a ``[layers, heads]`` induction-score heatmap, each cell annotated to 2 decimals.

    The colour scale spans ``min(0, scores.min())`` .. ``max(1, scores.max())`` so scores are
    comparable across models.
    """
    arr = _to_numpy(scores)
    _require_ndim(arr, 2, "scores")
    finite = arr[np.isfinite(arr)]
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = max(1.0, float(finite.max())) if finite.size else 1.0
    n_layers, n_heads = arr.shape
    fig = Figure(figsize=_fig_size(n_layers, n_heads, cell=0.55))
    ax = fig.add_subplot(1, 1, 1)
    norm = Normalize(vmin=lo, vmax=hi)
    im = ax.imshow(arr, cmap=_SEQ_CMAP, norm=norm, aspect="auto")
    texts = np.vectorize(lambda v: f"{v:.2f}", otypes=[object])(arr)
    _annotate(ax, texts, arr, norm)
    _set_ticks(ax, [str(h) for h in range(n_heads)], [str(i) for i in range(n_layers)], rotate_x=False)
    _finish(fig, ax, im, xlabel="head", ylabel="layer", title=title, cbar_label="induction score", save=save)
    return fig


def _line_labels(arr: np.ndarray, labels: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """[n_steps lines] values and a label per line, from [n_steps], [n_steps lines] or [n_steps layer head]."""
    if arr.ndim == 1:
        return arr[:, None], list(labels) if labels is not None else [""]
    if arr.ndim == 3:
        n_layers, n_heads = arr.shape[1:]
        default = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
        arr = arr.reshape(arr.shape[0], -1)
    elif arr.ndim == 2:
        default = [str(i) for i in range(arr.shape[1])]
    else:
        raise ValueError(f"values must be [n_steps], [n_steps lines] or [n_steps layer head], got shape {arr.shape}")
    labels = default if labels is None else [str(x) for x in labels]
    _require_len(labels, arr.shape[1], "labels", tuple(arr.shape))
    return arr, labels


def over_training(
    steps: Sequence[int],
    values: Any,
    *,
    labels: Sequence[str] | None = None,
    ylabel: str = "value",
    title: str | None = None,
    mark_step: int | None = None,
    mark_label: str | None = None,
    ax: Axes | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Plot a measurement against training step: one line per head or layer, the step axis logarithmic.

    ``values`` is ``[n_steps]`` (one line), ``[n_steps, lines]`` or ``[n_steps, layers, heads]`` (a line
    per head, labelled ``L{layer}H{head}``, coloured by layer). Step 0 stays on the axis: the scale is
    linear below the first positive step and logarithmic above (matplotlib's symlog). ``mark_step``
    draws a dashed vertical line there (e.g. where induction heads appear), labelled ``mark_label``.
    If ``ax`` is given the plot is drawn there and its figure is returned.
    """
    steps_arr = np.asarray(list(steps), dtype=float)
    raw = _to_numpy(values)
    arr, names = _line_labels(raw, labels)
    if steps_arr.ndim != 1 or len(steps_arr) != arr.shape[0] or not len(steps_arr):
        raise ValueError(f"steps ({len(steps_arr)}) must give one step per row of values {tuple(arr.shape)}")
    if not np.all(np.isfinite(steps_arr)) or (steps_arr < 0).any():
        raise ValueError("steps must be finite and >= 0 (steps of a sweep whose checkpoints have no step "
                         "cannot be plotted against step)")
    if ax is None:
        fig = Figure(figsize=(7.0, 4.2), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    order = np.argsort(steps_arr, kind="stable")
    # A line per head is coloured by its layer; other lines each get their own colour.
    groups, per_group = (raw.shape[1], raw.shape[2]) if raw.ndim == 3 else (arr.shape[1], 1)
    cmap = matplotlib.colormaps["viridis"]
    handles, legend = [], []
    for i, name in enumerate(names):
        group = i // per_group
        colour = cmap(group / max(1, groups - 1) * 0.9)
        (line,) = ax.plot(steps_arr[order], arr[order, i], marker="o", markersize=3, linewidth=1.2, color=colour,
                          label=name or None, alpha=0.85)
        # A line per head: the legend names layers (their colours), not every head.
        if name and (per_group == 1 or i % per_group == 0):
            handles.append(line)
            legend.append(name if per_group == 1 else f"layer {group} ({per_group} heads)")
    positive = steps_arr[steps_arr > 0]
    if positive.size:
        if (steps_arr == 0).any():
            ax.set_xscale("symlog", linthresh=float(positive.min()), linscale=0.5)
        else:
            ax.set_xscale("log")
    if len(set(steps_arr)) <= 12:  # few checkpoints: name each one on the axis (slanted, so close ones fit)
        ax.set_xticks(sorted(set(steps_arr)), [f"{s:g}" for s in sorted(set(steps_arr))], rotation=45,
                      fontsize=8)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if mark_step is not None:
        handles.append(ax.axvline(mark_step, color="crimson", linestyle="--", linewidth=1.2,
                                  label=mark_label if mark_label is not None else f"step {mark_step}"))
        legend.append(handles[-1].get_label())
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if handles:
        ax.legend(handles, legend, fontsize=7, loc="best")
    _save(fig, save)
    return fig
