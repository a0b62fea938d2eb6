"""Smoke tests: the scripts in experiments/ run end to end at tiny sizes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_hooks_quick(capsys):
    pytest.importorskip("transformers")
    bench = load_script("bench_hooks")
    assert bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--memory", "inprocess", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for variant in bench.VARIANTS:
        assert f"| {variant} |" in out
    assert "idle hook points" in out


def test_bench_cache_all_quick(capsys):
    pytest.importorskip("transformers")
    bench = load_script("bench_cache_all")
    assert bench.main(["--quick", "--threads", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    for variant in ("hf_sdpa", "forward", "cache_all", "cache_all_eager"):
        assert f"| 1x16 | {variant} |" in out
    assert "max |scores/pattern - eager's|" in out and "run_with_cache() / forward" in out


# ------------------------------------------------------------------ scripts run as a user runs them
def run_script(name: str, *args: str, timeout: float = 120) -> str:
    """Run experiments/<name>.py in a fresh interpreter; return its stdout (fails with its stderr)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=EXPERIMENTS.parent)
    assert proc.returncode == 0, f"{name}.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_train_default_quick(tmp_path):
    import json

    out = run_script("train_default", "--quick", "--out", str(tmp_path))
    assert "held-out loss" in out and "induction" in out
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "training.json", "checkpoints"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step0", "step2"]
    report = json.loads((tmp_path / "training.json").read_text())
    kept = report["checkpoints"]
    assert kept["steps"] == [0, 2] and kept["final_step"] == 3
    assert [r["step"] for r in kept["records"]] == [0, 2, 3]
    # The largest error is the int4 embedding's (a scale per 32 values): the step is absmax / 7, about
    # 0.36 sigma for 32 Gaussian values, and the rounding error's rms step / sqrt(12) ~ 10% of sigma.
    assert 0.05 < kept["records"][0]["max_relative_error"] < 0.15
    assert report["command"].startswith("python experiments/train_default.py --quick")
    assert report["hyperparameters"]["steps"] == 3 and len(report["loss_curve"]) == 2
    for key in ("heldout_loss", "unigram_loss"):
        assert report[key] > 0
    scores = report["induction"]["word_tokens"]["scores"]
    assert len(scores) == report["model"]["num_hidden_layers"]

    # --measure-kept records the kept checkpoints again without training: the same numbers as stored.
    out = run_script("train_default", "--quick", "--out", str(tmp_path), "--measure-kept", "--note", "again")
    again = json.loads((tmp_path / "training.json").read_text())
    assert again["checkpoints"]["note"] == "again" and again["loss_curve"] == report["loss_curve"]
    assert [r["stored"] for r in again["checkpoints"]["records"]] == [r["stored"] for r in kept["records"]]
    assert again["model_sha256"] == report["model_sha256"]


def test_induction_heads_script(tmp_path):
    out = run_script("induction_heads", "--out", str(tmp_path), "--n", "8", "--batch", "2", "--top", "2")
    assert "top heads" in out and "second copy" in out
    assert (tmp_path / "induction_scores.png").is_file() and (tmp_path / "induction_patterns.png").is_file()


def test_bench_cache_dataset_tiny():
    out = run_script("bench_cache_dataset", "--quick", "--docs", "2", "--seq", "16", "--batch-size", "2")
    assert "cache_tokens_per_s" in out and "throughput_ratio" in out and "goal >= 0.95x" in out


def test_logit_lens_script(tmp_path):
    out = run_script("logit_lens", "--out", str(tmp_path), "--max-tokens", "12", "--n", "6")
    assert "after L0" in out and "second copy" in out
    assert (tmp_path / "logit_lens_code.png").is_file() and (tmp_path / "logit_lens_repeated.png").is_file()


def test_bench_forward_cpu_quick():
    pytest.importorskip("transformers")
    out = run_script("bench_forward", "--device", "cpu", "--quick")
    for variant in ("hf_sdpa", "hf_eager", "neox_sdpa", "neox_eager", "neox_cache"):
        assert f"| quick | {variant} |" in out
    assert "goals:" in out


def test_bench_generate_cpu_quick():
    pytest.importorskip("transformers")
    out = run_script("bench_generate", "--device", "cpu", "--quick")
    for batch in (1, 2):
        for variant in ("hf_eager", "hf_sdpa", "neox"):
            assert f"| {batch} | {variant} |" in out
    assert "goal: plain neox >= hf_sdpa at batch 1" in out and "goal: plain neox >= hf_sdpa at batch 2" in out


def test_bench_decode_host_quick():
    pytest.importorskip("transformers")
    out = run_script("bench_decode_host", "--preset", "pythia-14m", "--batches", "1", "--new-tokens", "4",
                     "--rounds", "1")
    row = next(line for line in out.splitlines() if line.startswith("| 1 |"))
    assert row.split("|")[-2].strip() == "sdpa.flash", out  # the CUDA path's kernel choice, emulated


def test_equivalence_sweep_reports_fp64_at_machine_precision():
    pytest.importorskip("transformers")
    out = run_script("equivalence_sweep", "--examples", "3")
    # The last row is fp64 with transformers' fp32 softmax lifted: structure alone, at machine precision.
    fp64 = out.strip().splitlines()[-1].split()
    assert fp64[0] == "fp64" and float(fp64[1]) < 1e-12, out


def test_train_probe_tiny():
    out = run_script("train_probe", "--files", "8", "--chunks", "30", "--epochs", "1", "--context", "48")
    assert "held-out accuracy of linear probes" in out and "inside a comment" in out
    assert "hook_embed" in out and "hook_resid_post" in out


def test_bench_store_integrity_quick():
    out = run_script("bench_store_integrity", "--quick")
    assert "weights fingerprint" in out and "check='lazy'" in out and "check='open'" in out


def test_bench_placement_quick():
    pytest.importorskip("accelerate")
    out = run_script("bench_placement", "--preset", "pythia-14m", "--tokens", "4", "--repeats", "1",
                     "--threads", "1", timeout=300)
    assert "ratio to shard" in out and "| every block on disk |" in out


def test_bench_sweep_quick():
    out = run_script("bench_sweep", "--quick", "--threads", "1")
    assert "in-place load" in out and "records equal to the fresh loop's: yes" in out


def test_circuit_scripts_quick():
    # --memory off: the peak-memory children re-import torch (tens of seconds on a shared CPU)
    out = run_script("bench_circuits", "--quick", "--threads", "1", "--memory", "off")
    for line in ("EAP / forward", "EAP-IG (m=5) / fwd+bwd", "split fwd+bwd / forward"):
        assert line in out
    out = run_script("circuit_discovery", "--quick", "--threads", "1")
    for method in ("exact", "EAP", "EAP-IG", "EAP-IG-activations"):
        assert f" {method} " in out
    assert "recovered" in out
