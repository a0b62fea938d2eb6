"""The JSON form of an `EquivalenceReport` (the CI artifact).

Numbers stay JSON numbers. JSON has no infinity or NaN, so a non-finite number becomes null and a
sibling key `<key>_nonfinite` says which ("inf", "-inf", "nan"): a reader never finds a string in a
numeric field, and `json.dumps(..., allow_nan=False)` guarantees strict JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math


def report_dict(report) -> dict:
    first = report.first_divergence
    w = report.weights
    weights = None
    if w is not None:
        weights = {"passed": w.passed, "rounding": w.rounding, "lossy_floor": w.lossy_floor,
                   "only_a": w.only_a, "only_b": w.only_b, "swapped_layers": [list(p) for p in w.swapped_layers],
                   "unmatched": w.unmatched, "problems": w.problems,
                   "tensors": [dataclasses.asdict(t) for t in w.tensors]}
    dec = report.decoding
    decoding = None
    if dec is not None:
        decoding = {**dataclasses.asdict(dec), "passed": dec.passed, "failures": dec.failures()}
    return clean({
        "equivalent": report.equivalent,
        "verdict": report.verdict,
        "exit_status": report.exit_status,
        "summary": report.summary(),
        "reasons": report.reasons(),
        "mode": report.mode,
        "floors": report.floors,
        "first_divergence": None if first is None else {"name": first.name, "layer": first.layer,
                                                        "heads": first.heads, "batch": first.batch,
                                                        "positions": first.positions},
        "model_a": report.model_a,
        "model_b": report.model_b,
        "sides": report.sides,
        "provenance": report.provenance,
        "tolerance": None if report.tolerance is None else report.tolerance.to_dict(),
        "n_positions": report.n_positions,
        "config": [d.to_dict() for d in report.config],
        "weights": weights,
        "activations_skipped": report.skipped_all,
        "hooks": [dataclasses.asdict(h) for h in report.hooks],
        "logits": _logits(report.logits),
        "padded": {"shape": report.padded_shape, "hooks": [dataclasses.asdict(h) for h in report.padded],
                   "logits": _logits(report.padded_logits)} if report.padded_shape else None,
        "probe": {"shape": report.probe_shape, "hooks": [dataclasses.asdict(h) for h in report.probe],
                  "logits": _logits(report.probe_logits)} if report.probe_shape else None,
        "activation": [dataclasses.asdict(a) for a in report.activation],
        "decoding": decoding,
        "reference_unusable": report.reference_unusable,
        "unusable_batches": report.unusable_batches,
        "suggestions": report.suggestions,
        "processed": report.processed,
        "notes": report.notes,
        "skipped": dict(report.skipped),
    })


def _logits(lg) -> dict | None:
    return None if lg is None else {**dataclasses.asdict(lg), "passed": lg.passed,
                                     "passed_up_to_shift": lg.passed_up_to_shift}


def report_json(report, indent: int | None = 2) -> str:
    return json.dumps(report_dict(report), indent=indent, allow_nan=False)


def clean(obj):
    """Replace non-finite floats by None plus a `<key>_nonfinite` flag (in lists: None only)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None
                out[f"{k}_nonfinite"] = str(v)
            else:
                out[k] = clean(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [None if isinstance(v, float) and not math.isfinite(v) else clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
