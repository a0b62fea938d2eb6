"""`sweep_checkpoints`: the same records as loading each checkpoint alone, in one model's own tensors,
resumable after a real kill, and refusing a structurally different checkpoint by name before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neox_lab import CheckpointError, HookedTransformer, NeoXForCausalLM, sweep_checkpoints
from neox_lab.analysis.measurements import InContextLearningScore, InductionScore, PreviousTokenScore, combine
from neox_lab.dynamics import SweepFileError, resolve_checkpoints
from neox_lab.testing.pairs import make_trained_like, tiny_config

ROOT = Path(__file__).resolve().parents[2]
CFG = tiny_config()
TOKENS = torch.randint(1, CFG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))


def save_run(root: Path, steps, cfg=CFG) -> list[Path]:
    paths = []
    for step in steps:
        torch.manual_seed(step)
        model = make_trained_like(NeoXForCausalLM(cfg), seed=step, std=0.1 + 0.05 * (step % 7))
        model.save_pretrained(root / f"step{step}")
        paths.append(root / f"step{step}")
    return paths


class Logits:
    """A measurement reading the whole forward: logits, one hooked stream, a number."""

    spec = {"measure": "test-logits"}

    def __call__(self, model):
        with torch.no_grad():
            logits, cache = model.run_with_cache(TOKENS, names_filter="blocks.1.hook_resid_post")
        return {"logits": logits, "resid": cache["blocks.1.hook_resid_post"], "mean": float(logits.mean())}


def measure_alone(path, fn, **kwargs):
    model = NeoXForCausalLM.from_pretrained(path, **kwargs)
    return fn(model)


def assert_records_equal(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], torch.Tensor):
                assert ra[k].dtype == rb[k].dtype and torch.equal(ra[k], rb[k]), (ra["checkpoint"], k)
            else:
                assert ra[k] == rb[k], (ra["checkpoint"], k)


@given(steps=st.lists(st.integers(0, 40), min_size=1, max_size=4, unique=True),
       backend=st.sampled_from(["eager", "sdpa"]), dtype=st.sampled_from(["float32", "float64"]))
def test_sweep_equals_loading_each_checkpoint_alone(steps, backend, dtype, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    paths = save_run(root, steps)
    fn = combine(Logits(), PreviousTokenScore(TOKENS))
    records = sweep_checkpoints(paths, fn, dtype=dtype, attn_backend=backend, progress=False)
    assert [r["step"] for r in records] == steps and records.steps == steps
    assert [r["checkpoint"] for r in records] == [str(p.resolve()) for p in paths]
    alone = [{"checkpoint": str(p.resolve()), "step": s,
              **measure_alone(p, fn, dtype=dtype, attn_backend=backend)} for p, s in zip(paths, steps, strict=True)]
    assert_records_equal(records, alone)
    assert records.model.attn_backend == backend
    assert records.stack("previous_token_score").shape == (len(steps), CFG.num_hidden_layers, CFG.num_attention_heads)


def test_the_model_keeps_its_tensors_hooks_and_placement(tmp_path):
    pytest.importorskip("accelerate")
    paths = save_run(tmp_path, [0, 5, 9])
    model = NeoXForCausalLM.from_pretrained(paths[0], attn_backend="eager", device_map={"": "cpu"})
    before = {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}
    params = list(model.parameters())
    fired = []
    model.add_hook("blocks.1.attn.hook_pattern", lambda x, hook: fired.append(1))
    records = sweep_checkpoints(paths, Logits(), model=model, progress=False)
    assert records.model is model
    assert {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()} == before
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert len(fired) == 3 and model.device_map is not None
    assert_records_equal(records, [{"checkpoint": str(p.resolve()), "step": s,
                                    **measure_alone(p, Logits(), attn_backend="eager")}
                                   for p, s in zip(paths, [0, 5, 9], strict=True)])


def test_a_structurally_different_checkpoint_is_refused_by_name_before_any_work(tmp_path):
    paths = save_run(tmp_path / "run", [0, 10, 20])
    odd = save_run(tmp_path / "other", [15], cfg=tiny_config(num_hidden_layers=3))[0]
    calls = []
    with pytest.raises(CheckpointError, match=r"step15.*'num_hidden_layers' is 3 but the first checkpoint.*is 2"):
        sweep_checkpoints([*paths[:2], odd, paths[2]], lambda m: calls.append(1) or {"x": 1.0}, progress=False)
    assert calls == []
    wide = save_run(tmp_path / "wide", [30], cfg=tiny_config(intermediate_size=96))[0]
    model = NeoXForCausalLM.from_pretrained(paths[0])
    with pytest.raises(CheckpointError, match=r"step30.*'intermediate_size' is 96 but the model's is 64"):
        sweep_checkpoints([paths[1], wide], Logits(), model=model, progress=False)


def test_results_file_resumes_and_refuses_another_sweep(tmp_path):
    paths = save_run(tmp_path / "run", [0, 1, 2])
    out = tmp_path / "results.jsonl"
    first = sweep_checkpoints(paths[:2], Logits(), out=out, progress=False)
    assert first.computed == [str(p.resolve()) for p in paths[:2]]
    again = sweep_checkpoints(paths, Logits(), out=out, progress=False)
    assert again.computed == [str(paths[2].resolve())]
    assert [t["resumed"] for t in again.timings] == [True, True, False]
    assert_records_equal(again, sweep_checkpoints(paths, Logits(), progress=False))
    with pytest.raises(SweepFileError, match="different sweep.*fn"):
        sweep_checkpoints(paths, PreviousTokenScore(TOKENS), out=out, progress=False)
    with pytest.raises(SweepFileError, match="different sweep.*dtype"):
        sweep_checkpoints(paths, Logits(), out=out, dtype="float64", progress=False)
    with pytest.raises(SweepFileError, match="different sweep.*name"):
        sweep_checkpoints(paths, Logits(), out=out, name="renamed", progress=False)


def test_parquet_results_resume_with_exact_tensors(tmp_path):
    pytest.importorskip("pyarrow")
    paths = save_run(tmp_path / "run", [0, 3])
    out = tmp_path / "results.parquet"
    first = sweep_checkpoints(paths[:1], Logits(), out=out, progress=False)
    again = sweep_checkpoints(paths, Logits(), out=out, progress=False)
    assert again.computed == [str(paths[1].resolve())]
    assert_records_equal(again[:1], first)
    assert_records_equal(again, sweep_checkpoints(paths, Logits(), progress=False))


KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from test_sweep import Logits, save_run  # the measurement the parent runs, by its spec
    from neox_lab import sweep_checkpoints

    calls = Path({calls!r})

    class Blocking(Logits):
        def __call__(self, model):
            done = len(calls.read_text().splitlines()) if calls.exists() else 0
            with open(calls, "a") as fh:
                fh.write("call\\n")
            if done == {k}:
                time.sleep(600)  # the parent kills us here, in the middle of checkpoint k+1
            return super().__call__(model)

    paths = [Path(p) for p in {paths!r}]
    sweep_checkpoints(paths, Blocking(), out={out!r}, progress=False)
""")


def test_a_killed_sweep_resumes_computing_only_the_rest(tmp_path):
    n, k = 5, 3
    paths = save_run(tmp_path / "run", list(range(0, 5 * n, 5)))
    out, calls = tmp_path / "results.jsonl", tmp_path / "calls.txt"
    script = tmp_path / "sweep_then_block.py"
    script.write_text(KILLED.format(tests=str(Path(__file__).parent), calls=str(calls), k=k,
                                    paths=[str(p) for p in paths], out=str(out)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if calls.exists() and len(calls.read_text().splitlines()) == k + 1:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + k  # the header and k finished records

    counted = []

    class Counting(Logits):
        def __call__(self, model):
            counted.append(1)
            return super().__call__(model)

    resumed = sweep_checkpoints(paths, Counting(), out=out, progress=False)
    assert len(counted) == n - k
    assert resumed.computed == [str(p.resolve()) for p in paths[k:]]
    assert_records_equal(resumed, sweep_checkpoints(paths, Logits(), progress=False))
    assert len(out.read_text().splitlines()) == 1 + n


def test_a_line_cut_by_a_kill_is_dropped(tmp_path):
    paths = save_run(tmp_path / "run", [0, 1])
    out = tmp_path / "results.jsonl"
    sweep_checkpoints(paths, Logits(), out=out, progress=False)
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:40])  # the second record cut mid-write
    with pytest.warns(UserWarning, match="dropping an unfinished last line"):
        resumed = sweep_checkpoints(paths, Logits(), out=out, progress=False)
    assert resumed.computed == [str(paths[1].resolve())]
    assert [json.loads(line)["checkpoint"] for line in out.read_text().splitlines()[1:]] == \
        [str(p.resolve()) for p in paths]


def test_a_measurement_must_return_the_same_values_each_time(tmp_path):
    paths = save_run(tmp_path / "run", [0, 1])
    shapes = iter([(2,), (3,)])
    with pytest.raises(ValueError, match="same names, kinds and tensor shapes"):
        sweep_checkpoints(paths, lambda m: {"v": torch.zeros(next(shapes))}, out=tmp_path / "r.jsonl",
                          progress=False)
    with pytest.raises(ValueError, match="'step', a name the sweep writes itself"):
        sweep_checkpoints(paths, lambda m: {"step": 1}, progress=False)
    with pytest.raises(TypeError, match="must return a mapping"):
        sweep_checkpoints(paths, lambda m: 1.0, progress=False)


def test_hub_checkpoints_are_named_not_fetched_until_loaded(monkeypatch, tmp_path):
    refs = resolve_checkpoints("EleutherAI/pythia-70m", steps=[0, 512, 1000])
    assert [(r.revision, r.step, r.label) for r in refs] == [
        ("step0", 0, "EleutherAI/pythia-70m@step0"), ("step512", 512, "EleutherAI/pythia-70m@step512"),
        ("step1000", 1000, "EleutherAI/pythia-70m@step1000")]
    assert len(resolve_checkpoints("EleutherAI/pythia-70m")) == 154
    assert [r.revision for r in resolve_checkpoints(["EleutherAI/pythia-70m@step8"])] == ["step8"]
    with pytest.raises(ValueError, match="checkpoint_value=3 is not a checkpoint"):
        resolve_checkpoints("EleutherAI/pythia-70m", steps=[3])
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="at revision 'step512'"):
        sweep_checkpoints("EleutherAI/pythia-70m", Logits(), steps=[512], progress=False)


def test_induction_score_sweep_over_a_folder_of_steps(tmp_path):
    save_run(tmp_path, [0, 10, 100])
    fn = InductionScore(n=5, batch=2, candidates=torch.arange(1, 90))
    records = sweep_checkpoints(tmp_path, fn, progress=False)
    assert records.steps == [0, 10, 100]
    assert records.stack("induction_score").shape == (3, 2, 4)


def test_a_hooked_transformer_is_swept_with_its_processing(tmp_path):
    # Either convention's class: a processed HookedTransformer is processed again after each load, so each
    # record equals the one of HookedTransformer.from_pretrained on that checkpoint (float64, bit for bit).
    paths = save_run(tmp_path, [0, 5, 9])
    fn = combine(PreviousTokenScore(TOKENS), InContextLearningScore(TOKENS, early=2, late=(8, 12)))
    model = HookedTransformer.from_pretrained(paths[0], dtype=torch.float64)
    records = sweep_checkpoints(paths, fn, model=model, progress=False)
    assert records.model is model and model.weights_processed
    alone = [{"checkpoint": str(p.resolve()), "step": s,
              **fn(HookedTransformer.from_pretrained(p, dtype=torch.float64))} for p, s in zip(paths, [0, 5, 9],
                                                                                           strict=True)]
    assert_records_equal(records, alone)


def test_progress_shows_load_and_analysis_time(tmp_path, capsys):
    paths = save_run(tmp_path, [0, 5])
    records = sweep_checkpoints(paths, PreviousTokenScore(TOKENS), progress=True)
    err = capsys.readouterr().err
    assert "sweep" in err and "2/2" in err and "load " in err and "analysis " in err
    assert [set(t) for t in records.timings] == [{"checkpoint", "load_s", "analysis_s", "resumed"}] * 2
    assert all(t["load_s"] > 0 and t["analysis_s"] > 0 and not t["resumed"] for t in records.timings)
