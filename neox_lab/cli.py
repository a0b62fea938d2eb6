"""`neox-lab` / `python -m neox_lab`: one entry point, one module per subcommand in `neox_lab.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands.errors import user_errors

# subcommand -> module in neox_lab.commands defining `add_arguments(parser)` and `run(args) -> int`
COMMANDS = {
    "demo": "Run the interpretability demo (induction heads, patching, logit lens) and draw its figures.",
    "generate": "Complete a prompt with a checkpoint.",
    "cache": "Cache hook activations over a dataset to sharded safetensors on disk.",
    "compare": "Compare two checkpoints (or a checkpoint and transformers) hook by hook.",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; only `command`'s module is imported (each pulls in different dependencies)."""
    parser = argparse.ArgumentParser(prog="neox-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(f"neox_lab.commands.{name}")
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    # Every subcommand wraps its own run too; this catches what one raises outside it (e.g. writing --json).
    return user_errors(args.command)(args._module.run)(args)


if __name__ == "__main__":
    sys.exit(main())
