"""`neox-lab demo [--model DIR] [--out DIR]`: induction heads, activation patching and the logit lens on
the shipped model (or a checkpoint), as PNG figures plus summary.txt."""

from __future__ import annotations

import argparse

from ..demo import run_demo
from .errors import check_output_dir, user_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (or 'neox-lab/default'); default: the shipped model")
    parser.add_argument("--out", default="neox_lab_demo", help="where the figures and summary.txt go "
                                                               "(default ./neox_lab_demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random token sequences")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@user_errors("demo")
def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out)
    result = run_demo(args.model, args.out, progress=not args.no_progress, seed=args.seed)
    print(result.summary, end="")
    print(f"Wrote {len(result.files)} files to {result.out_dir.resolve()}")
    return 0
