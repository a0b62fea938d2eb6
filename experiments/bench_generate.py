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
"same as first" is the fraction of generated tokens equal to the first variant's (transformers eager by
default): greedy decoding of a random model meets near-ties, so half-precision rounding differences can
legitimately change a row from some point on.

Goals (issue 27): plain `neox` >= `hf_sdpa` tokens/s at every batch size measured (batch 1 is bound by
the host: per-token Python and kernel-launch work), and `neox_compile` >= 500 tokens/s at batch 1 on
pythia-1.4b (the memory-bandwidth limit is ~1000 tokens/s on an H100).

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
                   help="measured in this order (the others' tokens are compared with the first's)")
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
    print(f"| batch | variant | s | tokens/s | x {args.variants[0]} | same as {args.variants[0]} |")
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
            if variant == args.variants[0]:
                reference, base = new, tps
            same = (float((new == reference).float().mean())
                    if reference is not None and new.shape == reference.shape else float("nan"))
            ratio = tps / base if base else float("nan")
            print(f"| {batch} | {variant} | {seconds:.3f} | {tps:.1f} | {ratio:.2f} | {same:.3f} |", flush=True)
            results[(batch, variant)] = tps
    cuda_run = args.device == "cuda" and not args.quick and not args.overhead_probe
    verdict = (lambda ok: "met" if ok else "NOT met") if cuda_run else (lambda ok: "the goal is for the CUDA run")
    for batch in args.batches:
        plain, hf_sdpa = results.get((batch, "neox")), results.get((batch, "hf_sdpa"))
        if plain is not None and hf_sdpa is not None:
            print(f"goal: plain neox >= hf_sdpa at batch {batch}: {plain:.1f} vs {hf_sdpa:.1f} tokens/s, "
                  f"{plain / hf_sdpa:.3f}x ({verdict(plain >= hf_sdpa)})")
    compiled = results.get((1, "neox_compile"))
    if compiled is not None:
        print(f"goal: neox_compile >= 500 tokens/s at batch 1 on pythia-1.4b: {compiled:.1f} "
              f"({verdict(compiled >= 500 and args.preset == 'pythia-1.4b')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
