"""The per-stream results of a comparison: one hook on one batch, and the logits checks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HookResult:
    """One hook point's comparison over the real (non-pad) positions, in fp64.

    rel = ||a - b|| / ||b||; bound is the relative floor at this depth; passed applies the tolerance
    (relative plus absolute term), so a stream that is (nearly) zero can pass with a large `rel`.
    heads: for a failing head-shaped stream, the heads whose own slice fails, worst first.
    """

    name: str
    layer: int | None
    shape: list[int]
    n: int
    max_abs: float
    rel: float
    bound: float
    passed: bool
    heads: list[int] = field(default_factory=list)
    batch: str = "main"  # "main", "left-padded" or "probe"
    positions: list[int] = field(default_factory=list)  # failing positions (columns), first few
    n_failing_positions: int = 0
    nonfinite: str | None = None  # which side has NaN/inf where, when one side only does
    mean_rel: float | None = None  # the same for the stream's average over real positions (per channel)
    mean_bound: float | None = None  # None: not tested (only where the rounding was measured)
    mean_passed: bool = True

    def where(self) -> str:
        """In words: "blocks.3.attn.hook_q (layer 3, heads 1, 2, from position 256)"."""
        bits = ["outside the blocks" if self.layer is None else f"layer {self.layer}"]
        if self.heads:
            bits.append(("head " if len(self.heads) == 1 else "heads ") + ", ".join(map(str, self.heads)))
        if self.positions:
            bits.append(f"from position {self.positions[0]}")
        return f"{self.name} ({', '.join(bits)})"


@dataclass
class LogitsResult:
    """The model outputs: normwise error plus next-token distribution checks (over real positions).

    top1_agreement counts positions whose argmax agrees; top1_within_noise also excuses near ties
    (the reference's margin between the two tokens within twice the per-logit bound), and is what
    the tolerance's `top1_agreement` is held against. kl_* are KL(p_b || p_a) in nats; kl_bound is
    never below kl_noise, the rounding noise of computing the KL itself.
    """

    shape: list[int]
    n_rows: int
    max_abs: float
    rel: float
    bound: float
    passed_error: bool
    top1_agreement: float
    top1_within_noise: float
    top1_required: float
    kl_mean: float
    kl_max: float
    kl_bound: float
    kl_noise: float = 0.0
    batch: str = "main"
    rel_centered: float = 0.0  # the error after subtracting each position's mean logit from both sides
    nonfinite: str | None = None

    @property
    def passed(self) -> bool:
        return (self.passed_error and self.top1_within_noise >= self.top1_required
                and self.kl_mean <= self.kl_bound)

    @property
    def passed_up_to_shift(self) -> bool:
        """Equal next-token distributions: within bounds, or off by a constant per position only (what
        TransformerLens' center_unembed does; softmax cannot see it)."""
        return self.passed or (self.rel_centered <= self.bound and self.top1_within_noise >= self.top1_required
                               and self.kl_mean <= self.kl_bound)
