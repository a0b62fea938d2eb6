"""Benchmark: `run_with_cache()` of every stream (TransformerLens' default call) against a plain forward.

Pythia-160m shape (12 layers, d_model 768, 12 heads, vocab 50304), random weights, fp32, CPU, under
torch.no_grad, batches 1 x 512, 1 x 1024 and 4 x 128 by default:

    hf_sdpa         transformers GPTNeoXForCausalLM, attn_implementation="sdpa" (same weights)
    forward         neox_lab's default forward (attn_backend "auto": sdpa on CPU)
    cache_all       neox_lab run_with_cache(): every hook point but hook_result, the attention scores
                    and pattern included (so every layer runs the eager kernel for this call: without
                    autograd its products go by causal blocks, see model/kernels.py)
    cache_all_eager the same on the "eager" backend (every layer's output from the materialised pattern)
    tl_forward      TransformerLens HookedTransformer forward on the same weights, processed as its
                    from_pretrained does (fold_ln, centring); only where transformer_lens imports
    tl_cache_all    TransformerLens run_with_cache()

Time: minimum (and median) of --repeats timed calls after --warmup, the variants interleaved call by call
so a neighbour's load hits them all alike; the minimum is the estimate on a shared machine (other
processes only add time). The load average is printed before and after. Ratios use the minimum.
`--clock cpu` times the process's CPU time (user + system, page faults included) instead of the wall
clock: on a machine whose cores other jobs keep busy, a wall-clock call also counts the time it waited
for a core, which the CPU clock leaves out (with --threads 1 it then measures the work alone).

Values: for each shape the script also prints the largest difference of cache_all's logits from the plain
forward's and of its scores/pattern from the eager backend's dense, differentiable kernel (fp32 rounding).

    /work/venv_tl/bin/python experiments/bench_cache_all.py     # with TransformerLens (its venv)
    python experiments/bench_cache_all.py --quick                # tiny sizes, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch

import neox_lab
from neox_lab import NeoXConfig, NeoXForCausalLM

#: Issue 22's goal: run_with_cache() of every stream costs at most this many plain forwards (1x512, 1x1024).
GOAL = 1.15
GOAL_SHAPES = ("1x512", "1x1024")
FULL_SHAPES = ((1, 512), (1, 1024), (4, 128))
QUICK_SHAPES = ((1, 16),)
EAGER_ONLY = ("hook_attn_scores", "hook_pattern")


def quick_config() -> NeoXConfig:
    return NeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64)


def load_models(cfg: NeoXConfig, directory: str) -> dict:
    """Every library's model on one random checkpoint saved in `directory`."""
    import transformers

    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**cfg.to_hf())).save_pretrained(directory)
    models = {
        "hf_sdpa": transformers.GPTNeoXForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval(),
        "neox": NeoXForCausalLM.from_pretrained(directory).eval(),
        "neox_eager": NeoXForCausalLM.from_pretrained(directory, attn_backend="eager").eval(),
    }
    tl = transformer_lens_model(cfg, models["hf_sdpa"])
    if tl is not None:
        models["tl"] = tl
    return models


def transformer_lens_model(cfg: NeoXConfig, hf):
    """A HookedTransformer on `hf`'s weights, configured and processed as its loader does for a
    GPTNeoXForCausalLM (built offline: its from_pretrained needs the hub); None without TransformerLens."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained.weight_conversions.neox import convert_neox_weights
    except ImportError:
        return None
    tcfg = HookedTransformerConfig(
        d_model=cfg.hidden_size, d_head=cfg.head_dim, n_heads=cfg.num_attention_heads, d_mlp=cfg.intermediate_size,
        n_layers=cfg.num_hidden_layers, n_ctx=cfg.max_position_embeddings, eps=cfg.layer_norm_eps,
        d_vocab=cfg.vocab_size, act_fn=cfg.hidden_act, use_attn_scale=True, parallel_attn_mlp=cfg.use_parallel_residual,
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, normalization_type="LN",
        default_prepend_bos=False, rotary_dim=cfg.rotary_dim, rotary_base=cfg.rotary_emb_base,
        original_architecture="GPTNeoXForCausalLM", dtype=torch.float32, device="cpu")
    model = HookedTransformer(tcfg)
    model.load_and_process_state_dict(convert_neox_weights(hf, tcfg), fold_ln=True, center_writing_weights=True,
                                      center_unembed=True, fold_value_biases=True)
    return model.eval()


def runners(models: dict, ids: torch.Tensor) -> dict:
    """Zero-argument callables, one per variant."""
    neox, eager = models["neox"], models["neox_eager"]
    out = {
        "hf_sdpa": lambda: models["hf_sdpa"](ids),
        "forward": lambda: neox(ids),
        "cache_all": lambda: neox.run_with_cache(ids),
        "cache_all_eager": lambda: eager.run_with_cache(ids),
    }
    if "tl" in models:
        out["tl_forward"] = lambda: models["tl"](ids)
        out["tl_cache_all"] = lambda: models["tl"].run_with_cache(ids)
    return out


def time_variants(runs: dict, warmup: int, repeats: int, clock=time.perf_counter) -> dict[str, list[float]]:
    names = list(runs)
    times: dict[str, list[float]] = {v: [] for v in names}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for v in names[i % len(names):] + names[: i % len(names)]:  # rotate who goes first
                gc.collect()
                start = clock()
                runs[v]()
                elapsed = clock() - start
                if i >= warmup:
                    times[v].append(elapsed)
    return times


def check_values(models: dict, ids: torch.Tensor) -> tuple[float, float, list]:
    """(max |cache_all logits - plain forward's|, max |scores/pattern - the eager kernel's dense form|,
    kernels that ran). The reference runs with autograd on (the dense, differentiable form)."""
    with torch.no_grad():
        plain = models["neox"](ids).logits
        logits, cache = models["neox"].run_with_cache(ids)
        kernels = models["neox"].attn_kernels()
    eager, ref = models["neox_eager"], {}
    keep = [(n, lambda t, hook: ref.__setitem__(hook.name, t.detach())) for n in eager.hook_names()
            if n.endswith(EAGER_ONLY)]
    with torch.enable_grad(), eager.hooks(keep):  # run_with_cache would turn autograd off
        eager(ids)
    worst = 0.0
    for name, want in ref.items():
        got, finite = cache[name], torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got)), name
        worst = max(worst, float((got[finite] - want[finite]).abs().max()))
    return float((logits - plain).abs().max()), worst, sorted(set(kernels))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config and input (smoke test)")
    parser.add_argument("--preset", default="pythia-160m", choices=sorted(neox_lab.PRESETS))
    parser.add_argument("--shapes", default=None, help="comma-separated BATCHxPOS (default 1x512,1x1024,4x128)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (7; quick: 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock (default) or this process's CPU time (see the module docstring)")
    args = parser.parse_args(argv)
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
    repeats = args.repeats or (1 if args.quick else 7)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, "
          f"{'quick config' if args.quick else args.preset}; min/median of {repeats} after {args.warmup} warm-up, "
          f"interleaved, {args.clock} clock; load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        models = load_models(cfg, directory)
        if "tl" not in models:
            print("transformer_lens not importable here: no TransformerLens rows (run under its venv)")
        gen = torch.Generator().manual_seed(0)
        for batch, pos in shapes:
            shape = f"{batch}x{pos}"
            ids = torch.randint(0, cfg.vocab_size, (batch, pos), generator=gen)
            logits_diff, worst, kernels = check_values(models, ids)
            print(f"{shape}: max |cache_all logits - forward's| = {logits_diff:.2e}; max |scores/pattern - "
                  f"eager's| = {worst:.2e}; kernels: {kernels}")
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            times = time_variants(runners(models, ids), args.warmup, repeats, clock)
            best = {v: min(t) for v, t in times.items()}
            for v, t in times.items():
                tl_ref = best.get("tl_cache_all")
                rows.append((shape, v, best[v] * 1e3, statistics.median(t) * 1e3, best[v] / best["forward"],
                             best[v] / best["hf_sdpa"], best[v] / tl_ref if tl_ref else float("nan")))
    header = ("shape", "variant", "min ms", "median ms", "vs forward", "vs hf_sdpa", "vs tl_cache_all")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for shape, v, ms, median, vs_fwd, vs_hf, vs_tl in rows:
        print(f"| {shape} | {v} | {ms:.1f} | {median:.1f} | {vs_fwd:.3f} | {vs_hf:.3f} | {vs_tl:.3f} |")
    print()
    for shape, v, _ms, _median, vs_fwd, *_ in rows:
        if v == "cache_all" and (args.quick or shape in GOAL_SHAPES):
            verdict = "meets" if vs_fwd <= GOAL else "misses"
            print(f"{shape}: run_with_cache() / forward = {vs_fwd:.3f} (min), {verdict} the goal <= {GOAL}")
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
