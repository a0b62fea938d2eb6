"""Resident memory while `cache_dataset` streams a large text corpus: it must not grow with the corpus.

    python experiments/bench_corpus_memory.py --gb 1 --kind txt        # writes ~1 GB under --tmp, deletes it
    python experiments/bench_corpus_memory.py --gb 0.05 --kind jsonl.zst

Writes a corpus of random English words (a document per line, ~1 KB each) of --gb gigabytes as .txt,
.jsonl.zst or Parquet, then caches it with a tiny random model (2 layers, d_model 64, `hook_embed`)
reading only every --every-k-th document, so that the run is dominated by reading the source: the
fingerprint pass reads all of it, the caching pass reads all of it again and tokenizes / runs / writes
the sampled documents. A thread samples the process's RSS (/proc/self/status VmRSS) every 50 ms.

Prints RSS before the run, its peak, and its value after each tenth of the source's documents: flat
means streaming works; before streaming sources, a .txt was read whole into a list (>= its size).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.store.writer import cache_dataset
from neox_lab.tokenizer import NeoXTokenizer

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has "
         "had not but first one their its new after who they have two been other when there all during into "
         "school time may years more most only over city some world would where later up such used").split()


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_corpus(folder: Path, kind: str, n_bytes: int) -> tuple[Path, int]:
    """Documents of ~1 KB of random words until the file holds `n_bytes` of text (before compression)."""
    rng = np.random.default_rng(0)
    pool = [" ".join(rng.choice(WORDS, size=180)) for _ in range(512)]  # ~1 KB each, reused with a counter
    n_docs = n_bytes // (len(pool[0]) + 8)
    if kind == "txt":
        path = folder / "corpus.txt"
        with open(path, "w", encoding="utf-8") as fh:
            for i in range(n_docs):
                fh.write(f"{i} {pool[i % len(pool)]}\n")
    elif kind == "jsonl.zst":
        import zstandard

        path = folder / "corpus.jsonl.zst"
        with open(path, "wb") as raw, zstandard.ZstdCompressor(level=1).stream_writer(raw) as fh:
            for i in range(n_docs):
                fh.write((json.dumps({"text": f"{i} {pool[i % len(pool)]}"}) + "\n").encode())
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "corpus.parquet"
        schema = pa.schema([("text", pa.string())])
        with pq.ParquetWriter(path, schema) as writer:
            for a in range(0, n_docs, 50_000):
                writer.write_table(pa.table({"text": [f"{i} {pool[i % len(pool)]}"
                                                      for i in range(a, min(a + 50_000, n_docs))]}, schema=schema))
    else:
        raise SystemExit(f"unknown --kind {kind!r}")
    return path, n_docs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="gigabytes of text in the corpus")
    p.add_argument("--kind", default="txt", choices=["txt", "jsonl.zst", "parquet"])
    p.add_argument("--every-k", type=int, default=200, help="cache every k-th document")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the corpus and the store go")
    args = p.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="neox_lab_rss_", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        path, n_docs = write_corpus(folder, args.kind, int(args.gb * 1e9))
        print(f"corpus: {path.name}, {n_docs:,} documents, {path.stat().st_size / 1e9:.2f} GB on disk, "
              f"written in {time.perf_counter() - t0:.0f} s")
        cfg = NeoXConfig(vocab_size=50304, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=256)
        torch.manual_seed(0)
        model = NeoXForCausalLM(cfg).eval()
        model.tokenizer = NeoXTokenizer.default()
        samples, done = [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append((time.perf_counter(), rss_mib()))
                time.sleep(0.05)

        base = rss_mib()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        store = cache_dataset(model, path, ["hook_embed"], folder / "store", context_size=128, batch_size=32,
                              every_k_documents=args.every_k, progress=False)
        elapsed = time.perf_counter() - t0
        done.set()
        sampler.join()
        rss = np.array([r for _, r in samples])
        times = np.array([t for t, _ in samples]) - t0
        print(f"cached {len(store):,} tokens of {store.n_documents:,} documents (every {args.every_k}th) in "
              f"{elapsed:.0f} s; store {sum(s['bytes'] for s in store.shards) / 1e6:.0f} MB")
        print(f"RSS before the run {base:.0f} MiB; peak {rss.max():.0f} MiB (+{rss.max() - base:.0f}); "
              f"source text {int(args.gb * 1e9) / 2**20:.0f} MiB")
        tenths = [float(rss[min(int(len(rss) * q / 10), len(rss) - 1)]) for q in range(1, 11)]
        print("RSS at each tenth of the run (MiB): " + " ".join(f"{r:.0f}" for r in tenths))
        half = rss[len(rss) // 2 :]
        print(f"second half of the run: min {half.min():.0f}, max {half.max():.0f} MiB "
              f"(growth over it {rss[-1] - rss[len(rss) // 2]:+.0f} MiB); {len(rss)} samples over {times[-1]:.0f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
