"""`neox-lab compare A B`: run two checkpoints on the same tokens, print the per-hook report, exit 1
when they are not equivalent (0 when they are, 2 on a usage or loading error).

A and B are checkpoint directories run by neox_lab, or `hf:DIR` to run DIR's weights through
transformers. B is the reference. Example (CI): neox-lab compare ./quantised hf:./original
--dtype-a float16 --json report.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..config import NeoXConfig
from ..default_model import load_or_default
from ..dtypes import DTYPES
from ..model.kernels import BACKENDS
from ..model.loading import resolve_checkpoint
from ..model.tasks import model_class
from ..testing.compare import compare, default_tolerance
from ..tokenizer import NeoXTokenizer

# neox_lab backend name -> transformers attn_implementation ("auto": transformers' own default)
HF_BACKENDS = {"eager": "eager", "sdpa": "sdpa", "flash": "flash_attention_2", "auto": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="checkpoint directory, or hf:DIR to run it through transformers")
    parser.add_argument("b", metavar="B", help="the reference: checkpoint directory or hf:DIR")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of both sides")
    parser.add_argument("--dtype-a", choices=sorted(DTYPES), help="dtype of A (overrides --dtype)")
    parser.add_argument("--dtype-b", choices=sorted(DTYPES), help="dtype of B (overrides --dtype)")
    parser.add_argument("--backend", choices=BACKENDS, default="eager", help="attention backend of both sides")
    parser.add_argument("--backend-a", choices=BACKENDS, help="attention backend of A (overrides --backend)")
    parser.add_argument("--backend-b", choices=BACKENDS, help="attention backend of B (overrides --backend)")
    parser.add_argument("--prompts", metavar="FILE",
                        help="text file, one prompt per line, tokenized with A's tokenizer (else the "
                             "bundled GPT-NeoX one); default: random token ids")
    parser.add_argument("--json", metavar="OUT", help="write the report as JSON (a CI artifact)")
    parser.add_argument("--seq-len", type=int, default=32,
                        help="tokens per row: random ids' length, and the cut for prompts (default 32)")
    parser.add_argument("--batch", type=int, default=4, help="rows of random ids (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ids (default 0)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the noise floor by this (e.g. for a lossy quantisation)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--only-failures", action="store_true", help="print only failing hooks")


def _load(spec: str, dtype: torch.dtype, backend: str, device: str):
    """(model, checkpoint directory) for `DIR` (neox_lab) or `hf:DIR` (transformers)."""
    if not spec.startswith("hf:"):
        model = load_or_default(spec, dtype=dtype, device=device, attn_backend=backend)
        return model, resolve_checkpoint(spec)
    directory = resolve_checkpoint(spec[3:])
    arch = model_class(directory).hf_architecture
    try:
        import transformers
    except ImportError as err:
        raise ValueError(f"{spec}: running a checkpoint through transformers needs it installed "
                         "(pip install transformers)") from err
    NeoXConfig.from_hf(directory)  # refuses configs neox_lab could not run either, with the key named
    kwargs = {} if HF_BACKENDS[backend] is None else {"attn_implementation": HF_BACKENDS[backend]}
    model = getattr(transformers, arch).from_pretrained(directory, **kwargs)
    return model.to(device=device, dtype=dtype).eval(), directory


def _inputs(args, model, directory: Path, vocab_size: int):
    if args.prompts is None:
        gen = torch.Generator().manual_seed(args.seed)
        return {"input_ids": torch.randint(0, vocab_size, (args.batch, args.seq_len), generator=gen)}
    lines = [line for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--prompts {args.prompts}: no non-empty lines")
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        tok = (NeoXTokenizer.from_pretrained(directory) if (directory / "tokenizer.json").is_file()
               else NeoXTokenizer.default())
    enc = tok(lines, padding=True, padding_side="left", truncation=True, max_length=args.seq_len,
              return_tensors="pt")
    top = int(enc["input_ids"].max())
    if top >= vocab_size:
        raise ValueError(f"--prompts: the tokenizer gives token id {top}, outside the model's vocabulary of "
                         f"{vocab_size}; save the checkpoint with its own tokenizer.json")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def run(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sides = {}
    try:
        for key in ("a", "b"):
            dtype = DTYPES[getattr(args, f"dtype_{key}") or args.dtype]
            backend = getattr(args, f"backend_{key}") or args.backend
            sides[key] = _load(getattr(args, key), dtype, backend, device)
        (model_a, dir_a), (model_b, _) = sides["a"], sides["b"]
        inputs = _inputs(args, model_a, dir_a, model_a.config.vocab_size)
        tolerance = None
        if args.scale != 1.0:
            tolerance = default_tolerance(model_a, model_b, inputs["input_ids"].shape[-1]).scaled(args.scale)
        report = compare(model_a, model_b, inputs, tolerance=tolerance)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.table(only_failures=args.only_failures))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(report.to_json() + "\n", encoding="utf-8")
    return 0 if report.equivalent else 1
