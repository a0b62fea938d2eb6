"""Figures of circuit discovery: the graph layered by layer with edges weighted by score, and the
faithfulness curve (how much of the clean-corrupted metric gap a circuit of n edges recovers).

Figures are built without pyplot (headless, no backend selected) and returned; ``save=`` also
writes a PNG.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

__all__ = ["draw_graph", "faithfulness_curve", "node_positions"]

_DPI = 120
_CMAP = "RdBu_r"  # positive scores red, negative blue
#: Horizontal offset of a head's q / k / v input from the head's centre, in node spacings.
_PORT = {"q": -0.22, "k": 0.0, "v": 0.22}
_KIND_STYLE = {"q": "-", "k": "--", "v": ":"}


def _save(fig: Figure, save: str | os.PathLike | None) -> None:
    if save is not None:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=_DPI, bbox_inches="tight")


def _floats(values) -> np.ndarray:
    # Duck-typed (a tensor, an array or a list), so torch stays out of this module.
    return np.asarray(values.tolist() if hasattr(values, "tolist") else values, dtype=float)


def node_positions(graph) -> dict[str, tuple[float, float]]:
    """(x, y) of every node: one row per layer (input at the bottom, logits at the top), the heads of
    a layer side by side and its MLP to their right; in a sequential block the MLP sits half a row
    above its attention, since it reads it."""
    width = graph.n_heads + 1
    pos = {"input": ((width - 1) / 2, 0.0), "logits": ((width - 1) / 2, graph.n_layers + 1.0)}
    for layer in range(graph.n_layers):
        for head in range(graph.n_heads):
            pos[f"a{layer}.h{head}"] = (float(head), layer + 1.0)
        pos[f"m{layer}"] = (float(graph.n_heads), layer + 1.0 + (0.0 if graph.parallel else 0.5))
    return pos


def draw_graph(graph, values=None, edges: Sequence[str] | None = None, *, ax=None, title: str | None = None,
               max_width: float = 6.0, min_score: float = 0.0, label_heads: Mapping[str, str] | None = None,
               save: str | os.PathLike | None = None) -> Figure:
    """Draw `graph`: nodes layered by layer, each edge an arc from its sender to its receiver's input
    (a head's q / k / v inputs are three ports on its lower edge, drawn solid / dashed / dotted).

    values: scores in the graph's edge order (a tensor or array): width proportional to |score|
        (the largest `max_width` points), colour by sign. Without them every edge is thin and grey.
    edges: draw only these (a circuit); nodes outside it are faded. Default: every edge whose
        |score| exceeds `min_score`.
    label_heads: extra text under a node's name, e.g. ``{"a1.h2": "induction"}``.
    """
    pos = node_positions(graph)
    scores = None if values is None else _floats(values)
    names = graph.edges
    chosen = list(range(len(names))) if edges is None else sorted(graph.edge_index[e] for e in edges)
    if scores is not None and edges is None:
        chosen = [i for i in chosen if abs(scores[i]) > min_score]
    fig = ax.figure if ax is not None else Figure(figsize=(1.3 * (graph.n_heads + 1) + 1.5, 1.4 * graph.n_layers + 2.2))
    ax = ax if ax is not None else fig.add_subplot()
    top = max((abs(scores[i]) for i in chosen), default=0.0) if scores is not None else 0.0
    norm = Normalize(-top if top > 0 else -1.0, top if top > 0 else 1.0)
    cmap = colormaps[_CMAP]
    sender_idx, receiver_idx = graph.endpoints
    used = {"logits"} if edges is not None else set(graph.nodes)
    # Draw weak edges first so the strong ones lie on top.
    order = sorted(chosen, key=lambda i: abs(scores[i]) if scores is not None else 0.0)
    for i in order:
        src = graph.senders[int(sender_idx[i])]
        receiver = graph.receivers[int(receiver_idx[i])]
        dst = graph.node_of(receiver)
        kind = receiver[-2] if receiver.endswith(">") else None
        x0, y0 = pos[src]
        x1, y1 = pos[dst]
        x1 += _PORT.get(kind, 0.0)
        if scores is None:
            colour, width = "0.6", 0.6
        else:
            colour = cmap(norm(scores[i]))
            width = 0.3 + (max_width - 0.3) * (abs(scores[i]) / top if top > 0 else 0.0)
        bend = 0.25 if (x1 - x0) * (y1 - y0) >= 0 else -0.25
        arrow = FancyArrowPatch((x0, y0 + 0.12), (x1, y1 - 0.14), arrowstyle="-|>", mutation_scale=6 + width,
                                connectionstyle=f"arc3,rad={bend * min(1.0, abs(x1 - x0) / 2 + 0.1)}",
                                linewidth=width, linestyle=_KIND_STYLE.get(kind, "-"), color=colour,
                                alpha=0.85, zorder=1)
        ax.add_patch(arrow)
        used.update((src, dst))
    for node, (x, y) in pos.items():
        on = node in used
        face = {"input": "#d9d9d9", "logits": "#d9d9d9"}.get(node, "#fde0c5" if node.startswith("m") else "#cfe3f7")
        ax.text(x, y, node, ha="center", va="center", fontsize=8, zorder=3, alpha=1.0 if on else 0.35,
                bbox=dict(boxstyle="round,pad=0.3", facecolor=face, edgecolor="0.3" if on else "0.8"))
        if label_heads and node in label_heads:
            ax.text(x, y - 0.3, label_heads[node], ha="center", va="top", fontsize=6.5, color="0.25", zorder=3)
    ax.set_xlim(-0.8, graph.n_heads + 0.8)
    ax.set_ylim(-0.6, graph.n_layers + 1.6)
    ax.set_yticks([0] + [layer + 1 for layer in range(graph.n_layers)] + [graph.n_layers + 1])
    ax.set_yticklabels(["embed"] + [f"layer {layer}" for layer in range(graph.n_layers)] + ["unembed"], fontsize=8)
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    residual = "parallel" if graph.parallel else "sequential"
    ax.set_title(title or f"{len(chosen)} of {len(names)} edges ({residual} residual); "
                 "q solid, k dashed, v dotted", fontsize=9)
    if scores is not None and top > 0:
        mappable = ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(mappable, ax=ax, fraction=0.04, pad=0.02).set_label("edge score", fontsize=8)
    _save(fig, save)
    return fig


def faithfulness_curve(counts: Sequence[int], fractions: Mapping[str, Sequence[float]], *, total_edges: int,
                       title: str | None = None, save: str | os.PathLike | None = None) -> Figure:
    """The metric of circuits of `counts` edges as a fraction of the clean-corrupted gap (1: the clean
    model, 0: the corrupted one), one line per label in `fractions` (e.g. per attribution method)."""
    counts = list(counts)
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot()
    for label, values in fractions.items():
        values = _floats(values)
        if len(values) != len(counts):
            raise ValueError(f"fractions[{label!r}] has {len(values)} values for {len(counts)} counts")
        ax.plot(counts, values, marker="o", markersize=3, label=label)
    ax.axhline(1.0, color="0.3", linewidth=0.8, linestyle="--")
    ax.axhline(0.0, color="0.3", linewidth=0.8, linestyle=":")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, total_edges)
    ax.set_xlabel(f"edges in the circuit (of {total_edges})")
    ax.set_ylabel("fraction of clean - corrupted recovered")
    ax.set_title(title or "Faithfulness: circuit metric vs size", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, save)
    return fig
