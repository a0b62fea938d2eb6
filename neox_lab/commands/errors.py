"""What every subcommand does with a mistake its user can make: one line ``neox-lab CMD: error: ...`` on
stderr and exit status 2, before any work where the mistake can be seen up front (a device this torch
cannot use, an output path that is a file or cannot be created). Exit 1 stays "not equivalent" or
"the run failed"; a bug in neox_lab still shows its traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..store.manifest import CacheBusyError

#: Errors a user causes: bad values, missing or unreadable files, full disks, a busy store, no GPU memory.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError, CacheBusyError,
                                                 torch.OutOfMemoryError)

Run = Callable[[argparse.Namespace], "int | None"]


def message(err: BaseException) -> str:
    """The error's own words (KeyError quotes its argument; say it plainly)."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in str(err):
        return f"{err.strerror or err}: {err.filename}"
    return str(err) or type(err).__name__


def user_errors(command: str, also: tuple[type[BaseException], ...] = ()) -> Callable[[Run], Callable]:
    """Wrap a subcommand's `run(args)`: check `args.device` first, and turn a user's error into
    ``neox-lab COMMAND: error: ...`` and exit 2."""
    def wrap(run: Run) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def checked(args: argparse.Namespace) -> int:
            try:
                if getattr(args, "device", None):
                    check_device(args.device)
                return int(run(args) or 0)
            except (*USER_ERRORS, *also) as err:
                print(f"neox-lab {command}: error: {message(err)}", file=sys.stderr)
                return 2
        return checked
    return wrap


def check_device(text: str) -> torch.device:
    """`--device TEXT` as a torch device this torch can use; ValueError naming the flag otherwise."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise ValueError(f"--device {text}: this torch ({torch.__version__}, {build}) sees no CUDA device; "
                             "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {text}: there are {count} CUDA device(s), numbered 0..{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: MPS is not available on this machine; use --device cpu")
    return device


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output directory that exists as a directory or can be created: ValueError naming the flag if
    it is a file, lies under a file, or its nearest existing parent is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory; pass a directory (it is created if missing)")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ValueError(f"{flag} {path}: {base} is a file, so no directory can be made under it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {base} is not writable (permission denied); pick another place")
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """An output file that can be written: ValueError naming the flag if it is a directory or its
    directory cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; pass a file name")
    check_output_dir(path.parent, f"{flag} {path}: the directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path} is not writable (permission denied)")
    return path
