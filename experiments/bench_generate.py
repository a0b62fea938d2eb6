"""Benchmark: greedy decoding tokens/s, neox_lab `generate` against transformers `generate`, same weights.

Default (CUDA): random-init pythia-1.4b shape, fp16, a 32-token random prompt, 128 new tokens (no early
stop: neox_lab gets eos_token_id=None, transformers min_new_tokens=128), at batch 1 and batch 16:

    hf_eager / hf_sdpa   transformers GPTNeoXForCausalLM.generate, attn_implementation eager / sdpa
    neox                 neox_lab generate, attn_backend "auto" (flash on CUDA half), plain KV cache
    neox_compile         generate(compile=True): static KV cache + CUDA-graph-captured decoding step

tokens/s = batch * new tokens / wall time of the whole generate call (prefill included), synchronised,
the median of --repeats (transformers: --hf-repeats, 1 by default: its sdpa generate runs at ~19 tokens/s,
~7 s a call) after --warmup calls (neox_compile's warm-up captures its graph; later calls of the same
shape replay it). Each row is printed as soon as it is measured, so a run cut short keeps what it has.
"same as hf_eager" is the fraction of generated tokens equal to transformers eager's: greedy decoding
of a random model meets near-ties, so half-precision rounding differences can legitimately change a row
from some point on.

Goal (issue 4): >= 300 tokens/s at batch 1 (the memory-bandwidth limit is ~1000 tokens/s on an H100).

    python experiments/bench_generate.py                       # the H100 run (about 1.5 minutes)
    python experiments/bench_generate.py --device cpu --quick  # tiny shapes, seconds (the smoke test)

`--overhead-probe` keeps the preset's depth but shrinks every width (d_model 64, 8 heads, vocab 512), so
the time per token is almost all framework overhead (Python, module calls, kernel launches): what the
plain path pays per token whatever the GPU, and what the CUDA graph removes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import DTYPES, QUICK_CFG, build_models  # noqa: E402

from neox_lab import PRESETS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny model, few tokens (CPU smoke test)")
    p.add_argument("--preset", default="pythia-1.4b")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--variants", nargs="+", default=["hf_eager", "neox", "neox_compile", "hf_sdpa"],
                   help="measured in this order (hf_eager first: the others are compared with its tokens)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--overhead-probe", action="store_true",
                   help="the preset's depth with tiny widths: per-token time is framework overhead")
    args = p.parse_args(argv)
    args.dtype = DTYPES[args.dtype or ("fp32" if args.device == "cpu" else "fp16")]
    if args.quick:
        args.batches, args.prompt_len, args.new_tokens, args.warmup = [1, 2], 4, 8, 0
        args.repeats = args.hf_repeats = 1
    if args.device == "cpu" and "neox_compile" in args.variants:
        args.variants = [v for v in args.variants if v != "neox_compile"]  # CUDA graphs need CUDA
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --quick")
        return 2
    cfg = QUICK_CFG if args.quick else PRESETS[args.preset]
    if args.overhead_probe:
        cfg = cfg.replace(hidden_size=64, intermediate_size=256, num_attention_heads=8, vocab_size=512)
    hf, nx = build_models(cfg, args.dtype, args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def run(variant, ids):
        if variant.startswith("hf_"):
            hf.set_attn_implementation(variant.removeprefix("hf_"))
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
        return nx.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=None,
                           compile=variant == "neox_compile")

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    name = "quick" if args.quick else args.preset + (" overhead probe (tiny widths)" if args.overhead_probe else "")
    print(f"device {device_name}, torch {torch.__version__}, {name} "
          f"{str(args.dtype).removeprefix('torch.')}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats} (transformers: {args.hf_repeats}) after {args.warmup} warm-up")
    print("| batch | variant | s | tokens/s | x hf_eager | same as hf_eager |")
    print("|---|---|---|---|---|---|")
    results = {}
    for batch in args.batches:
        torch.manual_seed(batch)
        ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), device=args.device)
        reference = base = None
        for variant in args.variants:
            repeats = args.hf_repeats if variant.startswith("hf_") else args.repeats
            with torch.inference_mode():
                for _ in range(args.warmup):
                    run(variant, ids)
                times = []
                for _ in range(repeats):
                    sync()
                    t0 = time.perf_counter()
                    out = run(variant, ids)
                    sync()
                    times.append(time.perf_counter() - t0)
            new = out[:, args.prompt_len:]
            seconds = statistics.median(times)
            tps = batch * args.new_tokens / seconds
            if variant == "hf_eager":
                reference, base = new, tps
            same = (float((new == reference).float().mean())
                    if reference is not None and new.shape == reference.shape else float("nan"))
            ratio = tps / base if base else float("nan")
            print(f"| {batch} | {variant} | {seconds:.3f} | {tps:.1f} | {ratio:.2f} | {same:.3f} |", flush=True)
            results[(batch, variant)] = tps
    best = max((tps for (b, v), tps in results.items() if b == 1 and v.startswith("neox")), default=float("nan"))
    verdict = "met" if best >= 300 else "NOT met"
    if args.device != "cuda" or args.quick:
        verdict = "the goal is for the CUDA run"
    print(f"goal: >= 300 tokens/s at batch 1: best neox {best:.1f} ({verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
