"""Benchmark: what hook points and caching cost, against transformers' eager GPT-NeoX.

Pythia-160m shape (12 layers, d_model 768, 12 heads, vocab 50304), random weights, fp32, CPU, batches
1 x 512 and 4 x 128, all under torch.no_grad:

    hf_eager       transformers GPTNeoXForCausalLM, attn_implementation="eager" (same weights)
    idle           neox_lab forward, hook points present but nothing attached
    noop_hooks     a no-op forward hook on every hook point except hook_result (pure dispatch cost;
                   hook_result is excluded because attaching it materialises [batch pos n_heads d_model])
    cache_all      run_with_cache() with no filter: every hook point but the per-head hook_result, which
                   (as TransformerLens without use_attn_result) is cached only when asked for
    cache_every    run_with_cache(names_filter=lambda n: True): every hook point, hook_result included
    cache_resid    run_with_cache() of the residual streams only (names containing "resid")

Time: the minimum and the median of --repeats timed runs after --warmup runs; the variants are
interleaved run by run, so a neighbour's load on a shared CPU hits them all alike. Ratios are against
hf_eager (and the idle forward) in the same run and use the minimum: other processes only ever add
time, so on a shared machine the minimum is the steadier estimate. The load average is printed.

`--order blocked` runs each variant's calls back to back instead, as a loop over batches does. The two
orders differ for the caching variants: a cache of every hook point is ~1 GB at 1 x 512, and when other
variants ran in between, glibc has handed that memory back to the OS, so the next cache pays page faults
for all of it (system time); back to back, the freed memory of the last cache is reused. Telling glibc
to keep freed memory (MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184
MALLOC_TOP_PAD_=1073741824 in the environment) takes the interleaved cache_all from ~1.6x to ~1.06x the
idle forward on the 2-core dev box: a tip for long caching jobs on CPU.

Memory: each variant runs in a fresh subprocess (glibc's mmap threshold pinned low, so freed tensors go
back to the OS and RSS follows live tensors); after loading and one warm-up call the peak-RSS counter is
reset (/proc/self/clear_refs) and "peak MB" is the peak RSS during one call minus the RSS just before it:
activations, the logits and the cache, not the weights. "cache MB" is the exact size of the cached
tensors. `--memory inprocess` measures in this process instead (allocator reuse makes it a lower bound).

Idle cost: an idle hook point is one Python call that tests two lists; `hook call ns` times that call and
the last lines multiply it by the calls per forward.

    python experiments/bench_hooks.py            # full run (a few minutes on 2 cores)
    python experiments/bench_hooks.py --quick    # tiny sizes, seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import neox_lab
from neox_lab import HookPoint, NeoXConfig, NeoXForCausalLM

VARIANTS = ("hf_eager", "idle", "noop_hooks", "cache_all", "cache_every", "cache_resid")
#: The goal of issue 13: caching what run_with_cache() caches by default costs at most this many forwards.
CACHE_ALL_GOAL = 1.15
FULL_SHAPES = ((1, 512), (4, 128))
QUICK_SHAPES = ((1, 16), (2, 8))


def quick_config() -> NeoXConfig:
    return NeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64)


def make_checkpoint(cfg: NeoXConfig, directory: str) -> None:
    """Random transformers weights saved as a checkpoint both libraries load."""
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.GPTNeoXConfig(**cfg.to_hf(), attn_implementation="eager")
    hf = transformers.GPTNeoXForCausalLM(hf_cfg)
    hf.save_pretrained(directory)


def load(variant: str, directory: str):
    if variant == "hf_eager":
        import transformers

        return transformers.GPTNeoXForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    return NeoXForCausalLM.from_pretrained(directory, attn_backend="eager").eval()


def runner(variant: str, model, ids: torch.Tensor):
    """A zero-argument callable running one forward of `variant`; returns the cache (or None)."""
    noop = [(lambda name: not name.endswith("hook_result"), lambda x, hook: None)]
    filters = {"cache_all": None, "cache_every": lambda n: True, "cache_resid": lambda n: "resid" in n}
    if variant in ("hf_eager", "idle"):
        return lambda: (model(ids), None)[1]
    if variant == "noop_hooks":
        return lambda: (model.run_with_hooks(ids, fwd_hooks=noop), None)[1]
    return lambda: model.run_with_cache(ids, names_filter=filters[variant])[1]


def cache_bytes(cache) -> int:
    return 0 if cache is None else sum(t.nbytes for t in cache.values())


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_memory(variant: str, model, ids: torch.Tensor) -> dict:
    """Peak RSS growth (MB) during one call of `variant`, after a warm-up call, and the cache's size."""
    run = runner(variant, model, ids)
    with torch.no_grad():
        run()
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM (peak RSS) to the current RSS
            before = _status_kb("VmRSS")
        except OSError:
            before = None
        cache = run()
        peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return {"peak_mb": float("nan"), "cache_mb": cache_bytes(cache) / 2**20}
    return {"peak_mb": (peak - before) / 1024, "cache_mb": cache_bytes(cache) / 2**20}


def memory_in_subprocess(variant: str, directory: str, shape, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--_memory-child", variant, "--_ckpt", directory,
           "--_shape", f"{shape[0]}x{shape[1]}", "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_child(args) -> int:
    torch.set_num_threads(args.threads)
    batch, pos = (int(v) for v in args._shape.split("x"))
    model = load(args._memory_child, args._ckpt)
    ids = torch.randint(0, model.config.vocab_size, (batch, pos), generator=torch.Generator().manual_seed(0))
    print(json.dumps(measure_memory(args._memory_child, model, ids)))
    return 0


# ----------------------------------------------------------------------------- time
def time_variants(models: dict, ids: torch.Tensor, warmup: int, repeats: int, collect: bool = True,
                  blocked: bool = False):
    """Seconds per call of each variant, runs interleaved across variants (or, `blocked`, each
    variant's runs back to back); `collect` runs the garbage collector (outside the timed region)
    before each call."""
    runs = {v: runner(v, models["hf_eager" if v == "hf_eager" else "neox"], ids) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    if blocked:
        schedule = [(i, (v,)) for v in VARIANTS for i in range(warmup + repeats)]
    else:
        schedule = [(i, VARIANTS[i % len(VARIANTS):] + VARIANTS[: i % len(VARIANTS)])
                    for i in range(warmup + repeats)]
    with torch.no_grad():
        for i, order in schedule:
            for v in order:
                if collect:
                    gc.collect()
                start = time.perf_counter()
                runs[v]()
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times[v].append(elapsed)
    return times


def idle_hook_call_ns(n: int = 200_000) -> float:
    hp, x = HookPoint("batch pos d_model"), torch.zeros(1)
    start = time.perf_counter()
    for _ in range(n):
        hp(x)
    return (time.perf_counter() - start) / n * 1e9


def idle_calls_per_forward(model, ids: torch.Tensor) -> int:
    """How many hook-point calls an idle forward makes (some streams skip their hook when idle)."""
    calls = 0
    original = HookPoint.__call__

    def counting(self, x):
        nonlocal calls
        calls += 1
        return original(self, x)

    HookPoint.__call__ = counting
    try:
        with torch.no_grad():
            model(ids[:, :2])
    finally:
        HookPoint.__call__ = original
    return calls


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config and inputs (smoke test)")
    parser.add_argument("--preset", default="pythia-160m", choices=sorted(neox_lab.PRESETS))
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (5; quick: 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--shapes", default=None, help="comma-separated BATCHxPOS (default 1x512,4x128)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--order", choices=("interleaved", "blocked"), default="interleaved",
                        help="interleave the variants run by run (default) or run each one's calls back to back")
    parser.add_argument("--memory", choices=("subprocess", "inprocess", "off"), default=None,
                        help="how to measure peak memory (default subprocess; quick: inprocess)")
    for hidden in ("--_memory-child", "--_ckpt", "--_shape"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_child:
        return _memory_child(args)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _bench(args)
    finally:
        torch.set_num_threads(threads)


def _bench(args) -> int:
    cfg = quick_config() if args.quick else neox_lab.PRESETS[args.preset]
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    repeats = args.repeats or (2 if args.quick else 5)
    memory = args.memory or ("inprocess" if args.quick else "subprocess")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, "
          f"{'quick config' if args.quick else args.preset}: {cfg.num_hidden_layers} layers, "
          f"d_model {cfg.hidden_size}, {cfg.num_attention_heads} heads, vocab {cfg.vocab_size}; "
          f"min/median of {repeats} after {args.warmup} warm-up, {args.order}; memory: {memory}; load average "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        make_checkpoint(cfg, directory)
        models = {"hf_eager": load("hf_eager", directory), "neox": load("neox", directory)}
        gen = torch.Generator().manual_seed(0)
        for batch, pos in shapes:
            ids = torch.randint(0, cfg.vocab_size, (batch, pos), generator=gen)
            with torch.no_grad():
                diff = (models["neox"](ids).logits - models["hf_eager"](ids).logits).abs().max().item()
            times = time_variants(models, ids, args.warmup, repeats, collect=not args.quick,
                                  blocked=args.order == "blocked")
            best = {v: min(t) for v, t in times.items()}
            for v in VARIANTS:
                mem = {"peak_mb": float("nan"), "cache_mb": float("nan")}
                if memory == "subprocess":
                    mem = memory_in_subprocess(v, directory, (batch, pos), args.threads)
                elif memory == "inprocess":
                    mem = measure_memory(v, models["hf_eager" if v == "hf_eager" else "neox"], ids)
                rows.append((f"{batch}x{pos}", v, best[v] * 1e3, statistics.median(times[v]) * 1e3,
                             best[v] / best["hf_eager"], best[v] / best["idle"], mem["peak_mb"],
                             mem["cache_mb"]))
            print(f"{batch}x{pos}: max |logits neox - hf| = {diff:.2e}")
        per_call = idle_hook_call_ns()
        calls = idle_calls_per_forward(models["neox"], ids)

    header = ("shape", "variant", "min ms", "median ms", "vs hf_eager", "vs idle", "peak MB", "cache MB")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for shape, v, ms, median, vs_hf, vs_idle, peak, cache in rows:
        print(f"| {shape} | {v} | {ms:.1f} | {median:.1f} | {vs_hf:.3f} | {vs_idle:.3f} | {peak:.1f} "
              f"| {cache:.1f} |")
    print()
    for shape, v, ms, *_ in rows:
        if v == "idle":
            cost = per_call * calls / 1e6
            print(f"{shape}: idle hook points: {calls} calls x {per_call:.0f} ns = {cost:.3f} ms "
                  f"= {100 * cost / ms:.3f}% of the idle forward")
    for shape, v, _ms, _median, _vs_hf, vs_idle, *_ in rows:
        if v == "cache_all":
            verdict = "meets" if vs_idle <= CACHE_ALL_GOAL else "misses"
            print(f"{shape}: run_with_cache() / idle forward = {vs_idle:.3f} (min), {verdict} the goal "
                  f"<= {CACHE_ALL_GOAL}")
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
