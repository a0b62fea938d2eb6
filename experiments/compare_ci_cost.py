"""Time and peak memory of the CI step of docs/guides/equivalence-testing.md (`neox-lab compare` of a
checkpoint against itself run by transformers) on a pythia-160m-shaped checkpoint with trained-like random weights.

    python experiments/compare_ci_cost.py [--preset pythia-160m] [--dir DIR]

Each command runs in a fresh interpreter; peak memory is that child's maximum resident set size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from neox_lab import NeoXForCausalLM
from neox_lab.config import PRESETS
from neox_lab.testing.pairs import make_trained_like


def measure(cmd: list[str]) -> tuple[int, float, float]:
    """(exit code, seconds, peak RSS in GiB) of one child process."""
    code = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "print(r.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True)
    rc, secs, kib = out.stdout.split()
    return int(rc), float(secs), int(kib) / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="pythia-160m", choices=sorted(PRESETS))
    parser.add_argument("--dir", default=None, help="keep the checkpoint here")
    args = parser.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp())
    ckpt = root / args.preset
    if not (ckpt / "config.json").exists():
        torch.manual_seed(0)
        model = make_trained_like(NeoXForCausalLM(PRESETS[args.preset]).eval(), seed=0, std=0.06)
        model.save_pretrained(ckpt)
        del model
    cli = [sys.executable, "-m", "neox_lab.cli", "compare"]
    print(f"{args.preset}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}")
    for label, extra in {"vs transformers, defaults (fp64, eager)": [str(ckpt), f"hf:{ckpt}"],
                         "vs transformers, --dtype float32": [str(ckpt), f"hf:{ckpt}", "--dtype", "float32"],
                         "vs itself (neox_lab), defaults": [str(ckpt), str(ckpt)]}.items():
        json_out = root / "report.json"
        rc, secs, gib = measure(cli + extra + ["--json", str(json_out)])
        print(f"{label:<44} exit {rc}  {secs:6.1f} s  peak RSS {gib:5.2f} GiB")


if __name__ == "__main__":
    main()
