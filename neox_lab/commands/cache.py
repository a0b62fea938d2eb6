"""`neox-lab cache`: store hook activations over a dataset as sharded safetensors (see `cache_dataset`).

Under ``torchrun --nproc-per-node N -m neox_lab cache ...`` (WORLD_SIZE > 1) every process joins a
torch.distributed group (nccl on CUDA, gloo on CPU), caches its block of the dataset and rank 0 writes
the one manifest at the end.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..default_model import load_or_default
from ..dtypes import DTYPES
from ..model.kernels import BACKENDS
from ..store.writer import DEFAULT_SHARD_TOKENS, cache_dataset, expand_hook_patterns
from ..tokenizer import NeoXTokenizer
from .errors import check_device, check_output_dir, user_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR",
                        help="checkpoint directory, loaded as the class its config.json names (default: the "
                             "shipped model, neox_lab.load_default())")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help=".txt (a document per line), .jsonl (a text field), either one .gz or .zst "
                             "compressed, .parquet or a folder of them, a folder saved by `datasets`, or .npy "
                             "(token ids [document pos])")
    parser.add_argument("--hooks", required=True, nargs="+", metavar="NAME",
                        help="hook names or globs, e.g. 'blocks.*.hook_resid_post'")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (reruns resume it)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", "--context-size", type=int, default=128, dest="max_length",
                        help="tokens per window (a document's first ones, or a packed window)")
    parser.add_argument("--packing", action="store_true",
                        help="join documents with EOS and cut them into consecutive context-size windows")
    parser.add_argument("--prepend-bos", action="store_true", help="put the BOS token first in every window")
    parser.add_argument("--min-tokens", type=int, help="skip documents with fewer tokens")
    parser.add_argument("--every-k-documents", type=int, default=1, help="read only every k-th document")
    parser.add_argument("--sample-tokens", type=int,
                        help="keep a random sample of this many positions of each window")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample-tokens")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="dtype on disk")
    parser.add_argument("--positions", default="all",
                        help="'all' real tokens, the 'last' of each document, or a slice 'start:stop[:step]'")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl records")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help="tokens per shard (at least; shards end on batch boundaries)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer.json or a directory (default: the checkpoint's, else the bundled "
                             "GPT-NeoX one)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available; cuda:LOCAL_RANK "
                                         "under torchrun)")
    parser.add_argument("--model-dtype", choices=sorted(DTYPES), help="dtype to run the model in")
    parser.add_argument("--attn-backend", choices=BACKENDS, default="auto", help="attention backend of the model")
    parser.add_argument("--allow-backend-change", action="store_true",
                        help="resume a store started with another attention backend or device (each shard "
                             "records the backend that wrote it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(arg: str | None, local_rank: int) -> torch.device:
    if arg:
        device = check_device(arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


@user_errors("cache", also=(ImportError,))  # a corpus format whose optional extra is missing
def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out)
    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(args.device, local_rank)
    group = False
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        group = True
    try:
        model = load_or_default(args.model, dtype=DTYPES[args.model_dtype] if args.model_dtype else None,
                                device=device, attn_backend=args.attn_backend)
        names = expand_hook_patterns(model, args.hooks)
        # Without --tokenizer, the model's: the checkpoint's own, else the package's GPT-NeoX one.
        tokenizer = NeoXTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
        cache = cache_dataset(model, args.data, names, args.out, batch_size=args.batch_size,
                              max_length=args.max_length, dtype=args.dtype, positions=args.positions,
                              tokenizer=tokenizer, text_field=args.text_field,
                              shard_tokens=args.shard_tokens, progress=not args.no_progress,
                              allow_backend_change=args.allow_backend_change, packing=args.packing,
                              prepend_bos=args.prepend_bos, min_tokens=args.min_tokens,
                              every_k_documents=args.every_k_documents, sample_tokens=args.sample_tokens,
                              seed=args.seed)
    finally:
        if group:
            dist.destroy_process_group()
    if cache is not None and int(os.environ.get("RANK", "0")) == 0:
        size = sum(s["bytes"] for s in cache.shards)
        print(f"cached {len(cache)} tokens of {cache.n_documents} documents, {len(cache.hook_names)} hooks, "
              f"{len(cache.shards)} shards, {size / 2**20:.1f} MiB -> {cache.dir}")
    return 0
