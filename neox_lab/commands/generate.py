"""`neox-lab generate --model DIR "prompt" ...`: print the prompt and a sampled or greedy completion."""

from __future__ import annotations

import argparse
import sys

import torch

from ..default_model import load_or_default
from ..model.tasks import NeoXForCausalLM
from .errors import user_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT",
                        help="text to continue; several prompts run as one left-padded batch")
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (config.json, weights, and tokenizer.json, else the "
                             "bundled GPT-NeoX tokenizer is used); default: the shipped model")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to add (default 32)")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature > 0 (default 1)")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--completion-only", action="store_true", help="print only the new text")


# RuntimeError as well, as this command always treated it (torch reports some device limits that way).
@user_errors("generate", also=(RuntimeError,))
def run(args) -> int:
    sampling = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                               ("--top-p", args.top_p)) if v is not None]
    if args.greedy and sampling:
        print(f"error: --greedy picks the argmax; it cannot be combined with {', '.join(sampling)}",
              file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Without --model, the shipped model (FileNotFoundError says so if its package data is missing).
    model = load_or_default(args.model, cls=NeoXForCausalLM, device=device)
    generator = None
    if args.seed is not None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(args.seed)
    ids = model.generate(
        prompt=list(args.prompts), max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
        temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k,
        top_p=args.top_p, generator=generator,
    )
    width = max(len(model.tokenizer.encode(p)) for p in args.prompts)  # the left-padded prompt block
    completions = model.tokenizer.batch_decode(ids[:, width:], skip_special_tokens=True)
    for prompt, completion in zip(args.prompts, completions, strict=True):
        print(completion if args.completion_only else prompt + completion)
    return 0
