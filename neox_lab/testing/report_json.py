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
    logits = None
    if report.logits is not None:
        logits = {**dataclasses.asdict(report.logits), "passed": report.logits.passed}
    w = report.weights
    weights = None
    if w is not None:
        weights = {"passed": w.passed, "rounding": w.rounding, "lossy_floor": w.lossy_floor,
                   "only_a": w.only_a, "only_b": w.only_b, "swapped_layers": [list(p) for p in w.swapped_layers],
                   "tensors": [dataclasses.asdict(t) for t in w.tensors]}
    return clean({
        "equivalent": report.equivalent,
        "summary": report.summary(),
        "reasons": report.reasons(),
        "mode": report.mode,
        "first_divergence": None if first is None else {"name": first.name, "layer": first.layer,
                                                        "heads": first.heads},
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
        "logits": logits,
        "probe": {"shape": report.probe_shape, "hooks": [dataclasses.asdict(h) for h in report.probe]}
        if report.probe else None,
        "skipped": dict(report.skipped),
    })


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
