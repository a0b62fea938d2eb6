"""`EquivalenceReport`: what `compare` found (config, weights, activations, logits, decoding), the
verdict, the first divergence in words, and `assert_equivalent` for tests and CI. Text rendering is
in `report_text`, JSON in `report_json`.

Verdicts (and `neox-lab compare`'s exit status): "equivalent" (0), "not equivalent" (1),
"same function, different parametrisation" (3: the outputs agree within rounding while weights or
streams differ far beyond it, e.g. a side after fold_ln) and "reference unusable" (4: model_b gave
NaN/inf where model_a did not, and nothing else failed). 2 is the CLI's usage or loading error."""

from __future__ import annotations

from dataclasses import dataclass, field

from .activation_check import ActivationResult
from .config_diff import ConfigDifference
from .decoding import DecodingResult
from .report_json import report_dict, report_json
from .report_text import render_table
from .results import HookResult, LogitsResult
from .tolerance import Tolerance
from .weight_diff import WeightDiff

EQUIVALENT = "equivalent"
NOT_EQUIVALENT = "not equivalent"
REPARAMETRISED = "same function, different parametrisation"
REFERENCE_UNUSABLE = "reference unusable"
#: The verdicts and the exit status `neox-lab compare` gives each (2 is a usage or loading error).
EXIT_STATUS = {EQUIVALENT: 0, NOT_EQUIVALENT: 1, REPARAMETRISED: 3, REFERENCE_UNUSABLE: 4}
#: A hook "differs for real" when its error is this many times its bound: with the logits within
#: rounding, such differences are a reparametrisation, not a bug hidden by rounding.
REPARAM_MARGIN = 10.0


class NotEquivalentError(AssertionError):
    """Two models differ by more than the noise floor; the message names the first diverging hook."""

    def __init__(self, message: str, report: EquivalenceReport):
        super().__init__(message)
        self.report = report


@dataclass
class EquivalenceReport:
    """Config differences, the weight diff, per-hook errors (forward order) on the main batch, the
    left-padded batch and the long probe, the logits, the activation check, the decoding check, the
    tolerance they were held to, and the verdict (`verdict`, `exit_status`)."""

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
    padded: list[HookResult] = field(default_factory=list)
    padded_logits: LogitsResult | None = None
    padded_shape: list[int] | None = None
    probe_logits: LogitsResult | None = None
    activation: list[ActivationResult] = field(default_factory=list)
    decoding: DecodingResult | None = None
    floors: str = ""  # how the bounds were obtained (measured / analytic / custom)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    reference_unusable: list[str] = field(default_factory=list)  # where model_b gave NaN/inf, in words
    unusable_batches: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)  # settings of model_b found to give finite values
    processed: dict[str, list[str]] = field(default_factory=dict)  # side -> weight processing applied

    # -- evidence --------------------------------------------------------------------------------
    @property
    def config_failures(self) -> list[ConfigDifference]:
        return [d for d in self.config if d.changes_function]

    @property
    def structural(self) -> bool:
        return any(d.structural for d in self.config)

    @property
    def all_hooks(self) -> list[HookResult]:
        """Every hook result: main batch, left-padded batch, long probe."""
        return self.hooks + self.padded + self.probe

    @property
    def all_logits(self) -> list[LogitsResult]:
        return [lg for lg in (self.logits, self.padded_logits, self.probe_logits) if lg is not None]

    def _judged(self, items):
        return [x for x in items if x.batch not in self.unusable_batches]

    @property
    def failures(self) -> list[HookResult]:
        """Failing hooks of the batches the reference could be run on (main batch first)."""
        return [h for h in self._judged(self.all_hooks) if not h.passed]

    @property
    def first_divergence(self) -> HookResult | None:
        """The earliest hook (forward order; main batch, then the left-padded batch, then the probe)
        whose error leaves the noise floor, or None."""
        return next(iter(self.failures), None)

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

    # -- verdict ---------------------------------------------------------------------------------
    @property
    def verdict(self) -> str:
        """"equivalent", "not equivalent", "same function, different parametrisation" (the output agrees
        within rounding while weights or streams differ far beyond it, e.g. after fold_ln) or "reference
        unusable" (model_b gave NaN/inf where model_a did not, and nothing else failed)."""
        if self.config_failures:
            return NOT_EQUIVALENT
        logits = self._judged(self.all_logits)
        activation_ok = all(a.passed for a in self.activation)
        decoding_ok = self.decoding is None or self.decoding.passed
        weights_ok = self.weights is None or self.weights.passed
        if weights_ok and not self.failures and activation_ok and decoding_ok and all(lg.passed for lg in logits):
            return REFERENCE_UNUSABLE if self.reference_unusable else EQUIVALENT
        same_output = logits and all(lg.passed_up_to_shift for lg in logits) and activation_ok and decoding_ok
        if same_output and self._reparametrised():
            return REPARAMETRISED
        return NOT_EQUIVALENT

    def _reparametrised(self) -> bool:
        failing = self.failures
        # The outputs must have been compared, and agreed, where the streams differ: on that batch, or on
        # one where the same streams differ too (the probe compares no outputs; a reparametrisation
        # changes its streams as it changes the main batch's, a bug beyond 256 positions does not).
        outputs = {lg.batch for lg in self.all_logits}
        seen = {h.name for h in failing if h.batch in outputs}
        if any(h.batch not in outputs and h.name not in seen for h in failing):
            return False
        if any(self.processed.values()):
            return True  # a side says it was processed, and its outputs agree
        return bool(failing) and all(h.nonfinite is None and h.rel >= REPARAM_MARGIN * h.bound for h in failing)

    @property
    def equivalent(self) -> bool:
        """Only the verdict "equivalent": no function-changing config difference, no changed weight
        (beyond what the mode allows), every compared stream, the logits, the activation check and the
        decoding check within their floors, and the reference usable."""
        return self.verdict == EQUIVALENT

    passed = equivalent

    @property
    def exit_status(self) -> int:
        """`neox-lab compare`'s exit status for this verdict (EXIT_STATUS)."""
        return EXIT_STATUS[self.verdict]

    def reasons(self) -> list[str]:
        """Why the models are not equivalent, in words, most basic evidence first (config, weights,
        activations, logits, decoding); empty when they are equivalent."""
        out = list(self.reference_unusable)
        out += [d.describe() for d in self.config_failures]
        if self.weights is not None:
            out.extend(f"blocks {i} and {j} are exchanged: every weight of block {i} in model_a is block {j}'s of "
                       "model_b and vice versa" for i, j in self.weights.swapped_layers)
            for t in self.weights.failures:
                out.append(f"{t.where()} differ: {t.n_changed} element(s) past rounding, max abs "
                           f"{t.max_abs:.3g}, rel {t.rel:.3g}")
            out.extend(f"parameter {n} exists only in model_a" for n in self.weights.only_a)
            out.extend(f"parameter {n} exists only in model_b" for n in self.weights.only_b)
            out.extend(f"weight map: {p}" for p in self.weights.problems)
        first = self.first_divergence
        if first is not None:
            where = {"main": "", "left-padded": f" (left-padded batch, {_shape(self.padded_shape)})",
                     "probe": f" (long probe, {_shape(self.probe_shape)} random ids)"}[first.batch]
            what = f"; {first.nonfinite}" if first.nonfinite else ""
            if first.rel <= first.bound and not first.mean_passed:
                error = (f"its average over the real positions is off by rel {first.mean_rel:.3g} > bound "
                         f"{first.mean_bound:.3g}, while each position is within rounding (a systematic shift: "
                         "a dropped bias?)")
            else:
                error = f"rel error {first.rel:.3g} > bound {first.bound:.3g}"
            out.append(f"activations: first divergence at {first.where()}{where}: {error}{what}; "
                       f"{len(self.failures)} of {len(self._judged(self.all_hooks))} hooks fail")
        out.extend(a.describe() for a in self.activation if not a.passed and a.layer is not None)
        if not any(not a.passed and a.layer is not None for a in self.activation):
            out.extend(a.describe() for a in self.activation if not a.passed)
        for lg in self._judged(self.all_logits):
            if not lg.passed:
                label = "logits" if lg.batch == "main" else f"logits ({lg.batch})"
                extra = f"; {lg.nonfinite}" if lg.nonfinite else ""
                shift = ("; equal up to a constant per position (softmax-invariant)"
                         if lg.passed_up_to_shift else "")
                out.append(f"{label}: rel error {lg.rel:.3g} (bound {lg.bound:.3g}), top-1 within noise "
                           f"{lg.top1_within_noise:.4f} (required {lg.top1_required}), KL mean {lg.kl_mean:.3g} "
                           f"(bound {lg.kl_bound:.3g}){shift}{extra}")
        if self.decoding is not None:
            out.extend(self.decoding.failures())
        return out

    def summary(self) -> str:
        """One line: the verdict and, when it is not "equivalent", the first (most basic) reason."""
        verdict = self.verdict
        if verdict == EQUIVALENT:
            what = f"{len(self.all_hooks)} hook results" + (" and logits" if self.logits is not None else "")
            if self.decoding is not None and (self.decoding.consistency or self.decoding.greedy):
                what += " and decoding"
            return f"EQUIVALENT ({what} within {self.floors or 'the floor'})"
        reasons = self.reasons()
        more = f" (+{len(reasons) - 1} more finding(s))" if len(reasons) > 1 else ""
        if verdict == REPARAMETRISED:
            steps = sorted({s for v in self.processed.values() for s in v})
            named = f" ({', '.join(steps)})" if steps else ""
            return (f"SAME FUNCTION, DIFFERENT PARAMETRISATION{named}: the outputs agree within rounding while "
                    f"{len(self.failures)} stream(s) and {len(self.weights.failures) if self.weights else 0} "
                    f"weight(s) differ beyond it; first: {reasons[0]}")
        if verdict == REFERENCE_UNUSABLE:
            fix = f"; finite: {'; '.join(self.suggestions)}" if self.suggestions else ""
            return f"REFERENCE UNUSABLE: {reasons[0]}{fix}"
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


def _shape(shape) -> str:
    return "x".join(map(str, shape or []))


def assert_equivalent(report: EquivalenceReport, msg: str | None = None, *,
                      allow_reparametrisation: bool = False) -> None:
    """Raise `NotEquivalentError` (an AssertionError) naming where the models first differ, with the numbers.
    `allow_reparametrisation=True` also accepts "same function, different parametrisation" (e.g. a
    model after `process_weights_()` against the unprocessed one)."""
    if report.equivalent or (allow_reparametrisation and report.verdict == REPARAMETRISED):
        return
    lines = [msg] if msg else []
    lines.append(report.summary())
    lines.append(report.table(only_failures=True))
    raise NotEquivalentError("\n".join(lines), report)
