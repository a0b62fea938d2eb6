"""Time batched activation patching against the one-forward-per-cell loop on a small random model (CPU).

    python experiments/bench_patching.py            # 4 layers, d_model 128, 8 heads, 16 positions
    python experiments/bench_patching.py --quick    # smoke test, a few seconds

Both paths must give the same grid (checked to 1e-5); the speedup is loop time / batched time, best of
`--repeats`. Tiny per-cell forwards are dominated by per-call overhead, which batching amortises; the
gain shrinks as the model (and so each forward's arithmetic) grows.
"""

from __future__ import annotations

import argparse
import time

import torch

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.analysis.patching import activation_patch, logit_diff


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and grid: a smoke test")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="prompt pairs per patched run")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batched forward")
    parser.add_argument("--targets", default="resid_pre,z", help="comma-separated patching targets")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.d_model, args.heads, args.seq, args.repeats = 2, 32, 4, 6, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = NeoXConfig(vocab_size=512, hidden_size=args.d_model, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, intermediate_size=4 * args.d_model,
                     max_position_embeddings=max(64, args.seq))
    torch.manual_seed(0)
    model = NeoXForCausalLM(cfg, attn_backend="sdpa").eval()
    clean = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    corrupted = clean.clone()
    corrupted[:, args.seq // 2] = (corrupted[:, args.seq // 2] + 1) % cfg.vocab_size
    metric = logit_diff(1, 2)
    print(f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, {args.seq} positions, "
          f"batch {args.batch}, batch_size {args.batch_size}, {torch.get_num_threads()} thread(s), CPU")

    for target in args.targets.split(","):
        run = lambda batched: activation_patch(model, clean, corrupted, metric, target,  # noqa: B023
                                               batched=batched, batch_size=args.batch_size)
        run(True)  # warm-up
        t_fast, fast = best_time(lambda: run(True), args.repeats)  # noqa: B023
        t_slow, slow = best_time(lambda: run(False), args.repeats)  # noqa: B023
        diff = float((fast.values - slow.values).abs().max())
        if diff > 1e-5:
            raise SystemExit(f"{target}: batched and one-at-a-time disagree by {diff:.3g}")
        cells = fast.values.numel()
        print(f"{target:>10}: {cells:4d} cells  one-at-a-time {t_slow:7.3f}s  batched {t_fast:7.3f}s  "
              f"speedup {t_slow / t_fast:5.1f}x  (max |diff| {diff:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
