"""What the activation store's integrity checks cost: hashing shards on write, checking a store on open,
hashing each shard on its first read, and fingerprinting every weight byte at pythia-1.4b size.

    python experiments/bench_store_integrity.py                 # a 1 GiB store, pythia-1.4b fp16 weights
    python experiments/bench_store_integrity.py --store-gib 2 --weights-dtype float32
    python experiments/bench_store_integrity.py --quick          # seconds; for the smoke test

Every cost is printed next to the work it guards, measured in the same run: the shard hash against the
shard write (safetensors + fsync), the lazy first-read hash against a plain read of the same tokens.
Reads run from the page cache (the store was just written); on a cold disk the read itself is slower
and the hash's share smaller.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from neox_lab.dtypes import nonfinite_count
from neox_lab.store.manifest import FORMAT, VERSION, file_sha256, weights_sha256
from neox_lab.store.reader import ActivationStore
from neox_lab.store.shards import ShardWriter

# pythia-1.4b: 24 layers, d_model 2048, d_mlp 8192, vocab 50304 (untied embed/unembed): 1.41e9 parameters.
PYTHIA_1_4B = dict(n_layers=24, d_model=2048, d_mlp=8192, d_vocab=50304)


def pythia_shaped(n_layers: int, d_model: int, d_mlp: int, d_vocab: int, dtype: torch.dtype) -> nn.Module:
    """A module holding tensors of pythia's shapes (random values): what `weights_sha256` reads."""
    def t(*shape):
        return nn.Parameter(torch.empty(*shape, dtype=dtype).normal_(), requires_grad=False)

    root = nn.Module()
    root.embed, root.unembed = t(d_vocab, d_model), t(d_vocab, d_model)
    root.blocks = nn.ModuleList()
    for _ in range(n_layers):
        block = nn.Module()
        block.qkv, block.qkv_b = t(3 * d_model, d_model), t(3 * d_model)
        block.out, block.out_b = t(d_model, d_model), t(d_model)
        block.up, block.up_b = t(d_mlp, d_model), t(d_mlp)
        block.down, block.down_b = t(d_model, d_mlp), t(d_model)
        for ln in ("ln1_w", "ln1_b", "ln2_w", "ln2_b"):
            setattr(block, ln, t(d_model))
        root.blocks.append(block)
    return root


def first_values_sha256(model: nn.Module) -> str:
    """The fingerprint before this change (first 1024 values per tensor), for the comparison row."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.reshape(-1)[:1024].float().numpy().tobytes())
    return h.hexdigest()


def bench_reference() -> None:
    """sha256 of one in-memory buffer on one core: the machine's ceiling, to read the rows below against."""
    buf = torch.randint(0, 255, (1 << 28,), dtype=torch.uint8).numpy()
    t0 = time.perf_counter()
    hashlib.sha256(memoryview(buf)).digest()
    print(f"reference: sha256 of 256 MiB in memory, one core: {0.25 / (time.perf_counter() - t0):.2f} GiB/s")


def bench_fingerprint(dims: dict, dtype: torch.dtype) -> None:
    model = pythia_shaped(**dims, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    t0 = time.perf_counter()
    weights_sha256(model)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    first_values_sha256(model)
    head = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert sum(nonfinite_count(p) for p in model.parameters()) == 0
    finite = time.perf_counter() - t0
    print(f"weights fingerprint, {n / 1e9:.2f}e9 params {dtype} ({gib:.2f} GiB): every byte {full:.2f} s "
          f"({gib / full:.2f} GiB/s); old first-1024-values {head * 1e3:.1f} ms")
    print(f"from_pretrained's non-finite weight check at this size: {finite:.2f} s")


def bench_store(store_gib: float, d_model: int, shard_tokens: int, root: Path) -> None:
    token_bytes = d_model * 2 + 3 * 8  # one fp16 hook + token_ids, doc_ids, positions
    n_shards = max(1, round(store_gib * 2**30 / (token_bytes * shard_tokens)))
    header = {"format": FORMAT, "version": VERSION, "settings": {"hook_names": ["hook"], "dtype": "float16"},
              "source": {"n_documents": n_shards}, "world_size": 1, "doc_range": [0, n_shards]}
    writer = ShardWriter(root, header)
    g = torch.Generator().manual_seed(0)
    write = hashing = 0.0
    for i in range(n_shards):
        acts = torch.randn(shard_tokens, d_model, generator=g).half()
        meta = torch.arange(shard_tokens)
        writer.add({"hook": acts, "token_ids": meta, "doc_ids": torch.full_like(meta, i), "positions": meta}, 1)
        t0 = time.perf_counter()
        writer.flush({"hook": ["token", "d_model"]})  # write + fsync + hash (as cache_dataset does)
        write += time.perf_counter() - t0
        t0 = time.perf_counter()
        file_sha256(root / writer.manifest["shards"][-1]["file"])  # the hash part alone, timed again
        hashing += time.perf_counter() - t0
    writer.finish()
    writer.close()
    size = sum(s["bytes"] for s in writer.manifest["shards"]) / 2**30
    print(f"store: {n_shards} shards x {shard_tokens} tokens, {size:.2f} GiB")
    print(f"  write (safetensors + fsync + sha256): {write:.2f} s; of which sha256 ~{hashing:.2f} s "
          f"({100 * hashing / write:.0f}%, {size / hashing:.2f} GiB/s)")

    t0 = time.perf_counter()
    store = ActivationStore(root)
    opened = time.perf_counter() - t0
    print(f"  open (manifest accounting + {n_shards} sizes): {opened * 1e3:.1f} ms")
    for check in ("sizes", "lazy", "sizes", "lazy"):  # twice each: the first pass warms the page cache
        store = ActivationStore(root, check=check)
        t0 = time.perf_counter()
        for batch in store.iter_batches("hook", shard_tokens):
            batch.sum()  # touch every byte: a slice of a mapped shard is read only when used
        elapsed = time.perf_counter() - t0
        print(f"  full read, check={check!r:8}: {elapsed:.2f} s ({size / elapsed:.2f} GiB/s)")
    store = ActivationStore(root)
    t0 = time.perf_counter()
    store["hook"][0]
    print(f"  first token of a fresh store (check='lazy', hashes shard 0): {1e3 * (time.perf_counter() - t0):.1f} ms")
    t0 = time.perf_counter()
    ActivationStore(root, check="open")
    print(f"  open with check='open' (hash everything, = verify()): {time.perf_counter() - t0:.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store-gib", type=float, default=1.05)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--shard-tokens", type=int, default=16384)
    parser.add_argument("--weights-dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--dir", help="where to write the store (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    args = parser.parse_args(argv)
    dims = PYTHIA_1_4B
    if args.quick:
        args.store_gib, args.d_model, args.shard_tokens = 0.002, 64, 1024
        dims = dict(n_layers=2, d_model=64, d_mlp=256, d_vocab=128)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    bench_reference()
    bench_fingerprint(dims, getattr(torch, args.weights_dtype))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        bench_store(args.store_gib, args.d_model, args.shard_tokens, Path(tmp) / "store")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
