"""Benchmark: forward time of neox_lab's fast path against transformers' GPTNeoX, same weights.

Default (CUDA): random-init pythia-410m and pythia-1.4b shapes (neox_lab.PRESETS), fp16, batch 8 x 2048,
under torch.inference_mode, every hook point idle unless the variant says otherwise:

    hf_sdpa       transformers GPTNeoXForCausalLM, attn_implementation="sdpa"
    hf_eager      the same model with attn_implementation="eager"
    neox_<b>      neox_lab forward with attn_backend <b> (--backends; default flash, sdpa)
    neox_cache    run_with_cache() of every `blocks.*.hook_resid_post` on the first backend: the overhead
                  of caching against that backend's plain forward
    neox_pattern1 the first backend with a read-only `hook_pattern` hook on layer 0: only that layer
                  falls back to the eager kernel; "x plain" is its extra time over the plain forward
                  against one layer's eager cost, (neox_eager - plain) / n_layers

The weights are transformers' random init, mapped into neox_lab in memory (the key mapping that loading
checkpoints uses). Time: CUDA events around each call, --warmup untimed calls, the median of --repeats.
Ratios are against hf_sdpa measured in the same run.

FLOPs per forward (stated, not measured): 2 * P * T + 2 * L * b * s^2 * d_model, where T = b * s tokens,
P = L * 12 * d_model^2 + d_model * vocab the matmul parameters (qkv 3d^2, out d^2, MLP 8d^2 per layer,
and the unembedding; biases, LayerNorms and the embedding lookup ignored), and the second term is the
causal half of attention's two [s x s] matmuls per head (4 * b * s^2 * d_model per layer in full).
"% peak" divides the achieved FLOP/s by a measured 8192^3 fp16 matmul in the same process.
Peak memory: torch.cuda.max_memory_allocated() during one timed call, in GiB (weights included).

    python experiments/bench_forward.py                       # the H100 run (about 1.5 minutes)
    python experiments/bench_forward.py --device cpu --quick  # tiny shapes, seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import torch

from neox_lab import PRESETS, NeoXConfig, NeoXForCausalLM
from neox_lab.model.loading import hf_to_neox_key

QUICK_CFG = NeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=256, rotary_pct=0.25, max_position_embeddings=64)
#: Issue 27: the fast path's forward at most this fraction of transformers' sdpa time (8 x 2048, fp16/bf16).
FORWARD_GOAL = 0.85
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny model and batch (CPU smoke test)")
    p.add_argument("--presets", nargs="+", default=["pythia-410m", "pythia-1.4b"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--backends", nargs="+", default=None, help="neox_lab backends (default flash sdpa on "
                   "cuda, sdpa eager on cpu)")
    p.add_argument("--no-hf-eager", action="store_true", help="skip transformers' eager attention")
    p.add_argument("--forward-only", action="store_true",
                   help="only the plain forwards: no neox_cache / neox_pattern1 / neox_eager (the bf16 rerun)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.dtype = DTYPES[args.dtype or ("fp32" if cpu else "fp16")]
    args.backends = args.backends or (["sdpa", "eager"] if cpu else ["flash", "sdpa"])
    if args.quick:
        args.batch, args.seq, args.warmup, args.repeats = 2, 32, 1, 3
    if cpu and "flash" in args.backends:
        p.error("attn_backend 'flash' needs CUDA; on cpu use --backends sdpa eager")
    return args


# ------------------------------------------------------------------------------------------- models
def build_models(cfg: NeoXConfig, dtype, device):
    """transformers' random-init model and the neox_lab model holding the same weights."""
    import transformers

    hf_cfg = transformers.GPTNeoXConfig(**cfg.to_hf(), attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.GPTNeoXForCausalLM._from_config(hf_cfg, dtype=dtype).eval()
        nx = NeoXForCausalLM(cfg).to(dtype).eval()
    state = {hf_to_neox_key(k, bare=False): v for k, v in hf.state_dict().items()}
    expected = nx.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise RuntimeError(f"transformers' weights leave neox_lab tensors unset: {missing[:5]}")
    nx.load_state_dict({k: state[k] for k in expected})
    return hf, nx


def matmul_flops(cfg: NeoXConfig, batch: int, seq: int) -> float:
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    params = n_layers * (4 * d * d + 2 * d * cfg.intermediate_size) + d * cfg.vocab_size
    return 2.0 * params * batch * seq + 2.0 * n_layers * batch * seq * seq * d


# ------------------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn, warmup: int, repeats: int) -> tuple[float, float]:
        """(median ms, peak GiB during one call; nan on cpu)."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        peak = float("nan")
        if self.cuda:
            gc.collect()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
        return statistics.median(times), peak


def matmul_peak_tflops(timer: Timer, dtype, device: str, n: int) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ms, _ = timer.time_ms(lambda: a @ b, warmup=3, repeats=10)
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------------------- run
def bench_preset(name: str, cfg: NeoXConfig, args, timer: Timer, peak: float) -> list[dict]:
    hf, nx = build_models(cfg, args.dtype, args.device)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    flops = matmul_flops(cfg, args.batch, args.seq)
    # use_cache=False: transformers would otherwise build a KV cache nobody reads.
    variants = {"hf_sdpa": lambda: hf(ids, use_cache=False)}
    if not args.no_hf_eager:
        variants["hf_eager"] = lambda: hf(ids, use_cache=False)
    for backend in args.backends:
        variants[f"neox_{backend}"] = (lambda b: lambda: (nx.set_attn_backend(b), nx(ids)))(backend)
    first = args.backends[0]

    def cache_resid():
        nx.set_attn_backend(first)
        return nx.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))

    def pattern_hook_on_layer_0():
        nx.set_attn_backend(first)
        return nx.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: None)])

    if not args.forward_only:
        variants["neox_cache"] = cache_resid
    if first != "eager" and not args.forward_only:
        variants["neox_pattern1"] = pattern_hook_on_layer_0
        if "eager" not in args.backends:
            variants["neox_eager"] = lambda: (nx.set_attn_backend("eager"), nx(ids))
    rows = []
    for variant, fn in variants.items():
        if variant.startswith("hf_"):
            hf.set_attn_implementation(variant.removeprefix("hf_"))
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pattern variant's fallback warning, once per layer
            ms, mem = timer.time_ms(fn, args.warmup, args.repeats)
        kernels = ",".join(sorted(set(k or "-" for k in nx.attn_kernels()))) if variant.startswith("neox") else ""
        if variant == "neox_pattern1":
            kernels = f"layer 0: {nx.attn_kernels()[0]}; others: " + ",".join(sorted(set(nx.attn_kernels()[1:])))
        tflops = flops / (ms * 1e-3) / 1e12
        rows.append(dict(model=name, variant=variant, ms=ms, tflops=tflops, peak_pct=100 * tflops / peak,
                         mem=mem, kernels=kernels))
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    base = next(r["ms"] for r in rows if r["variant"] == "hf_sdpa")
    plain = next(r["ms"] for r in rows if r["variant"] == f"neox_{first}")
    eager = next((r["ms"] for r in rows if r["variant"] == "neox_eager"), float("nan"))
    for r in rows:
        r["vs_hf_sdpa"] = r["ms"] / base
        r["vs_plain"] = r["ms"] / plain if r["variant"] == "neox_cache" else float("nan")
        if r["variant"] == "neox_pattern1":
            # extra time of one fallen-back layer over one layer's eager cost
            r["vs_plain"] = (r["ms"] - plain) / ((eager - plain) / cfg.num_hidden_layers)
    return rows  # the models go with this frame; main() empties the CUDA cache before the next preset


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --quick")
        return 2
    timer = Timer(args.device)
    peak = matmul_peak_tflops(timer, args.dtype, args.device, 512 if args.quick else 8192)
    presets = {"quick": QUICK_CFG} if args.quick else {n: PRESETS[n] for n in args.presets}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, {str(args.dtype).removeprefix('torch.')}, "
          f"batch {args.batch} x {args.seq}, median of {args.repeats} after {args.warmup} warm-up")
    print(f"matmul peak ({512 if args.quick else 8192}^3): {peak:.3g} TFLOP/s")
    print("| model | variant | ms | TFLOP/s | % peak | x hf_sdpa | x plain | peak GiB | kernels |")
    print("|---|---|---|---|---|---|---|---|---|")
    all_rows = []
    for name, cfg in presets.items():
        rows = bench_preset(name, cfg, args, timer, peak)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        all_rows += rows
        for r in rows:
            print(f"| {r['model']} | {r['variant']} | {r['ms']:.2f} | {r['tflops']:.3g} | {r['peak_pct']:.0f} | "
                  f"{r['vs_hf_sdpa']:.3f} | {r['vs_plain']:.3f} | {r['mem']:.2f} | {r['kernels']} |", flush=True)
    first = args.backends[0]
    print(f"goals: neox_{first} <= {FORWARD_GOAL} x hf_sdpa; neox_cache (resid_post) <= 1.10 x neox_{first}; "
          "neox_pattern1 extra <= 1.0 x one layer's eager cost")
    for name in presets:
        rows = {r["variant"]: r for r in all_rows if r["model"] == name}
        fwd = rows[f"neox_{first}"]["vs_hf_sdpa"]
        cache = rows.get("neox_cache", {}).get("vs_plain", float("nan"))
        pattern = rows.get("neox_pattern1", {}).get("vs_plain", float("nan"))
        if args.device != "cuda" or args.quick:
            print(f"  {name}: forward {fwd:.3f} x hf_sdpa, resid cache {cache:.3f} x plain, pattern hook "
                  f"{pattern:.2f} x one eager layer (the goals are for the CUDA run)")
            continue
        print(f"  {name}: forward {fwd:.3f} x hf_sdpa ({'met' if fwd <= FORWARD_GOAL else 'NOT met'}), "
              f"resid cache {cache:.3f} x plain ({'met' if cache <= 1.10 else 'NOT met'}), pattern hook "
              f"{pattern:.2f} x one eager layer ({'met' if pattern <= 1.0 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
