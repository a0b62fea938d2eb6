"""The decoding check, run wherever a side can decode (neox_lab and transformers causal LMs, a port with
`step` or `generate`), on DECODE_ROWS rows of a 16-token random prompt:

1. KV-cache consistency, per side: the prompt as one call (prefill), then the side's own greedy tokens
   fed back one call each with the cache; each call's logits must equal the side's own full forward
   over what it decoded, at that position, within twice its rounding there (`Floors.self_rel`: its
   measured rounding at that position or on average, whichever is larger), and pick the same top-1
   token unless the full forward's top two are within twice the per-logit bound (bound x rms of the
   row: a near tie rounding may flip, as in the logits check). Step s feeds position P+s-1; a failure
   is named "decoding: step s (position P+s-1)".
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


@dataclass
class Decoded:
    """What one side decoded greedily: the ids (prompt + new tokens) and, when it decodes with a cache,
    each call's last-position logits (the prompt's, then one per fed token)."""

    ids: torch.Tensor
    step_logits: list[torch.Tensor] | None


def decode(side: Side, prompt: torch.Tensor, n: int) -> Decoded:
    """`n` greedy tokens after `prompt`: with the side's KV-cache `step` when it has one (prefill, then each
    new token fed back, the last one too, so n cached calls are there to check), else its `generate`."""
    if not side.can_step:
        return Decoded(side.generate(prompt, None, n).cpu(), None)
    logits, past = side.step(prompt, None, None)
    steps, ids = [logits[:, -1].double().cpu()], prompt.cpu()
    for _ in range(n):
        token = steps[-1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, token), dim=1)
        logits, past = side.step(token, None, past)
        steps.append(logits[:, -1].double().cpu())
    return Decoded(ids, steps)


def check_consistency(side: Side, decoded: Decoded, prompt_len: int,
                      bound: Callable[[int], float]) -> list[StepResult]:
    """Each cached call's logits against the side's own full forward over what it decoded, within
    bound(position): the prompt's last position (step 0), then step s at position prompt_len + s - 1."""
    _, full = side.run(decoded.ids, None, [])
    full = full.double().cpu()
    results = []
    for s, logits in enumerate(decoded.step_logits[:decoded.ids.shape[1] - prompt_len + 1]):
        pos = prompt_len - 1 + s
        results.append(_step(side.label, s, pos, logits, full[:, pos], bound(pos)))
    return results


def _step(label, step, position, got, want, bound) -> StepResult:
    err, ref = float((got - want).norm()), float(want.norm())
    rel = ratio(err, ref) if math.isfinite(err) else math.inf
    return StepResult(label, step, position, rel, bound, top1_agrees(got, want, bound))


def top1_agrees(got: torch.Tensor, want: torch.Tensor, bound: float) -> bool:
    """Whether each row [..., vocab] of `got` picks `want`'s top-1 token, or one `want` ranks within twice
    the per-logit bound (`bound` x the row's rms) of it: a near tie that rounding may flip."""
    mine, theirs = got.argmax(-1, keepdim=True), want.argmax(-1, keepdim=True)
    margin = want.gather(-1, theirs) - want.gather(-1, mine)
    per_logit = bound * want.pow(2).mean(-1, keepdim=True).sqrt()
    return bool(((mine == theirs) | (margin <= 2 * per_logit)).all())


def compare_greedy(a: Decoded, b: Decoded, reference: Side, prompt_len: int, rel_bound: float,
                   abs_bound: float) -> list[GreedyRow]:
    """Greedy tokens of both sides; a first difference is excused at a near tie of the reference (its
    logits where the rows part: from its own cached call, or a forward over the common prefix)."""
    ga, gb = a.ids[:, prompt_len:], b.ids[:, prompt_len:]
    rows = []
    for r in range(ga.shape[0]):
        ta, tb = ga[r].tolist(), gb[r].tolist()
        diff = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        if diff is None:
            rows.append(GreedyRow(r, ta, tb, None))
            continue
        if b.step_logits is not None:
            last = b.step_logits[diff][r]
        else:
            _, logits = reference.run(b.ids[r:r + 1, :prompt_len + diff], None, [])
            last = logits[0, -1].double().cpu()
        margin = float(last[tb[diff]] - last[ta[diff]])
        bound = rel_bound * float(last.pow(2).mean().sqrt()) + abs_bound
        rows.append(GreedyRow(r, ta, tb, diff + 1, margin, bound, margin <= 2 * bound))
    return rows
