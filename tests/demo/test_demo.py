"""The demo: figures written and drawn from the study's data, the summary names the induction heads,
and the batched patching agrees with the one-forward-per-cell definition."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM, NeoXTokenizer, get_checkpoint_labels
from neox_lab.analysis.patching import activation_patch, logit_diff
from neox_lab.demo.study import PatchingPrompts, make_patching_prompts, run_demo
from neox_lab.demo.summary import INDUCTION_THRESHOLD, induction_heads

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ("induction_scores", "induction_heads", "patching_resid", "patching_heads", "logit_lens", "circuit_graph",
           "circuit_faithfulness")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo(out_dir=tmp_path_factory.mktemp("demo"), progress=False)


def test_writes_png_figures_and_summary(demo):
    for name in FIGURES:
        path = demo.out_dir / f"{name}.png"
        assert path.is_file(), name
        assert path.read_bytes()[:8] == PNG, f"{name}.png is not a PNG"
    assert (demo.out_dir / "summary.txt").read_text() == demo.summary


def test_summary_names_the_induction_heads(demo):
    heads = induction_heads(demo.induction.scores)
    assert heads, f"the shipped model should have a head above {INDUCTION_THRESHOLD}"
    for layer, head, score in heads:
        assert f"L{layer}H{head} ({score:.2f})" in demo.summary
    assert "Wall time" in demo.summary and "Logit difference" in demo.summary


def test_induction_figures_show_the_measured_data(demo):
    fig = demo.figures["induction_scores"]
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), demo.induction.scores.numpy(), rtol=1e-6)
    top = demo.induction.top_heads(3)
    patterns = demo.figures["induction_heads"]
    panels = [ax for ax in patterns.axes if ax.images and ax.get_title()]
    assert [ax.get_title().split(" ")[0] for ax in panels] == [f"L{la}H{h}" for la, h, _ in top]
    layer, head, _ = top[0]
    want = demo.induction.patterns[layer][0, head].numpy()
    np.testing.assert_allclose(panels[0].images[0].get_array(), want, rtol=1e-6)
    labels = [t.get_text() for t in panels[0].get_xticklabels()]
    assert len(labels) == demo.induction.tokens.shape[1] and labels[1].startswith("␣")


def test_patching_figures(demo):
    fig = demo.figures["patching_resid"]
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), demo.resid_patch.numpy(), rtol=1e-6)
    lo, hi = ax.images[0].get_clim()
    assert lo == pytest.approx(-hi)  # diverging, centred at zero
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[demo.prompts.position].endswith("*")
    heads = demo.figures["patching_heads"].axes[0]
    np.testing.assert_allclose(heads.images[0].get_array(), demo.head_patch.numpy(), rtol=1e-6)
    assert heads.get_xlabel() == "head" and heads.get_ylabel() == "layer"


def test_patching_tells_the_induction_story(demo):
    # Layer 0 at the corrupted position: the only input that differs, so patching it restores all.
    assert float(demo.resid_patch[0, demo.prompts.position]) == pytest.approx(1.0, abs=1e-4)
    assert demo.clean_diff > 0 > demo.corrupted_diff
    # The best head by patching is one of the induction heads the scores found.
    flat = int(demo.head_patch.flatten().argmax())
    best = (flat // demo.head_patch.shape[1], flat % demo.head_patch.shape[1])
    assert best in [(la, h) for la, h, _ in induction_heads(demo.induction.scores)]


def test_training_dynamics_section_sweeps_the_shipped_history(demo):
    dyn = demo.dynamics
    assert dyn is not None and dyn.steps == get_checkpoint_labels("neox-lab/default")[0]
    assert (demo.out_dir / "training_dynamics.png").read_bytes()[:8] == PNG
    # The step named is the first kept checkpoint with a head over the threshold, after one without.
    best = dyn.best(dyn.induction)
    i = dyn.steps.index(dyn.appear_step)
    assert float(best[i]) > INDUCTION_THRESHOLD >= float(best[:i].max()) and i > 0
    assert f"induction heads appear at step {dyn.appear_step}" in demo.summary
    assert dyn.words_step is not None and dyn.words_step >= dyn.appear_step  # words come later (curriculum)
    left, right = demo.figures["training_dynamics"].axes[:2]
    heads = [line for line in left.get_lines() if line.get_label().startswith("L")]
    assert len(heads) == dyn.induction[0].numel()
    np.testing.assert_allclose(heads[0].get_ydata(), dyn.induction[:, 0, 0].numpy())
    words = [line for line in left.get_lines() if line.get_label() == "best head, random word tokens"]
    np.testing.assert_allclose(words[0].get_ydata(), dyn.best(dyn.words).numpy())
    assert left.get_xscale() == "symlog"  # step 0 on a log axis
    assert any(list(line.get_xdata()) == [dyn.appear_step] * 2 for line in left.get_lines())
    np.testing.assert_allclose(right.get_lines()[0].get_ydata(), dyn.icl.numpy())
    assert all(not t["resumed"] for t in dyn.timings) and len(dyn.timings) == len(dyn.steps)


def test_no_history_for_another_model(tmp_path):
    model = _tiny()
    model.tokenizer = NeoXTokenizer.default()
    result = run_demo(model, tmp_path, progress=False)
    assert result.dynamics is None and "Training dynamics" not in result.summary
    assert "training_dynamics" not in result.files


def test_logit_lens_figure_and_final_row(demo):
    lens = demo.lens
    ax = demo.figures["logit_lens"].axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), lens.top_probs[:, 0].numpy(), rtol=1e-6)
    assert [t.get_text() for t in ax.get_yticklabels()] == lens.labels
    # The last row is the model's own prediction.
    model = demo_model()
    logits = model(demo.prompts.clean[:1]).logits
    assert torch.equal(lens.top_ids[-1, 0], logits[0].argmax(-1))


def demo_model():
    from neox_lab import load_default

    return load_default()


# ------------------------------------------------------------------ patching against the definition
def _tiny(vocab=50304):
    torch.manual_seed(0)
    cfg = NeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64,
                     tie_word_embeddings=True)
    return NeoXForCausalLM(cfg).eval()


def test_batched_last_position_patching_matches_one_run_per_cell():
    model = _tiny(vocab=97)
    gen = torch.Generator().manual_seed(1)
    prompts = make_patching_prompts(torch.arange(3, 97), batch=3, bos=0, gen=gen)
    assert isinstance(prompts, PatchingPrompts)
    assert (prompts.clean != prompts.corrupted).sum(1).tolist() == [1, 1, 1]
    names = ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"]
    _, cache = model.run_with_cache(prompts.clean, names_filter=names)
    metric = logit_diff(prompts.answer, prompts.wrong)
    for (target, layer), name, cells in ((("resid_pre", 1), names[0], [(p,) for p in range(prompts.clean.shape[1])]),
                                         (("z", 0), names[1], [(slice(None), h) for h in range(4)])):
        # What the demo runs: batched, logits of the last position only; batch_size=7 makes several chunks.
        got = activation_patch(model, prompts.clean, prompts.corrupted, metric, target, layers=[layer],
                               batch_size=7, logits_to_keep=1).values[0]
        for c, index in enumerate(cells):
            def patch(x, *, hook, index=index, clean=cache[name]):
                x = x.clone()
                x[(slice(None), *index)] = clean[(slice(None), *index)]
                return x

            with torch.no_grad():
                logits = model.run_with_hooks(prompts.corrupted, fwd_hooks=[(name, patch)]).logits[:, -1]
            rows = torch.arange(3)
            want = (logits[rows, prompts.answer] - logits[rows, prompts.wrong]).mean()
            assert float(got[c]) == pytest.approx(float(want), abs=1e-4), (name, index)


def _demo_command(argv):
    from neox_lab.commands import demo as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def test_demo_command_on_a_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "tiny"
    _tiny().save_pretrained(ckpt)  # random weights, no tokenizer files: the NeoX tokenizer is attached
    out = tmp_path / "out"
    assert _demo_command(["--model", str(ckpt), "--out", str(out), "--no-progress"]) == 0
    assert "Induction heads" in capsys.readouterr().out
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(FIGURES)


def test_python_dash_m_demo_help():
    from neox_lab.cli import COMMANDS

    missing = [name for name in COMMANDS if importlib.util.find_spec(f"neox_lab.commands.{name}") is None]
    if missing:
        pytest.skip(f"neox_lab.cli cannot build its parser yet: commands {missing} are not written")
    proc = subprocess.run([sys.executable, "-m", "neox_lab", "demo", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout and "--out" in proc.stdout


def test_demo_command_missing_checkpoint(tmp_path, capsys):
    argv = ["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert _demo_command(argv) == 2  # a user error (issue 15: exit 1 means a failed run)
    assert "nope" in capsys.readouterr().err
