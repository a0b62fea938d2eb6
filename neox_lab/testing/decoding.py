"""The decoding check, run wherever a side can decode (neox_lab and transformers causal LMs, a port with
`step` or `generate`):

1. KV-cache consistency, per side: the prompt's first P tokens as one call (prefill), then tokens
   P, P+1, ... one call each with the cache; each call's logits must equal the side's own full forward
   at that position, within twice its rounding there (`Floors.self_rel`: its measured rounding at that
   position or on average, whichever is larger). Step s feeds position P+s-1; a
   failure is named "decoding: step s (position P+s-1)".
2. Greedy generation across sides: N tokens from the same prompt must be the same tokens, or differ
   first where the reference's top-2 logits are within twice the per-logit bound (a near tie rounding
   may flip; the rest of that row is then not compared).

Rows are unpadded (a port's `step(input_ids, past)` takes no mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .metrics import ratio
from .side_base import Side

#: Default number of incremental steps (and of generated tokens).
DECODE_STEPS = 8
#: Rows of the main batch used.
DECODE_ROWS = 2


@dataclass
class StepResult:
    side: str
    step: int  # 0: the prefill's last position; s >= 1: the s-th call with the cache
    position: int
    rel: float
    bound: float
    top1_agree: bool

    @property
    def passed(self) -> bool:
        return self.rel <= self.bound and self.top1_agree


@dataclass
class GreedyRow:
    row: int
    tokens_a: list[int]
    tokens_b: list[int]
    first_difference: int | None  # 1-based generated token, None: identical
    margin: float = 0.0  # the reference's preference for its token over model_a's there
    bound: float = 0.0
    excused: bool = True

    @property
    def passed(self) -> bool:
        return self.first_difference is None or self.excused


@dataclass
class DecodingResult:
    prompt_len: int
    steps: int
    rows: int
    consistency: dict[str, list[StepResult]] = field(default_factory=dict)
    greedy: list[GreedyRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        out = []
        for side, steps in self.consistency.items():
            bad = next((s for s in steps if not s.passed), None)
            if bad is not None:
                what = "prefill" if bad.step == 0 else f"step {bad.step}"
                out.append(f"decoding: {what} (position {bad.position}): {side}'s logits with the KV cache differ "
                           f"from its full forward there (rel err {bad.rel:.3g}, bound {bad.bound:.3g}"
                           f"{'' if bad.top1_agree else ', another top-1 token'})")
        for g in self.greedy:
            if not g.passed:
                pos = self.prompt_len + g.first_difference - 1
                out.append(f"decoding: greedy generation, row {g.row}, token {g.first_difference} (position {pos}): "
                           f"model_a chose {g.tokens_a[g.first_difference - 1]}, model_b "
                           f"{g.tokens_b[g.first_difference - 1]}; the reference prefers its token by {g.margin:.3g} "
                           f"> twice the per-logit bound {g.bound:.3g}")
        return out


def check_consistency(side: Side, ids: torch.Tensor, prompt_len: int,
                      bound: Callable[[int], float]) -> list[StepResult]:
    """Prefill ids[:, :prompt_len], then one call per remaining token; each against the full forward,
    within bound(position)."""
    _, full = side.run(ids, None, [])
    full = full.double()
    logits, past = side.step(ids[:, :prompt_len], None, None)
    last = prompt_len - 1
    results = [_step(side.label, 0, last, logits[:, -1], full[:, last], bound(last))]
    for s in range(1, ids.shape[1] - prompt_len + 1):
        pos = prompt_len + s - 1
        logits, past = side.step(ids[:, pos:pos + 1], None, past)
        results.append(_step(side.label, s, pos, logits[:, -1], full[:, pos], bound(pos)))
    return results


def _step(label, step, position, got, want, bound) -> StepResult:
    got = got.double().to(want.device)
    err, ref = float((got - want).norm()), float(want.norm())
    rel = ratio(err, ref) if math.isfinite(err) else math.inf
    return StepResult(label, step, position, rel, bound, bool((got.argmax(-1) == want.argmax(-1)).all()))


def compare_greedy(a: Side, b: Side, prompt: torch.Tensor, n: int, rel_bound: float,
                   abs_bound: float) -> list[GreedyRow]:
    """Greedy tokens of both sides from `prompt`; a first difference is excused at a near tie of the reference."""
    ga = a.generate(prompt, None, n)[:, prompt.shape[1]:].cpu()
    gb = b.generate(prompt, None, n)[:, prompt.shape[1]:].cpu()
    rows = []
    for r in range(prompt.shape[0]):
        ta, tb = ga[r].tolist(), gb[r].tolist()
        diff = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        if diff is None:
            rows.append(GreedyRow(r, ta, tb, None))
            continue
        prefix = torch.cat((prompt[r:r + 1].cpu(), gb[r:r + 1, :diff]), dim=1)
        _, logits = b.run(prefix, None, [])
        last = logits[0, -1].double().cpu()
        margin = float(last[tb[diff]] - last[ta[diff]])
        bound = rel_bound * float(last.pow(2).mean().sqrt()) + abs_bound
        rows.append(GreedyRow(r, ta, tb, diff + 1, margin, bound, margin <= 2 * bound))
    return rows
