"""Read throughput of `ActivationStream` on a large store, against reading the raw shard files.

    python experiments/bench_stream.py --gb 2            # builds a ~2 GB store under --tmp, deletes it
    python experiments/bench_stream.py --gb 0.05 --quick

The store is made by `cache_dataset` from random token ids with a 1-layer random model, caching
`hook_embed` (d_model --width, fp16), so building it costs little beyond writing the bytes. Then, with
the files in the page cache (a warm-up pass reads them once; this machine cannot drop caches):

  raw files          every shard file read start to end into memory (`f.readinto`), the floor
  safetensors load   every shard loaded whole with `safetensors.torch.load_file`
  stream, ordered    `store.stream(hook, shuffle=False)`: chunks read (preadv) straight into batches
  stream, shuffled   `store.stream(hook)`: the same plus the bounded shuffle buffer (default 65536 tokens)

GB/s counts the hook's bytes (what a training loop consumes); tokens/s its rows. The store is opened
with check="sizes" for the timed passes, as the shards were hashed on the first (lazy) read.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.store.reader import ActivationStore
from neox_lab.store.writer import cache_dataset


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_raw(paths) -> None:
    for path in paths:
        buf = bytearray(path.stat().st_size)
        with open(path, "rb", buffering=0) as fh:
            fh.readinto(buf)


def consume(stream) -> int:
    n = 0
    for batch in stream:
        n += len(next(iter(batch.values())))
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.0, help="size of the hook's data in the store")
    p.add_argument("--width", type=int, default=768, help="d_model (bytes per token = 2 x width)")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per stream batch")
    p.add_argument("--buffer-tokens", type=int, default=1 << 16)
    p.add_argument("--tmp", default=tempfile.gettempdir())
    p.add_argument("--quick", action="store_true", help="one timed pass each instead of two")
    args = p.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="neox_lab_stream_", dir=args.tmp))
    try:
        cfg = NeoXConfig(vocab_size=1024, hidden_size=args.width, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=4 * args.width, max_position_embeddings=1024)
        torch.manual_seed(0)
        model = NeoXForCausalLM(cfg).eval()
        seq = 1024
        n_docs = max(1, int(args.gb * 1e9 / (2 * args.width * seq)))
        ids = torch.randint(0, cfg.vocab_size, (n_docs, seq), generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        cache_dataset(model, ids, ["hook_embed"], folder / "store", context_size=seq, batch_size=16,
                      shard_tokens=1 << 16, progress=False)
        build_s = time.perf_counter() - t0
        store = ActivationStore(folder / "store", check="sizes")
        paths = [store.dir / s["file"] for s in store.shards]
        file_bytes = sum(s["bytes"] for s in store.shards)
        hook_bytes, n_tokens = len(store) * 2 * args.width, len(store)
        read_raw(paths)  # warm the page cache
        passes = 1 if args.quick else 2
        rows = {
            "raw files": lambda: read_raw(paths),
            "safetensors load": lambda: [safetensors.torch.load_file(str(p)) for p in paths],
            "stream, ordered": lambda: consume(store.stream("hook_embed", batch_size=args.batch_size,
                                                            buffer_tokens=args.buffer_tokens, shuffle=False,
                                                            drop_last=False)),
            "stream, shuffled": lambda: consume(store.stream("hook_embed", batch_size=args.batch_size,
                                                             buffer_tokens=args.buffer_tokens, drop_last=False)),
        }
        print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; store: "
              f"{n_tokens:,} tokens x {args.width} fp16 = {hook_bytes / 1e9:.2f} GB of hook data "
              f"({file_bytes / 1e9:.2f} GB of files, {len(paths)} shards, built in {build_s:.0f} s)")
        print("| read | seconds | GB/s (hook bytes; raw: file bytes) | tokens/s | vs raw files |")
        print("|---|---|---|---|---|")
        raw_s = None
        for name, fn in rows.items():
            seconds = min(timed(fn) for _ in range(passes))
            raw_s = raw_s or seconds
            volume = file_bytes if name == "raw files" else hook_bytes
            print(f"| {name} | {seconds:.2f} | {volume / seconds / 1e9:.2f} | {n_tokens / seconds:,.0f} "
                  f"| {raw_s / seconds:.2f}x |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
