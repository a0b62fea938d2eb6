"""Say what happened when a value is NaN or infinite: which side, which stream, at how many of which
positions. Equal infinities on both sides (masked attention scores) are agreement, not a finding."""

from __future__ import annotations

import torch


def one_sided(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per leading index (a real position): (a non-finite where b agrees not, b non-finite where a is finite)."""
    same = (a == b) | (a.isnan() & b.isnan())
    a_bad = (~a.isfinite() & ~same & b.isfinite()).flatten(1).any(-1) if a.dim() > 1 else ~a.isfinite() & ~same
    b_bad = (~b.isfinite() & ~same & a.isfinite()).flatten(1).any(-1) if b.dim() > 1 else ~b.isfinite() & ~same
    return a_bad, b_bad


def kind_of(t: torch.Tensor) -> str:
    """"NaN", "inf" or "NaN and inf": what is non-finite in `t`."""
    nan, inf = bool(t.isnan().any()), bool(t.isinf().any())
    return "NaN and inf" if nan and inf else ("NaN" if nan else "inf")


def describe(who: str, t: torch.Tensor, rows: torch.Tensor, where: str, other: str) -> str:
    """"model_b, transformers (eager, float64): NaN at 31 of 63 real positions of the left-padded batch;
    model_a finite there"."""
    return (f"non-finite on one side only: {who}: {kind_of(t[rows])} at {int(rows.sum())} of {rows.numel()} real "
            f"positions of {where}; {other} finite there")
