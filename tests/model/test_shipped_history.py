"""The shipped model's training history: kept checkpoints that load, a sweep that reproduces what the training
run recorded for them, a visible induction phase change, and a package that stays small."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import pytest
import torch

import neox_lab
from neox_lab import NeoXForCausalLM, get_checkpoint_labels, sweep_checkpoints
from neox_lab.default_model import training_report
from neox_lab.demo.dynamics import history_measurement
from neox_lab.demo.summary import INDUCTION_THRESHOLD
from neox_lab.model.checkpoints import shipped_checkpoint_dir, shipped_checkpoints
from neox_lab.model.compact import is_compact
from neox_lab.tokenizer import NeoXTokenizer

PACKAGE = Path(neox_lab.__file__).parent


@pytest.fixture(scope="module")
def report():
    return training_report()


@pytest.fixture(scope="module")
def swept():
    return sweep_checkpoints("neox-lab/default", history_measurement(NeoXTokenizer.default()), dtype=torch.float32,
                             progress=False)


def test_the_history_is_the_kept_steps_then_the_shipped_model(report):
    kept = report["checkpoints"]
    steps, kind = get_checkpoint_labels("neox-lab/default")
    assert kind == "step" and steps == [*kept["steps"], kept["final_step"]]
    assert kept["final_step"] == report["hyperparameters"]["steps"]
    refs = shipped_checkpoints()
    assert refs[-1].source == str(shipped_checkpoint_dir().parent)
    assert [r.label for r in refs] == [f"neox-lab/default@step{s}" for s in steps]
    for ref in refs[:-1]:
        assert is_compact(Path(ref.source) / "model.safetensors"), ref.source
    model = NeoXForCausalLM.from_pretrained("neox-lab/default", checkpoint_value=steps[1])
    assert model.tokenizer is not None  # the package's tokenizer, as for the shipped model
    assert model.model.embed.weight.dtype == torch.float32


def test_the_shipped_model_is_the_one_the_training_run_wrote(report):
    stored = (shipped_checkpoint_dir().parent / "model.safetensors").read_bytes()
    assert hashlib.sha256(stored).hexdigest() == report["model_sha256"]


def test_a_sweep_reproduces_what_training_recorded(report, swept):
    records = report["checkpoints"]["records"]
    assert [r["step"] for r in records] == swept.steps
    for rec, got in zip(records, swept, strict=True):
        # Same weights, tokens and kernels; the training run used 2 threads and this test 1, which may
        # reorder fp32 sums: scores in [0, 1] from ~120 products each, so 1e-5 covers any reordering.
        torch.testing.assert_close(got["words_induction_score"], torch.tensor(rec["stored"]["words_induction_score"]),
                                   rtol=0, atol=1e-5)
        if platform.python_version() == report["corpus"]["python"]:  # the code probes read this stdlib's code
            torch.testing.assert_close(got["induction_score"], torch.tensor(rec["stored"]["induction_score"]),
                                       rtol=0, atol=1e-5)
            assert got["icl_score"] == pytest.approx(rec["stored"]["icl_score"], abs=1e-4)


def test_the_induction_phase_change_is_in_the_history(swept):
    best = swept.stack("induction_score").flatten(1).amax(-1)
    below, above = best < INDUCTION_THRESHOLD, best > INDUCTION_THRESHOLD
    # Before (step 0 and at least one more), during (a rise between two kept steps), after.
    assert bool(below[:2].all()) and bool(above[-2:].all())
    first = int(above.nonzero()[0])
    assert bool(below[:first].all()) and bool(above[first:].all()), best
    assert 0 < swept.steps[first] < swept.steps[-1]


def test_the_package_stays_under_40_mb():
    total = sum(p.stat().st_size for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 40e6, f"neox_lab/ holds {total / 1e6:.1f} MB"
