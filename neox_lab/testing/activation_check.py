"""The activation check: is the candidate's MLP activation the config's function, to the last bit a
format can hold?

A wrong GELU variant (the tanh approximation for exact GELU) moves `mlp.hook_post` by ~2e-4 of its
norm, below fp16's and far below bf16's rounding (2^-11, 2^-8): no normwise bound can see it there.
But rounding to nearest is deterministic and a wrong function is not the right one: given the
candidate's own input (hook_pre), the reference function in fp64, rounded to the stream's format,
says what its output should be, and the error

    e = hook_post - round_to_its_format(act_fp64(hook_pre))

of a correct side is zero but where its evaluation (in fp32) lands on the other side of a rounding
boundary: rare and without a direction. A different function has a systematic error (GELU-tanh: up
to 4.7e-4 near |x| = 2.7), so e leans one way wherever the two functions differ by a fraction of an
ulp, and its mean there is that difference. So the errors are grouped by hook_pre into BINS quantile
bins, and a bin fails when its mean error is both significant (|mean| > Z standard errors) and larger
than evaluating the activation in fp32 can leave behind: |mean| > FLOOR_U * u_eval * rms(max(|hook_pre|,
|hook_post|)) in the bin, u_eval fp32's roundoff (fp64's for an fp64 stream), taken against the input
too because erf-based GELU loses relative accuracy where its output is ~0. FLOOR_U = 32 (2e-6 of the
size) is 10x the largest bias torch's own fp32 GELU shows against fp64 (measured: 1.7e-7 in bf16, where
it decides the rounding), and 1/100 of GELU-tanh's (1.8e-4). Each layer is tested, and all layers pooled
(one activation function for all). Activations written as several ops (gelu_new, ...) are tested on
fp32/fp64 streams only (COMPOSITE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..hooks.registry import block_hook
from ..model.mlp import ACT_FNS
from .metrics import real_entries
from .tolerance import UNIT_ROUNDOFF

BINS = 32
Z = 6.0
FLOOR_U = 32.0
MIN_PER_BIN = 32
PRE, POST = "mlp.hook_pre", "mlp.hook_post"
#: Activations written as several torch ops: in fp16/bf16 each op rounds to the format, which leaves errors of
#: a few ulps with a direction of their own (measured: gelu_new in fp16, 6.5 standard errors off round-once),
#: so for them the check runs only on fp32/fp64 streams. F.gelu (exact or tanh), relu and silu are one kernel
#: each, evaluated in fp32 and rounded once in half precision.
COMPOSITE = ("gelu_new", "gelu_fast", "quick_gelu")
HALF = (torch.float16, torch.bfloat16)


@dataclass
class ActivationResult:
    """The activation check of one layer (`layer`) or of all layers pooled (layer None)."""

    act: str
    layer: int | None
    names: list[str]  # the hook_post streams it covers
    n: int
    worst_z: float  # the largest |mean error| / standard error over the bins
    worst_bias: float  # that bin's |mean error| relative to its rms max(|hook_pre|, |hook_post|)
    pre_range: list[float] = field(default_factory=list)  # that bin's hook_pre range
    passed: bool = True

    def describe(self) -> str:
        where = self.names[0] if self.layer is not None else f"mlp.hook_post of every layer ({len(self.names)}, pooled)"
        lo, hi = self.pre_range or (math.nan, math.nan)
        return (f"activation: {where} is not {self.act}(hook_pre): a systematic error of {self.worst_bias:.2g} of "
                f"its size ({self.worst_z:.1f} standard errors) for hook_pre in [{lo:.3g}, {hi:.3g}]; rounding "
                "leaves no such bias")


def check_activation(stores: list[tuple[dict, torch.Tensor, str]], act: str,
                     n_layers: int) -> tuple[list[ActivationResult], str | None]:
    """Test the candidate's streams `stores` ([(store, real mask, shape of the MLP streams)]) against `act`.
    Returns (one result per layer that has both streams, then the pooled one; why nothing was tested)."""
    fn = ACT_FNS.get(act)
    if fn is None:
        return [], f"activation check skipped: no reference function for hidden_act {act!r}"
    per_layer, skipped = {}, None
    for layer in range(n_layers):
        pre_name, post_name = block_hook(layer, PRE), block_hook(layer, POST)
        xs, es, ys, eval_u = [], [], [], 0.0
        for store, real, shape in stores:
            if pre_name not in store or post_name not in store:
                continue
            post = store[post_name]
            if act in COMPOSITE and post.dtype in HALF:
                skipped = (f"activation check skipped: {act} is several ops, each rounded to "
                           f"{str(post.dtype).removeprefix('torch.')}, so its error has a direction of its own")
                continue
            pre, _ = real_entries(store[pre_name], shape, real)
            out, _ = real_entries(post, shape, real)
            if pre.shape != out.shape:
                continue
            xs.append(pre.flatten())
            ys.append(out.flatten())
            # Against the exact value rounded to the stream's format: rounding alone is not unbiased where
            # the function is near the identity on the input grid (GELU for x > 3: x(1 - tiny) rounds to x).
            es.append(out.flatten() - fn(pre.flatten()).to(post.dtype).to(torch.float64))
            # torch evaluates half-precision activations in fp32 ("opmath"), fp64 ones in fp64
            eval_u = max(eval_u, UNIT_ROUNDOFF["float64" if post.dtype == torch.float64 else "float32"])
        if xs:
            per_layer[layer] = (torch.cat(xs), torch.cat(es), torch.cat(ys), eval_u)
    if not per_layer:
        return [], skipped
    pooled_x = torch.cat([v[0] for v in per_layer.values()])
    if pooled_x.numel() < MIN_PER_BIN * 2:
        return [], None
    edges = torch.quantile(_sample(pooled_x), torch.linspace(0, 1, BINS + 1, dtype=torch.float64)[1:-1])
    bounds = torch.cat((pooled_x.min()[None], edges, pooled_x.max()[None]))  # each bin's hook_pre range
    del pooled_x
    stats = {layer: _bin_stats(x, e, y, edges) for layer, (x, e, y, _) in per_layer.items()}
    results = [_result(act, layer, [block_hook(layer, POST)], stats[layer], per_layer[layer][3], bounds)
               for layer in per_layer]
    names = [block_hook(layer, POST) for layer in per_layer]
    pooled = torch.stack(list(stats.values())).sum(0)  # one activation for all layers: add up the bins
    results.append(_result(act, None, names, pooled, max(v[3] for v in per_layer.values()), bounds))
    return results, None


def _sample(x: torch.Tensor, n: int = 1 << 20) -> torch.Tensor:
    """At most n evenly spaced elements (torch.quantile refuses very large inputs)."""
    return x if x.numel() <= n else x[:: math.ceil(x.numel() / n)]


def _bin_stats(x, e, y, edges) -> torch.Tensor:
    """Per bin of hook_pre: [count, sum e, sum e^2, sum scale^2] (a [4 BINS] tensor)."""
    which = torch.bucketize(x, edges)
    # erf-based GELU in fp32 loses relative accuracy where it is ~0 (1 + erf cancels): its error scales
    # with the input, so the floor and the reported size are taken against max(|pre|, |post|).
    scale = torch.maximum(x.abs(), y.abs())
    return torch.stack([torch.bincount(which, weights=w, minlength=BINS)
                        for w in (torch.ones_like(e), e, e * e, scale * scale)])


def _result(act, layer, names, stats, u, bounds) -> ActivationResult:
    count, total, square, scale_sq = stats
    ok = count >= MIN_PER_BIN
    n = count.clamp(min=1)
    mean = total / n
    var = (square / n - mean * mean).clamp(min=0) * n / (n - 1).clamp(min=1)
    se = (var / n).sqrt()
    rms_scale = (scale_sq / n).sqrt()
    z = torch.where(se > 0, mean.abs() / se.clamp(min=1e-300), torch.where(mean != 0, math.inf, 0.0))
    floor = FLOOR_U * u * rms_scale
    failing = ok & (z > Z) & (mean.abs() > floor)
    bias = torch.where(rms_scale > 0, mean.abs() / rms_scale.clamp(min=1e-300), mean.abs())
    score = torch.where(ok, z, torch.zeros_like(z))
    worst = int(torch.argmax(torch.where(failing, bias, torch.zeros_like(bias)))) if bool(failing.any()) \
        else int(torch.argmax(score))
    return ActivationResult(act=act, layer=layer, names=names, n=int(count.sum()), worst_z=float(score[worst]),
                            worst_bias=float(bias[worst]), pre_range=[float(bounds[worst]), float(bounds[worst + 1])],
                            passed=not bool(failing.any()))
