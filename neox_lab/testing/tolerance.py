"""The tolerance policy: how far two runs of "the same" NeoX may drift apart from rounding alone.

This is the analytic, worst-case policy. `compare` measures the rounding instead where it can
(`floors.py`: the reference re-run in fp64 and in each side's dtype), which is 10-100 times tighter on
most models; this policy remains what a float64 side contributes, what applies when neither side can be
re-run, and where the absolute floor and the top-1 requirement come from.

Model of the noise
------------------
Two correct implementations of one NeoX differ only in rounding: the order of sums (eager vs sdpa,
neox_lab vs transformers), the format streams are stored in (fp16 vs fp32), the format products are
accumulated in. One side's relative error on a stream after one block is, to first order,

    eps(side) = u_store + u_acc * sqrt(width)

u_store is the unit roundoff of the format activations are stored in (every stored stream is rounded
once), u_acc that of the format dot products accumulate in (a length-n sum of rounded terms drifts
like sqrt(n) u_acc in the probabilistic analysis of Higham & Mary, 2019), width the longest
contraction (max of d_model, d_mlp and the sequence length: attention sums over keys). Half
precision accumulates in fp32 in torch's CPU and CUDA matmuls, so for fp16/bf16 the storage term
dominates and the bound barely depends on width; for fp32 and fp64 the accumulation term does.

Roundings of different blocks are independent, so they add like a random walk: after `depth`
rounding stages (hook_embed is depth 1, blocks.L.* depth L+1, ln_final and the logits n_layers+1)
the expected gap is sqrt(depth) times one stage's. Errors of the two sides are independent too, so
they add in quadrature. The noise floor of a stream is therefore

    rel(depth) = C * sqrt(eps(a)^2 + eps(b)^2) * sqrt(depth),       C = 32

compared normwise over real (non-pad) positions: ||a - b|| <= rel ||b|| + abs sqrt(n), in fp64.

C gathers what the first-order model leaves out: about ten rounded streams per block (sqrt(10) ~ 3),
and the Jacobians of LayerNorm, the activation and above all softmax, whose output moves by about
u * |score| when its input scores carry relative error u: the sharper the attention, the larger
the gap. C was measured as the largest ratio of observed relative error (any hook) to
sqrt(eps_a^2 + eps_b^2) sqrt(depth), over random 4-layer models (d_model 64 and 256, parallel and
sequential, with and without left padding), the init std setting the attention-score scale:

    score rms (init std)            fp16/fp32  bf16/fp32  sdpa/eager fp32  neox/HF fp32  neox/HF fp64
    0.03-0.1 (0.02, transformers')     2.0        2.1          0.17            0.18         0.04
    0.7-2.6  (0.1)                     3.7        3.7          0.24            0.32         0.05
    2.7-10   (0.2, like trained heads) 15         15            0.75            1.1          0.13
    11-41    (0.4, near-hard attention) 160       56            5.4            15            0.9

C = 32 covers scores up to a trained model's scale with a factor 2 for fp16/bf16 and > 30 for fp32
pairs (the sqrt(width) accumulation term is a worst case; most sums happen in the same order). With
near-hard attention (score rms ~40) a rounding flips which key wins, and half-precision runs
legitimately exceed the floor: scale it there (`policy.scaled(8)`). The floor stays far below real
bugs in fp32: a wrong rotary channel, a swapped head or a missing bias moves a stream by 1e-2 to 1,
10^3 times the fp32 floor. In half precision only bugs of that size stand out (fp16 floor ~2e-2,
bf16 ~0.1-0.5 with depth): check structure in fp32, and use the half-precision policies to check
that a kernel or a cast is as close as its format allows.

Special cases, each a property of one side:
- transformers' eager attention takes its softmax in fp32 whatever the model dtype, so an fp64
  transformers side is counted as fp32 (`precision_of(..., backend="hf-eager")`).
- fp32 matmuls on CUDA with TF32 enabled round their inputs to 10 mantissa bits: counted as "tf32"
  (u = 2^-11, like fp16).
- The absolute term abs = C * (spacing of the format's subnormals) matters only where a stream is
  (nearly) zero: fp16 loses relative precision below 6.1e-5, where its spacing is 2^-24 ~ 6e-8.
- The attention backend (eager, sdpa, flash) changes the order of the same roundings, not their
  number: it enters through the precision alone, and flash vs eager at one half dtype gets that
  dtype's floor twice in quadrature.

Logits are held to the same floor at depth n_layers+1, plus two distribution checks:
- top-1 agreement: the fraction of real positions whose argmax agrees, where a disagreement counts
  only if the reference prefers its own top token by more than twice the per-logit bound (a near
  tie may flip under rounding without anything being wrong). Required: 1.0 for fp32/fp64 pairs,
  0.99 with a half-precision side.
- KL(p_b || p_a) of the next-token distributions: a logit perturbation d gives KL ~ Var_p(d)/2 <=
  rms(d)^2 / 2, so the mean KL may reach (rel * rms(logits_b) + abs)^2 / 2 (Tolerance.kl=None
  derives this at check time; a number fixes the bound in nats).

Resulting floors (relative, at depth 1; multiply by sqrt(depth)), at width 64 (the test configs)
and 3072 (pythia-160m's d_mlp):

    pair                                    width 64   width 3072
    fp64 vs fp64                             4.5e-14      2.8e-13
    fp32 vs fp32 (any backends)              2.4e-05      1.5e-04
    fp64 vs transformers-fp64 (eager)        1.7e-05      1.1e-04
    bf16 vs fp32                             1.3e-01      1.3e-01
    fp16 vs fp32                             1.6e-02      1.6e-02
    fp16 vs fp16 (flash vs eager)            2.2e-02      2.2e-02
    bf16 vs bf16 (flash vs eager)            1.8e-01      1.8e-01

(`python -m neox_lab.testing.tolerance` prints this table.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

#: Unit roundoff u = 2^-p, p the significand bits (with the implicit one) of each format.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "tf32": 2.0**-11, "float16": 2.0**-11,
                 "bfloat16": 2.0**-8}
#: Spacing of each format's subnormal numbers: the absolute resolution near zero.
SUBNORMAL_SPACING = {"float64": 2.0**-1074, "float32": 2.0**-149, "tf32": 2.0**-149, "float16": 2.0**-24,
                     "bfloat16": 2.0**-133}
#: Format products accumulate in (torch's half matmuls and TF32 accumulate in fp32).
ACCUMULATES_IN = {"float64": "float64", "float32": "float32", "tf32": "float32", "float16": "float32",
                  "bfloat16": "float32"}
HALF = ("float16", "bfloat16", "tf32")

#: The measured-and-padded constant of the noise model (see the module docstring).
C = 32.0
#: Contraction width assumed when none is given (a mid-sized model's d_mlp).
DEFAULT_WIDTH = 1024

_ALIASES = {"fp64": "float64", "double": "float64", "fp32": "float32", "float": "float32", "fp16": "float16",
            "half": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Tolerance:
    """How far two runs may differ and still count as equivalent.

    rel: normwise relative bound ||a - b|| / ||b|| (at depth 1 when `depth_growth`).
    abs: per-element absolute floor, for streams that are (nearly) zero.
    top1_agreement: minimum fraction of real positions whose top-1 token agrees (near ties excused).
    kl: maximum mean KL(p_b || p_a) in nats; None derives it from the logits bound at check time.
    depth_growth: grow `rel` like sqrt(depth) along the forward pass (the policy's random-walk model);
    a hand-made Tolerance(rel=...) applies `rel` flat unless this is set.
    """

    rel: float
    abs: float = 0.0
    top1_agreement: float = 1.0
    kl: float | None = None
    depth_growth: bool = False
    label: str = "custom"

    def rel_at(self, depth: int) -> float:
        """The relative bound for a stream `depth` rounding stages deep (hook_embed: 1)."""
        return self.rel * math.sqrt(max(depth, 1)) if self.depth_growth else self.rel

    def allows(self, err_norm: float, ref_norm: float, n: int, depth: int) -> bool:
        """Whether ||a - b|| = err_norm is within the floor for a reference of norm ref_norm, n elements."""
        if math.isnan(err_norm):
            return False
        return err_norm <= self.rel_at(depth) * ref_norm + self.abs * math.sqrt(max(n, 1))

    def scaled(self, factor: float) -> Tolerance:
        """The same policy with `rel` and `abs` multiplied by `factor` (e.g. for a lossy quantisation)."""
        return dataclasses.replace(self, rel=self.rel * factor, abs=self.abs * factor,
                                   label=f"{self.label} x{factor:g}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def precision_of(dtype, backend: str = "eager", device=None) -> str:
    """The rounding format a side effectively computes in: a key of UNIT_ROUNDOFF.

    `backend` names the attention backend ("eager", "sdpa", "flash") or, for a transformers model,
    "hf-<attn_implementation>"; `device` matters only for TF32 on CUDA.
    """
    name = _dtype_name(dtype)
    if name == "float64" and backend == "hf-eager":
        return "float32"  # transformers' eager softmax is fp32 whatever the dtype
    if name == "float32" and device is not None and torch.device(device).type == "cuda":
        if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
            return "tf32"
    return name


def side_noise(precision: str, width: int = DEFAULT_WIDTH) -> float:
    """eps = u_store + u_acc sqrt(width): one side's relative rounding error per stage."""
    return UNIT_ROUNDOFF[precision] + UNIT_ROUNDOFF[ACCUMULATES_IN[precision]] * math.sqrt(max(width, 1))


def policy_for(dtype_a, dtype_b=None, backend_a: str = "eager", backend_b: str = "eager", *,
               width: int = DEFAULT_WIDTH, device_a=None, device_b=None) -> Tolerance:
    """The noise floor for comparing a run in (dtype_a, backend_a) with one in (dtype_b, backend_b).

    dtypes are torch dtypes or names ("float16", "bf16", ...); `dtype_b` defaults to `dtype_a`.
    `width` is the longest contraction (max of d_model, d_mlp, sequence length); `compare` passes
    the real one. See the module docstring for the derivation.
    """
    dtype_b = dtype_a if dtype_b is None else dtype_b
    pa = precision_of(dtype_a, backend_a, device_a)
    pb = precision_of(dtype_b, backend_b, device_b)
    eps = math.hypot(side_noise(pa, width), side_noise(pb, width))
    half = pa in HALF or pb in HALF
    return Tolerance(
        rel=C * eps,
        abs=C * max(SUBNORMAL_SPACING[pa], SUBNORMAL_SPACING[pb]),
        top1_agreement=0.99 if half else 1.0,
        kl=None,
        depth_growth=True,
        label=f"{pa}/{backend_a} vs {pb}/{backend_b}",
    )


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(dtype).removeprefix("torch.").lower()
    name = _ALIASES.get(name, name)
    if name not in UNIT_ROUNDOFF:
        raise ValueError(f"no tolerance policy for dtype {dtype!r}; known: {sorted(UNIT_ROUNDOFF)}")
    return name


def policy_table(widths=(64, 3072)) -> str:
    """The floors of the common pairs as a text table (relative, depth 1)."""
    pairs = [("fp64 vs fp64", "float64", "float64", "eager", "eager"),
             ("fp32 vs fp32 (any backends)", "float32", "float32", "eager", "sdpa"),
             ("fp64 vs transformers-fp64 (eager)", "float64", "float64", "eager", "hf-eager"),
             ("bf16 vs fp32", "bfloat16", "float32", "eager", "eager"),
             ("fp16 vs fp32", "float16", "float32", "eager", "eager"),
             ("fp16 vs fp16 (flash vs eager)", "float16", "float16", "flash", "eager"),
             ("bf16 vs bf16 (flash vs eager)", "bfloat16", "bfloat16", "flash", "eager")]
    head = f"{'pair':<35}" + "".join(f"{'width ' + str(w):>13}" for w in widths)
    rows = [head]
    for label, da, db, ba, bb in pairs:
        rows.append(f"{label:<35}" + "".join(f"{policy_for(da, db, ba, bb, width=w).rel:>13.1e}"
                                              for w in widths))
    return "\n".join(rows)


if __name__ == "__main__":
    print(policy_table())
