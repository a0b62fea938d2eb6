"""`EquivalenceReport`: what `compare` found, hook by hook, and `assert_equivalent` for tests and CI."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from .tolerance import Tolerance


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
    """

    name: str
    layer: int | None
    shape: list[int]
    n: int
    max_abs: float
    rel: float
    bound: float
    passed: bool


@dataclass
class LogitsResult:
    """The model outputs: normwise error plus next-token distribution checks (over real positions).

    top1_agreement counts positions whose argmax agrees; top1_within_noise also excuses near ties
    (the reference's margin between the two tokens within twice the per-logit bound), and is what
    the tolerance's `top1_agreement` is held against. kl_* are KL(p_b || p_a) in nats.
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

    @property
    def passed(self) -> bool:
        return (self.passed_error and self.top1_within_noise >= self.top1_required
                and self.kl_mean <= self.kl_bound)


@dataclass
class EquivalenceReport:
    """Per-hook errors (forward order), the logits comparison and the tolerance they were held to."""

    model_a: str
    model_b: str
    tolerance: Tolerance
    n_positions: int
    hooks: list[HookResult] = field(default_factory=list)
    logits: LogitsResult | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def equivalent(self) -> bool:
        """Every compared hook and the logits within the noise floor."""
        return all(h.passed for h in self.hooks) and (self.logits is None or self.logits.passed)

    passed = equivalent

    @property
    def failures(self) -> list[HookResult]:
        return [h for h in self.hooks if not h.passed]

    @property
    def first_divergence(self) -> HookResult | None:
        """The earliest hook (forward order) whose error leaves the noise floor, or None."""
        return next((h for h in self.hooks if not h.passed), None)

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

    # ------------------------------------------------------------------ rendering
    def summary(self) -> str:
        """One line: the verdict and, when it fails, where and by how much."""
        if self.equivalent:
            what = f"{len(self.hooks)} hooks" + (" and logits" if self.logits is not None else "")
            return f"EQUIVALENT ({what} within {self.tolerance.label})"
        first = self.first_divergence
        if first is not None:
            where = f"layer {first.layer}" if first.layer is not None else "outside the blocks"
            if math.isinf(first.rel):
                where += "; a non-finite value on one side only"
            return (f"NOT EQUIVALENT: first divergence at {first.name} ({where}): rel error {first.rel:.3g} > "
                    f"bound {first.bound:.3g}, max abs error {first.max_abs:.3g}; "
                    f"{len(self.failures)} of {len(self.hooks)} hooks fail")
        lg = self.logits
        return (f"NOT EQUIVALENT at the logits (every hook passes): rel error {lg.rel:.3g} (bound {lg.bound:.3g}), "
                f"top-1 within noise {lg.top1_within_noise:.4f} (required {lg.top1_required}), "
                f"KL mean {lg.kl_mean:.3g} (bound {lg.kl_bound:.3g})")

    def table(self, only_failures: bool = False) -> str:
        """The report as a fixed-width text table (the `neox-lab compare` output)."""
        tol = self.tolerance
        growth = " x sqrt(depth)" if tol.depth_growth else ""
        lines = [f"A: {self.model_a}", f"B: {self.model_b} (reference)",
                 f"tolerance: {tol.label}: rel {tol.rel:.2e}{growth}, abs {tol.abs:.2e}; "
                 f"{self.n_positions} real positions",
                 f"{'hook':<34} {'layer':>5} {'max abs':>10} {'rel err':>10} {'bound':>10}  ok"]
        first = self.first_divergence
        for h in self.hooks:
            if only_failures and h.passed:
                continue
            layer = "-" if h.layer is None else str(h.layer)
            mark = "ok" if h.passed else "FAIL" + ("  <- first divergence" if h is first else "")
            lines.append(f"{h.name:<34} {layer:>5} {h.max_abs:>10.2e} {h.rel:>10.2e} {h.bound:>10.2e}  {mark}")
        lg = self.logits
        if lg is not None:
            lines.append(f"{'logits':<34} {'':>5} {lg.max_abs:>10.2e} {lg.rel:>10.2e} {lg.bound:>10.2e}  "
                         f"{'ok' if lg.passed_error else 'FAIL'}")
            lines.append(f"top-1 agreement {lg.top1_agreement:.4f} (near ties excused: {lg.top1_within_noise:.4f}, "
                         f"required {lg.top1_required}); KL(b||a) mean {lg.kl_mean:.2e} max {lg.kl_max:.2e} "
                         f"(bound {lg.kl_bound:.2e})")
        if self.skipped:
            reasons: dict[str, int] = {}
            for reason in self.skipped.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            lines.extend(f"skipped {n} hook(s): {reason}" for reason, n in reasons.items())
        lines.append(self.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        """Plain data (JSON-ready: non-finite numbers become the strings "inf", "nan")."""
        first = self.first_divergence
        logits = None
        if self.logits is not None:
            logits = {**asdict(self.logits), "passed": self.logits.passed}
        return _clean({
            "equivalent": self.equivalent,
            "summary": self.summary(),
            "first_divergence": None if first is None else {"name": first.name, "layer": first.layer},
            "model_a": self.model_a,
            "model_b": self.model_b,
            "tolerance": self.tolerance.to_dict(),
            "n_positions": self.n_positions,
            "hooks": [asdict(h) for h in self.hooks],
            "logits": logits,
            "skipped": dict(self.skipped),
        })

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def assert_equivalent(report: EquivalenceReport, msg: str | None = None) -> None:
    """Raise `NotEquivalentError` (an AssertionError) naming the first diverging hook, with the numbers."""
    if report.equivalent:
        return
    lines = [msg] if msg else []
    lines.append(report.summary())
    lines.append(report.table(only_failures=True))
    raise NotEquivalentError("\n".join(lines), report)


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
