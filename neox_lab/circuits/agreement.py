"""How far two attributions agree: rank correlation of their scores over a graph's edges."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["ranks", "spearman"]


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of `values` (1-D), tied values sharing their mean rank."""
    values = values.double()
    order = values.argsort()
    sorted_values = values[order]
    rank = torch.empty_like(values)
    start = 0
    n = len(values)
    while start < n:
        stop = start + 1
        while stop < n and sorted_values[stop] == sorted_values[start]:
            stop += 1
        rank[order[start:stop]] = (start + stop + 1) / 2  # mean of ranks start+1 .. stop
        start = stop
    return rank


def spearman(a: Mapping[str, float], b: Mapping[str, float], *, absolute: bool = False) -> float:
    """Spearman's rank correlation of two ``{edge: score}`` mappings over the same edges (of the
    |scores| with ``absolute=True``): the Pearson correlation of their ranks, ties at mean rank."""
    if set(a) != set(b):
        raise ValueError(f"the two score mappings cover different edges ({len(set(a) ^ set(b))} differ)")
    keys = list(a)
    x = torch.tensor([float(a[k]) for k in keys], dtype=torch.float64)
    y = torch.tensor([float(b[k]) for k in keys], dtype=torch.float64)
    if absolute:
        x, y = x.abs(), y.abs()
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / denominator if denominator > 0 else float("nan")
