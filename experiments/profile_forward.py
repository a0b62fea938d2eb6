"""Profile: where a forward's GPU time goes, neox_lab against transformers, same weights (torch.profiler).

Prints, per model, the top CUDA kernels by total device time over --steps forwards (after warm-up),
their share of the total, and the number of kernel launches per forward. This is the evidence behind
the speed goals of `bench_forward.py`: which kernels dominate, and where neox_lab and transformers differ.

    python experiments/profile_forward.py                        # pythia-410m shape, fp16, 8 x 2048, CUDA
    python experiments/profile_forward.py --device cpu --quick   # tiny shapes (smoke test)
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import DTYPES, QUICK_CFG, build_models  # noqa: E402

from neox_lab import PRESETS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--preset", default="pythia-410m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--backend", default="flash")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=14)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps = 2, 32, 2
    if args.device == "cpu":
        args.dtype, args.backend = "fp32", "sdpa"
    return args


def kernel_table(prof, steps: int, top: int, cuda: bool) -> str:
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for evt in prof.events():
        if cuda and evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and (evt.cpu_parent is not None or evt.name.startswith("ProfilerStep")):
            continue
        t = evt.device_time if cuda else evt.cpu_time
        totals[evt.name] += t
        counts[evt.name] += 1
    total = sum(totals.values())
    launches = sum(counts.values()) / steps
    lines = [f"  device time per forward {total / steps / 1e3:.2f} ms, {launches:.0f} kernels per forward",
             "  | ms/fwd | % | calls/fwd | kernel |", "  |---|---|---|---|"]
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  | {t / steps / 1e3:.3f} | {100 * t / total:.1f} | {counts[name] / steps:.0f} | {name[:110]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --quick")
        return 2
    cfg = QUICK_CFG if args.quick else PRESETS[args.preset]
    hf, nx = build_models(cfg, DTYPES[args.dtype], args.device)
    nx.set_attn_backend(args.backend)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    runs = {"transformers sdpa": lambda: hf(ids, use_cache=False), f"neox_lab {args.backend}": lambda: nx(ids)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    print(f"{args.preset if not args.quick else 'quick'} {args.dtype} {args.batch} x {args.seq} on {args.device}")
    for name, fn in runs.items():
        with torch.inference_mode():
            for _ in range(2):
                fn()
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(args.steps):
                    fn()
                if cuda:
                    torch.cuda.synchronize()
        print(f"== {name}")
        print(kernel_table(prof, args.steps, args.top, cuda), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
