"""Throughput of `cache_dataset` on CPU, and its overhead over the plain forward passes it wraps.

    python experiments/bench_cache_dataset.py          # 64 documents x 128 tokens (minutes on 2 cores)
    python experiments/bench_cache_dataset.py --quick  # 16 documents x 128 tokens

Model: the pythia-160m shape (`neox_lab.PRESETS["pythia-160m"]`) with random weights, fp32, attention
backend "auto". Cached: every residual stream (`blocks.*.hook_resid_post`, 12 x d_model 768), fp16 on
disk, all positions. Documents are random token ids of exactly --seq tokens (no padding), in batches
of --batch-size. All passes run in this one process on the same batches:

  forward (full)  `model(ids, attention_mask=mask)`: every block, the final LayerNorm and the unembedding
  forward (body)  the same with `stop_at_layer=n_layers`: the blocks only, which is all that resid_post
                  caching needs (cache_dataset skips the final LayerNorm and unembedding the same way)
  cache_dataset   the whole job: tokens -> forward with hooks -> fp16 copies -> shards + sha256 + fsync

The overhead is reported against both forwards; the forwards are timed before and after the caching
run and averaged, which evens out a machine whose load drifts.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from neox_lab import PRESETS, NeoXForCausalLM
from neox_lab.store.writer import cache_dataset


def timed_forwards(model, batches, stop_at_layer) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for ids in batches:
            model(ids, attention_mask=torch.ones_like(ids), stop_at_layer=stop_at_layer)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 documents instead of 64")
    parser.add_argument("--docs", type=int, default=None)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    n_docs = args.docs or (16 if args.quick else 64)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = PRESETS["pythia-160m"]
    torch.manual_seed(0)
    model = NeoXForCausalLM(cfg).eval()
    docs = torch.randint(0, cfg.vocab_size, (n_docs, args.seq), generator=torch.Generator().manual_seed(1))
    batches = list(docs.split(args.batch_size))
    n_tokens = docs.numel()
    timed_forwards(model, batches[:1], None)  # warm-up: allocator, kernels

    full = [timed_forwards(model, batches, None)]
    body = [timed_forwards(model, batches, cfg.num_hidden_layers)]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        cache = cache_dataset(model, docs, "blocks.*.hook_resid_post", out, batch_size=args.batch_size,
                              max_length=args.seq, dtype=torch.float16, progress=False)
        cache_s = time.perf_counter() - start
        n_bytes = sum(s["bytes"] for s in cache.shards)
        assert len(cache) == n_tokens
    full.append(timed_forwards(model, batches, None))
    body.append(timed_forwards(model, batches, cfg.num_hidden_layers))
    full_s, body_s = sum(full) / 2, sum(body) / 2

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "model": "pythia-160m shape, random weights, fp32",
        "documents": n_docs, "tokens": n_tokens, "batch_size": args.batch_size,
        "hooks": len(cache.hook_names), "bytes_written": n_bytes,
        "forward_full_s": [round(t, 3) for t in full], "forward_body_s": [round(t, 3) for t in body],
        "cache_s": round(cache_s, 3),
        "cache_tokens_per_s": round(n_tokens / cache_s, 1),
        "cache_MiB_per_s": round(n_bytes / cache_s / 2**20, 2),
        "forward_full_tokens_per_s": round(n_tokens / full_s, 1),
        "forward_body_tokens_per_s": round(n_tokens / body_s, 1),
        "overhead_vs_full_forward": round(cache_s / full_s - 1, 4),
        "overhead_vs_body_forward": round(cache_s / body_s - 1, 4),
    }
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
