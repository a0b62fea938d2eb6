"""Throughput of `cache_dataset` against the plain forward it wraps, and where the difference goes.

    python experiments/bench_cache_dataset.py              # 128 text documents of ~128 tokens, 3 rounds
    python experiments/bench_cache_dataset.py --quick      # 16 documents, 2 rounds

Model: the pythia-160m shape (`neox_lab.PRESETS["pythia-160m"]`) with random weights, fp32, attention
backend "auto". Cached: every residual stream (`blocks.*.hook_resid_post`, 12 x d_model 768), fp16 on
disk, all positions. Documents are texts of random words tokenized by the shipped GPT-NeoX tokenizer in
cache_dataset's background thread (`--ids` hands it token ids instead), cut to --seq tokens, in batches
of --batch-size. The reference is the same forward over the same padded batches, stopped after the last
cached layer (`stop_at_layer=12`, as cache_dataset runs it): the goal is cache_dataset >= 0.95x its
throughput.

The machine may be shared with other jobs: every round times each pass once, interleaved, and the
minimum over rounds is reported (the least disturbed run of each), with the load average around the
run. Besides wall time, each pass's process CPU time (all threads) is reported: it does not depend on
how the scheduler shares the cores, so its ratio is the work cache_dataset adds.

Where the time goes (each measured alone in every round, minimum reported, as a share of the forward):

  weights fingerprint   sha256 of every weight byte, once per run (the store's identity)
  hooked forward        run_with_cache of the 12 hooks, cast to fp16, flattened to [token d_model]
                        (the host copies), minus the plain forward
  shard hash            sha256 of one shard of the run's bytes, taken batch by batch in the writer thread
  shard write           that shard written in safetensors' layout and fsynced; for the last shard of a
                        run this is the one part that cannot overlap a forward
  tokenize              the tokenizer over the documents (runs in a background thread)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from neox_lab import PRESETS, NeoXForCausalLM
from neox_lab.store import shards
from neox_lab.store.manifest import weights_sha256
from neox_lab.store.sources import pad_right
from neox_lab.store.writer import cache_dataset
from neox_lab.tokenizer import NeoXTokenizer

WORDS = ("the of and to in is that for it as with was on be by at this from or an are not have which one "
         "def return import class self if else for while None True False value data model layer token "
         "attention head residual stream cache store shard").split()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 documents and 2 rounds")
    parser.add_argument("--docs", type=int, default=None, help="documents (default 128, --quick 16)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per document (window)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, --quick 2)")
    parser.add_argument("--ids", action="store_true", help="hand cache_dataset token ids, not texts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    n_docs = args.docs or (16 if args.quick else 128)
    rounds = args.rounds or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = PRESETS["pythia-160m"]
    torch.manual_seed(0)
    model = NeoXForCausalLM(cfg).eval()
    tokenizer = NeoXTokenizer.default()
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, size=int(args.seq * 1.5))) for _ in range(n_docs)]
    rows = tokenizer(texts, truncation=True, max_length=args.seq)["input_ids"]
    source = rows if args.ids else texts
    batches = [pad_right(rows[a : a + args.batch_size]) for a in range(0, n_docs, args.batch_size)]
    n_tokens = sum(map(len, rows))
    names = [f"blocks.{i}.hook_resid_post" for i in range(cfg.num_hidden_layers)]
    stop = cfg.num_hidden_layers

    def forward():
        with torch.no_grad():
            for ids, mask in batches:
                model(ids, attention_mask=mask, stop_at_layer=stop)

    def hooked():
        for ids, mask in batches:
            _, acts = model.run_with_cache(ids, attention_mask=mask, names_filter=names, device="cpu",
                                           dtype=torch.float16, stop_at_layer=stop)
            keep = mask.bool()
            for name in names:
                acts[name][keep].contiguous()

    def cache():
        with tempfile.TemporaryDirectory() as out:
            store = cache_dataset(model, source, "blocks.*.hook_resid_post", out, batch_size=args.batch_size,
                                  max_length=args.seq, dtype=torch.float16, tokenizer=tokenizer, progress=False)
            assert len(store) == n_tokens

    shard = {name: [torch.randn(n_tokens, cfg.hidden_size).half()] for name in names}
    shard.update({meta: [torch.zeros(n_tokens, dtype=torch.long)] for meta in ("token_ids", "doc_ids", "positions")})
    n_bytes = sum(t[0].numel() * t[0].element_size() for t in shard.values())

    def shard_hash():  # ShardWriter.add hashes each part as it arrives, in the writer thread
        return {name: hashlib.sha256(memoryview(parts[0].reshape(-1).view(torch.uint8).numpy())).digest()
                for name, parts in shard.items()}

    digests = shard_hash()

    def write():
        with tempfile.TemporaryDirectory() as out:
            shards.write_shard_file(Path(out) / "shard.safetensors", shard, {"format": "pt"}, digests)

    passes = {"forward": forward, "cache_dataset": cache, "weights fingerprint": lambda: weights_sha256(model),
              "hooked forward": hooked, "shard hash": shard_hash, "shard write": write,
              "tokenize": lambda: tokenizer(texts, truncation=True, max_length=args.seq)}
    forward()  # warm-up: allocator, kernels
    load_before = os.getloadavg()
    times: dict[str, list] = {name: [] for name in passes}
    for _ in range(rounds):
        for name, fn in passes.items():
            times[name].append(timed(fn))
    load_after = os.getloadavg()
    wall = {name: min(t[0] for t in v) for name, v in times.items()}
    cpu = {name: min(t[1] for t in v) for name, v in times.items()}

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch threads",
        "load_average_before_after": [round(x, 2) for x in (*load_before[:1], *load_after[:1])],
        "torch": torch.__version__, "model": "pythia-160m shape, random weights, fp32",
        "source": "token ids" if args.ids else "texts (tokenized in cache_dataset's thread)",
        "documents": n_docs, "tokens": n_tokens, "batch_size": args.batch_size, "rounds": rounds,
        "hooks": len(names), "bytes_written": n_bytes,
        "forward_s": round(wall["forward"], 3), "cache_s": round(wall["cache_dataset"], 3),
        "cache_tokens_per_s": round(n_tokens / wall["cache_dataset"], 1),
        "forward_tokens_per_s": round(n_tokens / wall["forward"], 1),
        "throughput_ratio": round(wall["forward"] / wall["cache_dataset"], 3),
        "cpu_forward_s": round(cpu["forward"], 3), "cpu_cache_s": round(cpu["cache_dataset"], 3),
        "cpu_ratio": round(cpu["forward"] / cpu["cache_dataset"], 3),
    }
    share = lambda s: f"{s:.3f} s ({100 * s / wall['forward']:.1f}% of the forward)"  # noqa: E731
    results["where: weights fingerprint"] = share(wall["weights fingerprint"])
    results["where: hooked forward - forward"] = share(wall["hooked forward"] - wall["forward"])
    results["where: shard hash (writer thread)"] = share(wall["shard hash"])
    results["where: shard write + fsync (at the end)"] = share(wall["shard write"])
    results["where: tokenize"] = share(wall["tokenize"]) if not args.ids else "n/a (--ids)"
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    print(f"\ncache_dataset runs at {results['throughput_ratio']:.3f}x the throughput of the forward stopped "
          f"after layer {stop} (goal >= 0.95x; min of {rounds} interleaved rounds, wall clock); "
          f"CPU-time ratio {results['cpu_ratio']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
