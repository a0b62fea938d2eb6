"""`compare` at its defaults on code bugs in a live model, and on legitimate variants: the table of
issue 23 (bug x dtype -> verdict and named place; each legitimate variant's worst ratio to its bound).

    python experiments/compare_code_bugs.py [--layers 6] [--bugs gelu_tanh,...] [--long 2048]

The model: a 6-layer Pythia-shaped NeoX (d_model 128, 4 heads, d_mlp 512, rotary_pct 0.25, vocab 128,
2048 positions) with trained-like statistics (`make_trained_like`, std 0.2: random biases and
LayerNorms, attention-score rms ~3-10). Each bug of `neox_lab.testing.code_bugs` is injected into a
copy, cast to the dtype, and compared with the clean model (fp32; fp64 for the fp64 row).
Legitimate variants: the margin is the worst ratio of an error to its bound over every stream, its
average over positions, the logits and the decoding steps (< 1 passes).
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time

import torch
import transformers

from neox_lab.testing import compare
from neox_lab.testing.code_bugs import CODE_BUGS
from neox_lab.testing.mutations import named_place
from neox_lab.testing.pairs import build_pair, make_trained_like, tiny_config

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pair(layers: int, directory: str):
    cfg = tiny_config(num_hidden_layers=layers, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                      rotary_pct=0.25, vocab_size=128, max_position_embeddings=2048)
    hf, nx = build_pair(cfg, 0, trained_like=0.2, directory=directory)
    nx.set_attn_backend("eager")
    return hf, nx


def hf_in(directory: str, dtype, implementation: str = "eager"):
    """transformers' model as a user loads it in `dtype` (from_pretrained keeps its rotary table in fp32;
    `.half()` on a loaded model would round it)."""
    return transformers.GPTNeoXForCausalLM.from_pretrained(directory, dtype=dtype,
                                                           attn_implementation=implementation).eval()


def worst_ratio(report) -> tuple[float, str]:
    """The largest error / bound over streams, stream averages, logits and decoding steps, and where."""
    worst, where = 0.0, "-"
    for h in report.all_hooks:
        for rel, bound, what in ((h.rel, h.bound, h.name), (h.mean_rel, h.mean_bound, h.name + " (average)")):
            if bound and rel is not None and rel / bound > worst:
                worst, where = rel / bound, f"{what} [{h.batch}]"
    for lg in report.all_logits:
        if lg.rel / lg.bound > worst:
            worst, where = lg.rel / lg.bound, f"logits [{lg.batch}]"
    if report.decoding is not None:
        for side, steps in report.decoding.consistency.items():
            for s in steps:
                if s.rel / s.bound > worst:
                    worst, where = s.rel / s.bound, f"decoding {side} step {s.step}"
    return worst, where


def named(report) -> str:
    first = report.first_divergence
    if first is not None:
        return f"{first.name} [{first.batch}]"
    bad = [a for a in report.activation if not a.passed]
    if bad:
        return f"activation check: {bad[0].names[0]}"
    if report.decoding is not None and report.decoding.failures():
        return report.decoding.failures()[0].split(":")[1].strip()
    return "-"


def bugs(nx, names: list[str]) -> None:
    print("## code bugs (compare at its defaults; reference: the clean model in fp32, fp64 for fp64)")
    print(f"{'bug':<28} {'dtype':<5} {'verdict':<16} {'named place ok':<15} named first")
    for name in names:
        kw = {"layer": 3} if name in ("mlp_bias_dropped", "attn_bias_dropped") else {}
        broken, expected = CODE_BUGS[name](nx, **kw)
        for label, dtype in DTYPES.items():
            ref = copy.deepcopy(nx).double() if dtype == torch.float64 else nx
            report = compare(copy.deepcopy(broken).to(dtype), ref)
            print(f"{name:<28} {label:<5} {report.verdict:<16} {str(named_place(report, expected)):<15} "
                  f"{named(report)}", flush=True)


def legit(hf, nx, long: int, directory: str) -> None:
    print("\n## legitimate variants (worst error / bound; < 1 passes)")
    print(f"{'variant':<44} {'verdict':<12} {'worst ratio':>11}  where  (seconds)")
    sdpa = copy.deepcopy(nx)
    sdpa.set_attn_backend("sdpa")
    hf_sdpa = copy.deepcopy(hf)
    hf_sdpa.set_attn_implementation("sdpa")
    variants = {
        "copy, fp32": (copy.deepcopy(nx), nx, None),
        "sdpa vs eager, fp32": (sdpa, nx, None),
        "transformers eager fp32 vs neox_lab fp32": (hf, nx, None),
        "transformers sdpa fp32 vs neox_lab fp32": (hf_sdpa, nx, None),
        "neox_lab fp32 vs transformers eager fp32": (nx, hf, None),
        "neox_lab fp64 vs transformers sdpa fp64": (copy.deepcopy(nx).double(), copy.deepcopy(hf_sdpa).double(), None),
        "fp16 vs fp32": (copy.deepcopy(nx).half(), nx, None),
        "sdpa fp16 vs eager fp32": (copy.deepcopy(sdpa).half(), nx, None),
        "transformers fp16 vs neox_lab fp32": (hf_in(directory, torch.float16), nx, None),
        "bf16 vs fp32": (copy.deepcopy(nx).bfloat16(), nx, None),
        "transformers bf16 vs neox_lab fp32": (hf_in(directory, torch.bfloat16), nx, None),
        "transformers sdpa fp16 vs neox_lab fp32": (hf_in(directory, torch.float16, "sdpa"), nx, None),
        f"fp16 vs fp32, {long} tokens": (copy.deepcopy(nx).half(), nx, long),
        f"sdpa fp16 vs eager fp32, {long} tokens": (copy.deepcopy(sdpa).half(), nx, long),
        f"transformers fp16 vs neox_lab fp32, {long} tokens": (hf_in(directory, torch.float16), nx, long),
        f"fp16 vs fp32, {long} tokens, near-hard attention (std 0.3)": "sharp",
    }
    for label, variant in variants.items():
        if variant == "sharp":
            sharp = make_trained_like(copy.deepcopy(nx), seed=0, std=0.3)
            variant = (copy.deepcopy(sharp).half(), sharp, long)
        a, b, length = variant
        t0 = time.perf_counter()
        if length is None:
            report = compare(a, b)
        else:
            ids = torch.randint(0, nx.cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
            report = compare(a, b, ids, hooks=lambda n: n.endswith(("hook_resid_post", "hook_pattern", "hook_z")),
                             padded=False, decode_steps=0)
        worst, where = worst_ratio(report)
        print(f"{label:<44} {report.verdict:<12} {worst:>11.3g}  {where}  ({time.perf_counter() - t0:.1f})",
              flush=True)
        if not math.isfinite(worst) or worst > 1 or report.verdict != "equivalent":
            print("    " + report.summary())  # a failure the ratios do not show (a top-1 flip, say)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--bugs", default=",".join(CODE_BUGS), help="comma-separated names of code_bugs")
    parser.add_argument("--long", type=int, default=2048, help="length of the long legitimate variant")
    parser.add_argument("--skip-legit", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        hf, nx = pair(args.layers, directory)
        bugs(nx, [b for b in args.bugs.split(",") if b])
        if not args.skip_legit:
            legit(hf, nx, args.long, directory)


if __name__ == "__main__":
    main()
