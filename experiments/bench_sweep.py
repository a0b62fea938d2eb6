"""What a sweep over training checkpoints costs: load (in place) vs analysis per checkpoint, against the
hand-written loop it replaces (`from_pretrained` per checkpoint), measured in the same run.

    python experiments/bench_sweep.py                 # the shipped model's history, the demo's measurement
    python experiments/bench_sweep.py --quick         # a tiny generated run (smoke test)

Prints one row per checkpoint (load and analysis seconds, in place and fresh) and the ratio of the
in-place load to a fresh `from_pretrained`. The analysis is the same function on the same weights in
both loops, so its times differ only by noise; the records are checked equal.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from neox_lab import NeoXForCausalLM, sweep_checkpoints
from neox_lab.analysis.measurements import InductionScore
from neox_lab.demo.dynamics import history_measurement
from neox_lab.dynamics import resolve_checkpoints
from neox_lab.testing.pairs import make_trained_like, tiny_config
from neox_lab.tokenizer import NeoXTokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", default="neox-lab/default", help="what to sweep (default: the shipped history)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny generated run of 3 checkpoints")
    return p.parse_args(argv)


def tiny_run(root: Path) -> tuple[Path, object]:
    for step in (0, 10, 20):
        torch.manual_seed(step)
        make_trained_like(NeoXForCausalLM(tiny_config()), seed=step).save_pretrained(root / f"step{step}")
    return root, InductionScore(n=5, batch=4, candidates=torch.arange(1, 90))


def fresh_loop(checkpoints, fn) -> list[dict]:
    """The loop a sweep replaces: a new model per checkpoint (the tokenizer loaded once, to be fair)."""
    rows, tokenizer = [], NeoXTokenizer.default()
    for ref in resolve_checkpoints(checkpoints):
        t0 = time.perf_counter()
        model = NeoXForCausalLM.from_pretrained(ref.source, revision=ref.revision, dtype=torch.float32)
        model.tokenizer = tokenizer
        t1 = time.perf_counter()
        values = fn(model)
        rows.append({"checkpoint": ref.label, "load_s": t1 - t0, "analysis_s": time.perf_counter() - t1,
                     "values": values})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            checkpoints, fn = tiny_run(Path(tmp))
        else:
            checkpoints, fn = args.checkpoints, history_measurement(NeoXTokenizer.default())
        fresh = fresh_loop(checkpoints, fn)
        swept = sweep_checkpoints(checkpoints, fn, dtype=torch.float32, progress=False)
    for rec, row in zip(swept, fresh, strict=True):
        for key, value in row["values"].items():
            same = torch.equal(value, rec[key]) if isinstance(value, torch.Tensor) else value == rec[key]
            if not same:
                raise SystemExit(f"{row['checkpoint']}: {key} differs between the sweep and the fresh loop")
    print("| checkpoint | step | sweep load s | sweep analysis s | fresh load s | fresh analysis s |")
    print("|---|---|---|---|---|---|")
    for t, rec, row in zip(swept.timings, swept, fresh, strict=True):
        print(f"| {t['checkpoint']} | {rec['step']} | {t['load_s']:.3f} | {t['analysis_s']:.3f} | "
              f"{row['load_s']:.3f} | {row['analysis_s']:.3f} |")
    # The first sweep load builds the model (from_pretrained); the rest load in place.
    later = swept.timings[1:]
    in_place = sum(t["load_s"] for t in later) / max(1, len(later))
    fresh_load = sum(r["load_s"] for r in fresh[1:]) / max(1, len(fresh) - 1)
    analysis = sum(t["analysis_s"] for t in swept.timings) / len(swept.timings)
    print(f"mean per checkpoint after the first: in-place load {in_place:.3f} s, fresh from_pretrained "
          f"{fresh_load:.3f} s (ratio {in_place / fresh_load:.2f}); analysis {analysis:.3f} s")
    print(f"sweep total {sum(t['load_s'] + t['analysis_s'] for t in swept.timings):.2f} s over "
          f"{len(swept)} checkpoints; records equal to the fresh loop's: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
