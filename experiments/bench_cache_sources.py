"""Tokens/s of `cache_dataset` from text files on disk (.txt, Parquet, .jsonl.zst) against plain forwards
to the same layer on the same batches.

    python experiments/bench_cache_sources.py            # 48 documents x 128 tokens per source
    python experiments/bench_cache_sources.py --quick    # 8 documents

Model: the pythia-160m shape (`neox_lab.PRESETS["pythia-160m"]`) with random weights, fp32, the
GPT-NeoX-20B tokenizer. Documents: random English words, long enough that each one's first --seq tokens
fill a window (so no batch is padded). Cached: every residual stream (`blocks.*.hook_resid_post`), fp16.

  forward   the documents tokenized beforehand, `model(ids, stop_at_layer=n_layers)` under no_grad:
            all that caching the last block's output needs (cache_dataset stops there as well)
  cache     the whole job from the file: read + fingerprint the source, tokenize (background thread),
            forward with hooks, fp16 copies, shards + sha256 + fsync (background thread)

ratio = cache tokens/s / forward tokens/s (goal >= 0.95). The forward is timed before and after each
source's run and averaged, which evens out a machine whose load drifts.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from neox_lab import PRESETS, NeoXForCausalLM
from neox_lab.store.writer import cache_dataset
from neox_lab.tokenizer import NeoXTokenizer

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has "
         "had not but first one their its new after who they have two been other when there all during into "
         "school time may years more most only over city some world would where later up such used many can "
         "state about national out known university united then made").split()


def write_source(kind: str, texts: list[str], folder: Path) -> Path:
    if kind == "txt":
        path = folder / "docs.txt"
        path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "docs.parquet"
        pq.write_table(pa.table({"text": texts}), path, row_group_size=16)
    elif kind == "jsonl.zst":
        import zstandard

        path = folder / "docs.jsonl.zst"
        body = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
        path.write_bytes(zstandard.ZstdCompressor().compress(body))
    else:
        raise SystemExit(f"unknown source kind {kind!r}")
    return path


def timed_forwards(model, batches, stop_at_layer) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for ids in batches:
            model(ids, attention_mask=torch.ones_like(ids), stop_at_layer=stop_at_layer)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 documents instead of 48")
    p.add_argument("--docs", type=int, default=None)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sources", nargs="+", default=["txt", "parquet", "jsonl.zst"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    n_docs = args.docs or (8 if args.quick else 48)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = PRESETS["pythia-160m"]
    torch.manual_seed(0)
    model = NeoXForCausalLM(cfg).eval()
    model.tokenizer = NeoXTokenizer.default()
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, size=2 * args.seq)) for _ in range(n_docs)]
    ids = model.tokenizer(texts, truncation=True, max_length=args.seq)["input_ids"]
    assert all(len(row) == args.seq for row in ids), "a document is shorter than --seq tokens"
    batches = list(torch.tensor(ids).split(args.batch_size))
    n_tokens, stop = n_docs * args.seq, cfg.num_hidden_layers
    timed_forwards(model, batches[:1], stop)  # warm-up: allocator, kernels

    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
               "torch": torch.__version__, "model": "pythia-160m shape, random weights, fp32",
               "documents": n_docs, "tokens": n_tokens, "batch_size": args.batch_size, "sources": {}}
    for kind in args.sources:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_source(kind, texts, Path(tmp))
            before = timed_forwards(model, batches, stop)
            start = time.perf_counter()
            store = cache_dataset(model, path, "blocks.*.hook_resid_post", Path(tmp) / "store", context_size=args.seq,
                                  batch_size=args.batch_size, dtype=torch.float16, progress=False)
            cache_s = time.perf_counter() - start
            after = timed_forwards(model, batches, stop)
            assert len(store) == n_tokens
            n_bytes = sum(s["bytes"] for s in store.shards)
        forward_s = (before + after) / 2
        results["sources"][kind] = {
            "cache_s": round(cache_s, 3), "forward_s": [round(before, 3), round(after, 3)],
            "cache_tokens_per_s": round(n_tokens / cache_s, 1), "forward_tokens_per_s": round(n_tokens / forward_s, 1),
            "ratio": round(forward_s / cache_s, 3), "bytes_per_token": round(n_bytes / n_tokens, 1),
        }
    print(f"{results['machine']}; {results['model']}; {n_docs} documents x {args.seq} tokens, batch {args.batch_size}")
    print("| source | cache tok/s | forward tok/s | ratio (goal >= 0.95) | bytes/token |")
    print("|---|---|---|---|---|")
    for kind, r in results["sources"].items():
        print(f"| {kind} | {r['cache_tokens_per_s']:,.0f} | {r['forward_tokens_per_s']:,.0f} | {r['ratio']:.3f} "
              f"| {r['bytes_per_token']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
