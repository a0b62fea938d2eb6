"""Time and peak memory of the CI step of docs/guides/equivalence-testing.md (`neox-lab compare` of a
checkpoint against itself run by transformers, at the defaults: fp64 on the CPU, the left-padded batch,
the 512-token probe through every layer, the decoding check) on a pythia-160m-shaped checkpoint with
trained-like random weights, and of three variants (fp32 with its measured floors, neox_lab against
itself, a plain-PyTorch port).

    python experiments/compare_ci_cost.py [--preset pythia-160m] [--dir DIR]

Each command runs in a fresh interpreter; peak memory is that child's maximum resident set size; the
load average at the start of each run is printed beside it (a shared machine slows every row's wall
time; its CPU time, user + system, is what the run itself costs).
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


def measure(cmd: list[str]) -> tuple[int, float, float, float]:
    """(exit code, wall seconds, CPU seconds, peak RSS in GiB) of one child process. The CPU time (user +
    system) is what the run costs whatever else shares the machine; the wall time grows with the load."""
    code = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(r.returncode, time.perf_counter() - t, u.ru_utime + u.ru_stime, u.ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                             str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))})
    rc, secs, cpu, kib = out.stdout.split()
    return int(rc), float(secs), float(cpu), int(kib) / 2**20


PORT_FACTORY = """
from neox_lab import NeoXForCausalLM
from neox_lab.testing.plain_port import PlainNeoX, port


def build():
    return port(PlainNeoX.from_neox(NeoXForCausalLM.from_pretrained({path!r})))
"""


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
    (root / "ci_cost_port.py").write_text(PORT_FACTORY.format(path=str(ckpt)))
    cli = [sys.executable, "-m", "neox_lab.cli", "compare"]
    print(f"{args.preset}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}")
    for label, extra in {"vs transformers, defaults (fp64, sdpa)": [str(ckpt), f"hf:{ckpt}"],
                         "vs transformers, --dtype float32 (measured)": [str(ckpt), f"hf:{ckpt}", "--dtype", "float32"],
                         "vs itself (neox_lab), defaults": [str(ckpt), str(ckpt)],
                         "plain port (py:, fp32) vs neox_lab (fp64)": ["py:ci_cost_port:build", str(ckpt)]}.items():
        json_out = root / "report.json"
        load = os.getloadavg()[0]
        os.chdir(root)  # the py: side is imported from the current directory
        rc, secs, cpu, gib = measure(cli + extra + ["--json", str(json_out)])
        print(f"{label:<46} exit {rc}  {secs:6.1f} s wall  {cpu:6.1f} s CPU  peak RSS {gib:5.2f} GiB  "
              f"(load {load:.1f})", flush=True)


if __name__ == "__main__":
    main()
