"""The lossy mode: floors derived from the measured weight error of a deliberate conversion
(quantisation, pruning by rounding), so that the conversion passes and a structural bug on top of it
does not.

Weights. A uniform conversion changes every quantised tensor by a similar relative amount delta
(int8 per-channel: ~1e-3 to 1e-2). The typical change is the median over the changed tensors; a tensor
may differ by up to WEIGHT_SPREAD times that (tensors' distributions differ), never beyond
MAX_WEIGHT_REL. A tensor changed far more than the rest (a zeroed bias: rel 1) still fails.

Activations. A relative weight error delta perturbs each block's output by about delta, and those
perturbations add along the forward pass like the rounding of `tolerance`: the floor becomes
max(rounding floor, ACTIVATION_GAIN * delta_max * sqrt(depth)), delta_max the largest accepted
tensor's rel. ACTIVATION_GAIN was measured (experiments/lossy_gain.py) as the largest ratio of a
hook's relative error to delta_max sqrt(depth) for int8 per-channel and fp16/bf16 round-trips of
6-layer trained-like models, times a headroom factor (see that script's output in its docstring).
"""

from __future__ import annotations

import dataclasses
import statistics

from .tolerance import Tolerance
from .weight_diff import WeightDiff

WEIGHT_SPREAD = 8.0
MAX_WEIGHT_REL = 0.25
ACTIVATION_GAIN = 8.0


def accept_lossy_weights(diff: WeightDiff) -> float:
    """Mark changed tensors within the lossy weight floor as passed; returns delta_max, the largest
    accepted tensor's relative error (0.0 when nothing changed)."""
    changed = [t for t in diff.changed]
    if not changed:
        return 0.0
    typical = statistics.median(t.rel for t in changed)
    floor = min(WEIGHT_SPREAD * typical, MAX_WEIGHT_REL)
    delta = 0.0
    for t in changed:
        if t.rel <= floor:
            t.passed, t.accepted_as = True, f"lossy (rel {t.rel:.2e} <= floor {floor:.2e})"
            delta = max(delta, t.rel)
    diff.lossy_floor = floor
    return delta


def lossy_tolerance(base: Tolerance, delta: float) -> Tolerance:
    """The activation floor for weights changed by up to `delta` (relative), never below `base`."""
    rel = max(base.rel, ACTIVATION_GAIN * delta)
    return dataclasses.replace(base, rel=rel, depth_growth=True, top1_agreement=min(base.top1_agreement, 0.99),
                               label=f"lossy: weights rel <= {delta:.2e} x gain {ACTIVATION_GAIN:g}, "
                                     f"over {base.label}")
