"""`EquivalenceReport`: what `compare` found (config, weights, activations), the verdict, the first
divergence in words, and `assert_equivalent` for tests and CI. Text rendering is in `report_text`,
JSON in `report_json`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config_diff import ConfigDifference
from .report_json import report_dict, report_json
from .report_text import render_table
from .tolerance import Tolerance
from .weight_diff import WeightDiff


class NotEquivalentError(AssertionError):
    """Two models differ by more than the noise floor; the message names the first diverging hook."""

    def __init__(self, message: str, report: EquivalenceReport):
        super().__init__(message)
        self.report = report


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

    def where(self) -> str:
        """In words: "blocks.3.attn.hook_q (layer 3, heads 1, 2)"."""
        bits = ["outside the blocks" if self.layer is None else f"layer {self.layer}"]
        if self.heads:
            bits.append(("head " if len(self.heads) == 1 else "heads ") + ", ".join(map(str, self.heads)))
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

    @property
    def passed(self) -> bool:
        return (self.passed_error and self.top1_within_noise >= self.top1_required
                and self.kl_mean <= self.kl_bound)


@dataclass
class EquivalenceReport:
    """Config differences, the weight diff, per-hook errors (forward order), the logits comparison,
    the long rotary probe, and the tolerance they were held to."""

    model_a: str
    model_b: str
    tolerance: Tolerance | None
    n_positions: int
    hooks: list[HookResult] = field(default_factory=list)
    logits: LogitsResult | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    config: list[ConfigDifference] = field(default_factory=list)
    weights: WeightDiff | None = None
    probe: list[HookResult] = field(default_factory=list)
    probe_shape: list[int] | None = None
    mode: str = "exact"
    sides: dict = field(default_factory=dict)
    skipped_all: str | None = None  # why no activation was compared at all
    provenance: dict = field(default_factory=dict)  # filled by the CLI: paths, arguments, versions ...

    @property
    def config_failures(self) -> list[ConfigDifference]:
        return [d for d in self.config if d.changes_function]

    @property
    def structural(self) -> bool:
        return any(d.structural for d in self.config)

    @property
    def equivalent(self) -> bool:
        """No function-changing config difference, no changed weight (beyond what the mode allows),
        and every compared hook, the probe and the logits within the floor."""
        return (not self.config_failures and (self.weights is None or self.weights.passed)
                and all(h.passed for h in self.hooks) and all(h.passed for h in self.probe)
                and (self.logits is None or self.logits.passed))

    passed = equivalent

    @property
    def failures(self) -> list[HookResult]:
        return [h for h in self.hooks if not h.passed]

    @property
    def first_divergence(self) -> HookResult | None:
        """The earliest hook (forward order) whose error leaves the noise floor, or None (the long
        probe's hooks count after the main run's)."""
        return next((h for h in self.hooks + self.probe if not h.passed), None)

    @property
    def first_diverging_layer(self) -> int | None:
        """The block of the first divergence (None: none, or it is outside the blocks)."""
        first = self.first_divergence
        return None if first is None else first.layer

    def __getitem__(self, name: str) -> HookResult:
        for h in self.hooks:
            if h.name == name:
                return h
        reason = self.skipped.get(name)
        raise KeyError(f"hook {name!r} was not compared" + (f": {reason}" if reason else ""))

    def reasons(self) -> list[str]:
        """Why the models are not equivalent, in words, most basic evidence first (config, weights,
        activations); empty when they are equivalent."""
        out = [d.describe() for d in self.config_failures]
        if self.weights is not None:
            out.extend(f"blocks {i} and {j} are exchanged: every weight of block {i} in model_a is block {j}'s of "
                       "model_b and vice versa" for i, j in self.weights.swapped_layers)
            for t in self.weights.failures:
                out.append(f"{t.where()} differ: {t.n_changed} element(s) past rounding, max abs "
                           f"{t.max_abs:.3g}, rel {t.rel:.3g}")
            out.extend(f"parameter {n} exists only in model_a" for n in self.weights.only_a)
            out.extend(f"parameter {n} exists only in model_b" for n in self.weights.only_b)
        first = self.first_divergence
        if first is not None:
            probe = " (long probe, " + "x".join(map(str, self.probe_shape or [])) + " random ids)" \
                if first in self.probe else ""
            nonfinite = "; a non-finite value on one side only" if first.rel == float("inf") else ""
            out.append(f"activations: first divergence at {first.where()}{probe}: rel error {first.rel:.3g} > bound "
                       f"{first.bound:.3g}{nonfinite}; {len(self.failures)} of {len(self.hooks)} hooks fail")
        lg = self.logits
        if lg is not None and not lg.passed:
            out.append(f"logits: rel error {lg.rel:.3g} (bound {lg.bound:.3g}), top-1 within noise "
                       f"{lg.top1_within_noise:.4f} (required {lg.top1_required}), KL mean {lg.kl_mean:.3g} "
                       f"(bound {lg.kl_bound:.3g})")
        return out

    def summary(self) -> str:
        """One line: the verdict and, when it fails, the first (most basic) reason."""
        if self.equivalent:
            what = f"{len(self.hooks)} hooks" + (" and logits" if self.logits is not None else "")
            label = self.tolerance.label if self.tolerance is not None else "the floor"
            return f"EQUIVALENT ({what} within {label})"
        reasons = self.reasons()
        more = f" (+{len(reasons) - 1} more finding(s))" if len(reasons) > 1 else ""
        return f"NOT EQUIVALENT: {reasons[0]}{more}"

    def table(self, only_failures: bool = False) -> str:
        """The report as fixed-width text (the `neox-lab compare` output)."""
        return render_table(self, only_failures)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        """Plain, JSON-ready data: numbers stay numbers; a non-finite one becomes null with a
        `<key>_nonfinite` flag ("inf", "-inf" or "nan") next to it."""
        return report_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return report_json(self, indent)


def assert_equivalent(report: EquivalenceReport, msg: str | None = None) -> None:
    """Raise `NotEquivalentError` (an AssertionError) naming where the models first differ, with the numbers."""
    if report.equivalent:
        return
    lines = [msg] if msg else []
    lines.append(report.summary())
    lines.append(report.table(only_failures=True))
    raise NotEquivalentError("\n".join(lines), report)
