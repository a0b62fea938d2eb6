"""Floors from measured rounding: how far each stream of the candidate may be from the reference.

A correct side computing in fp32, fp16 or bf16 differs from the exact function by its rounding, and
how large that is depends on the model (how sharp its attention is, how its residual stream grows)
and on the inputs as much as on the format. So instead of bounding it by worst-case algebra
(`tolerance.policy_for`, which must cover every model and so is 10-100 times too loose for most),
`compare` measures it: it runs the reference (or, when the reference cannot be re-run in another
precision, the candidate) a second time in float64 and once in each side's dtype, on the same
inputs, and takes each stream's

    noise_d(hook) = ||ref_d - ref_fp64|| / ||ref_fp64||           (real positions, fp64 arithmetic)

as the rounding of dtype d on that stream. A side contributes

    c(hook) = max(K * noise_d(hook), ROUNDED_ONCE * u_d)

(K = 4: a different implementation in the same format rounds differently, not more than a few times
as much; the second term is a stream rounded once to the format, for streams the measurement finds
exact), a float64 side (or one that cannot be measured) the analytic term of `tolerance`
C * eps * sqrt(depth), and the bound is hypot(c_a, c_b): ||a - b|| <= bound ||b|| + abs sqrt(n).

Measured on a 6-layer trained-like model (experiments/compare_code_bugs.py), legitimate variants reach
at most 0.34 of this bound in fp32 (transformers against neox_lab) and 0.58 in fp16/bf16 (transformers'
half precision against neox_lab's fp32; fp16 against fp32 at 2048 positions of near-hard attention:
0.25), while GELU-tanh, an LN eps outside the sqrt and a one-layer dropped MLP bias exceed it in fp32 by
100, 220 and 3400 times.

A stream of n < MIN_SAMPLE values (a 1-token input's attention score) gets its bound times
sqrt(MIN_SAMPLE / n): a single value's relative rounding, where a dot product cancels, is no average. A
custom `Tolerance` (tolerance=...) replaces all of this by its own bound.
"""

from __future__ import annotations

import math

import torch

from ..hooks.registry import hook_names, layer_of
from .metrics import allows, errors, real_entries
from .side_base import Side
from .tolerance import UNIT_ROUNDOFF, C, Tolerance, precision_of, side_noise

K = 4.0
ROUNDED_ONCE = 4.0
LOGITS = "logits"
#: Suffix of a stream's average over real positions (per channel), measured and bounded like a stream.
MEAN = "#mean"
MEASURABLE = ("float32", "float16", "bfloat16", "tf32")
#: Below this many values a stream's bound grows by sqrt(MIN_SAMPLE / n): one value's rounding may be many
#: times the typical one (the thorough property run found a single attention score, a dot product that
#: cancelled 50-fold, whose fp16 rounding was 2.5x the bound another implementation's had been held to).
MIN_SAMPLE = 64


def depth_of(name: str, n_layers: int) -> int:
    """Rounding stages behind a stream: hook_embed 1, blocks.L.* L + 1, ln_final and logits n_layers + 1."""
    layer = layer_of(name) if name != LOGITS else None
    if layer is not None:
        return layer + 1
    return 1 if name == "hook_embed" else n_layers + 1


def precision(side: Side) -> str:
    return precision_of(side.dtype, side.backend if side.kind != "port" else "eager", side.device)


class Floors:
    """The relative bound of every compared stream, measured where it can be (see the module docstring)."""

    def __init__(self, a: Side, b: Side, base: Tolerance, *, custom: Tolerance | None = None,
                 lossy: Tolerance | None = None, scale: float = 1.0):
        self.a, self.b, self.base, self.custom, self.lossy, self.scale = a, b, base, custom, lossy, scale
        #: the absolute floor (per element, x sqrt(n)): the analytic policy's, or the custom tolerance's
        self.abs = (custom or base).abs * (scale if custom is None else 1.0)
        self.n_layers = b.cfg.num_hidden_layers
        self.width = max(b.cfg.hidden_size, b.cfg.intermediate_size)
        self.noise: dict[str, dict[str, dict[str, float]]] = {}  # batch -> side label -> stream -> noise
        self.measurer: Side | None = None
        self.copies: dict[str, Side] = {}
        self.own, self.wanted = "", []  # the measurer's own format, the formats measured
        self.note = "custom tolerance" if custom is not None else ""

    # -- measuring -------------------------------------------------------------------------------
    def plan(self) -> None:
        """Choose the side to measure with and make its copies (float64 and each side's dtype), once the
        sides' dtypes are known (a port's from its first logits)."""
        if self.custom is not None or self.copies or self.measurer is not None:
            return
        wanted = sorted({precision(s) for s in (self.a, self.b)} & set(MEASURABLE))
        if not wanted:
            self.note = "analytic (float64 sides: the measured floor needs a finer format)"
            return
        for side in (self.b, self.a):
            exact = side.exact_copy()
            if exact is None:
                continue
            own = "float64" if exact is side else precision(side)
            copies = {} if exact is side else {"float64": exact}
            for fmt in wanted:
                if fmt != own:
                    dtype = next(s.dtype for s in (self.a, self.b) if precision(s) == fmt)
                    copies[fmt] = side.recast(dtype)
            if any(c is None for c in copies.values()):
                continue  # (a port in fp64 is its own exact copy, but cannot be recast to the other dtype)
            self.measurer, self.own, self.copies, self.wanted = side, own, copies, wanted
            role = "the reference" if side is self.b else "the candidate (the reference cannot be re-run)"
            self.note = (f"measured: {K:g} x the rounding of {role} in {', '.join(wanted)} against float64, "
                         f"stream by stream")
            return
        self.note = "analytic (neither side can be re-run in float64 to measure its rounding)"

    def measure(self, batch, names: list[str], own: tuple[dict, torch.Tensor | None],
                stop_at_layer: int | None = None) -> None:
        """Noise of each stream (and the logits) on `batch`; `own` is the measurer's run in its own dtype;
        `stop_at_layer` as in `Side.run` (no logits then)."""
        self.plan()
        if self.measurer is None:
            return
        registry = hook_names(self.b.cfg)
        real = batch.real

        def run(fmt):
            return own if fmt == self.own else self.copies[fmt].run(batch.ids, batch.mask, names, stop_at_layer)
        s64, l64 = run("float64")
        out = self.noise.setdefault(batch.label, {})
        for fmt in self.wanted:
            store, logits = run(fmt)
            noise = out.setdefault(fmt, {})
            for name in names:
                if name in store and name in s64:
                    x, dims = real_entries(store[name], registry[name], real)
                    y, _ = real_entries(s64[name], registry[name], real)
                    noise[name] = _rel(x, y)
                    if dims[0] == "real":
                        noise[name + MEAN] = _rel(x.mean(0), y.mean(0))
            if logits is not None and l64 is not None:
                noise[LOGITS] = _rel(_real_rows(logits, real), _real_rows(l64, real))
                if batch.mask is None and logits.dim() == 3:
                    # per position too: a decoding step is one position, whose rounding can exceed the average
                    for p in range(logits.shape[1]):
                        noise[f"{LOGITS}@{p}"] = _rel(logits[:, p].double(), l64[:, p].double())

    # -- bounds ----------------------------------------------------------------------------------
    def contribution(self, side: Side, batch: str, name: str, seq_len: int) -> float | None:
        """What one side's rounding adds to the bound of `name` (see the module docstring); None for the
        average of a stream (name + MEAN) that was not measured."""
        fmt = precision(side)
        noise = self.noise.get(batch, {}).get(fmt, {}).get(name)
        depth = depth_of(name.removesuffix(MEAN).split("@")[0], self.n_layers)
        if noise is None or not math.isfinite(noise):
            if name.endswith(MEAN) and fmt in MEASURABLE:
                return None
            return C * side_noise(fmt, max(self.width, seq_len)) * math.sqrt(depth)
        return max(K * noise, ROUNDED_ONCE * UNIT_ROUNDOFF[fmt])

    def rel_mean(self, batch: str, name: str, seq_len: int, n: int | None = None) -> float | None:
        """The bound of a stream's average over real positions, where its rounding was measured (None:
        not tested). Averaging shrinks rounding noise by sqrt(positions) but not a systematic error (a
        dropped bias shifts every position alike), so this sees what the stream's bound cannot in bf16."""
        if self.custom is not None or self.lossy is not None:
            return None
        parts = [self.contribution(s, batch, name + MEAN, seq_len) for s in (self.a, self.b)]
        if any(p is None for p in parts) or all(precision(s) not in MEASURABLE for s in (self.a, self.b)):
            return None
        return math.hypot(*parts) * self.scale * _few(n)

    def rel(self, batch: str, name: str, seq_len: int, n: int | None = None) -> float:
        """The relative bound of stream `name` (or "logits") on `batch`, n values compared."""
        depth = depth_of(name, self.n_layers)
        if self.custom is not None:
            return self.custom.rel_at(depth)
        bound = math.hypot(self.contribution(self.a, batch, name, seq_len),
                           self.contribution(self.b, batch, name, seq_len))
        if self.lossy is not None:
            bound = max(bound, self.lossy.rel_at(depth))
        return bound * self.scale * _few(n)

    def allows(self, err: float, ref: float, n: int, rel: float) -> bool:
        """||a - b|| = err within rel ||b|| + abs sqrt(n)."""
        return allows(err, ref, n, rel, self.abs)

    def self_rel(self, side: Side, batch: str, seq_len: int, position: int | None = None,
                 n: int | None = None) -> float:
        """The bound of a side's logits against its own other path (decoding with a cache vs the full
        forward), at one position: its rounding twice, at that position or on average, whichever is larger."""
        if self.custom is not None:
            return self.custom.rel_at(self.n_layers + 1)
        own = self.contribution(side, batch, LOGITS, seq_len)
        if position is not None and f"{LOGITS}@{position}" in self.noise.get(batch, {}).get(precision(side), {}):
            own = max(own, self.contribution(side, batch, f"{LOGITS}@{position}", seq_len))
        return math.sqrt(2) * own * self.scale * _few(n)

    def release(self) -> None:
        """Drop the copies (each a whole model)."""
        self.copies.clear()


def _few(n: int | None) -> float:
    return 1.0 if n is None or n >= MIN_SAMPLE else math.sqrt(MIN_SAMPLE / max(n, 1))


def _real_rows(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per-position outputs at the real positions; a pooled one (sequence classification) as it is."""
    logits = logits.double()
    if logits.dim() >= 3 and tuple(logits.shape[:2]) == tuple(real.shape):
        return logits[real.to(logits.device)]
    return logits


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    _, err, ref, _ = errors(x, y)
    if err == 0.0:
        return 0.0
    return err / ref if ref > 0 else math.inf
