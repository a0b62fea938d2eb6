import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from neox_lab.analysis import plotting
from neox_lab.analysis.plotting import (
    attention_pattern,
    attention_patterns,
    format_token,
    induction_scores,
    logit_lens,
    patching_heatmap,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS = ["<|endoftext|>", "The", " cat", "\n", " sat"]


def _main_axes(fig: Figure):
    # Axes holding an image that is not a colorbar axes.
    return [ax for ax in fig.axes if ax.images and not hasattr(ax, "_colorbar")]


def _tick_texts(ticklabels):
    return [t.get_text() for t in ticklabels]


def _render(fig: Figure) -> None:
    # Forces a full Agg draw so layout/text errors surface in the test.
    FigureCanvasAgg(fig).draw()


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 100
    assert data[:8] == PNG_MAGIC


def _random_pattern(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = np.tril(rng.random((n, n))) + np.eye(n) * 1e-3
    return raw / raw.sum(-1, keepdims=True)


@pytest.mark.parametrize(
    "tok, expected",
    [
        ("hello", "hello"),
        (" cat", "␣cat"),
        ("   x", "␣␣␣x"),
        ("\n", "\\n"),
        ("\n\n", "\\n\\n"),
        ("a\tb", "a\\tb"),
        (" a b", "␣a b"),
        ("it's", "it's"),
        ('say "hi"', 'say "hi"'),
        ("back\\slash", "back\\\\slash"),
        ("  ", "␣␣"),
        ("", '""'),
        ("é", "é"),
    ],
)
def test_format_token(tok, expected):
    assert format_token(tok) == expected


def test_public_api():
    assert set(plotting.__all__) == {
        "format_token",
        "attention_pattern",
        "attention_patterns",
        "patching_heatmap",
        "logit_lens",
        "induction_scores",
        "over_training",
        "save_png",
    }


def test_attention_pattern_content_with_torch_tensor(tmp_path):
    pat = torch.tensor(_random_pattern(len(TOKENS)), dtype=torch.float16)
    # A grad-requiring half->float tensor exercises detach/cpu/float conversion.
    pat_grad = pat.float().requires_grad_(True)
    save = tmp_path / "nested" / "dir" / "attn.png"
    fig = attention_pattern(pat_grad, TOKENS, title="L0H1", save=save)
    assert isinstance(fig, Figure)
    _render(fig)
    main = _main_axes(fig)
    assert len(main) == 1
    assert len(fig.axes) == 2  # heatmap + colorbar
    ax = main[0]
    expected_labels = [format_token(t) for t in TOKENS]
    assert _tick_texts(ax.get_xticklabels()) == expected_labels
    assert _tick_texts(ax.get_yticklabels()) == expected_labels
    assert "\\n" in expected_labels and "␣cat" in expected_labels
    assert all(t.get_rotation() == 90 for t in ax.get_xticklabels())
    assert ax.get_title() == "L0H1"
    assert ax.get_xlabel() == "key"
    assert ax.get_ylabel() == "query"
    im = ax.images[0]
    np.testing.assert_allclose(np.asarray(im.get_array()), pat.float().numpy(), rtol=1e-6)
    assert (im.norm.vmin, im.norm.vmax) == (0.0, 1.0)
    _assert_png(save)


def test_attention_pattern_numpy_and_no_title():
    pat = _random_pattern(3)
    fig = attention_pattern(pat, ["a", "b", "c"])
    ax = _main_axes(fig)[0]
    assert ax.get_title() == ""
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), pat)


def test_attention_pattern_draws_on_given_ax():
    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    out = attention_pattern(_random_pattern(2), ["x", "y"], ax=ax2, title="given")
    assert out is fig
    assert ax2.images and not ax1.images
    assert ax2.get_title() == "given"
    assert len(fig.axes) == 2  # no colorbar added to a caller-owned figure


@pytest.mark.parametrize("shape", [(4, 5), (5, 4), (4, 4)])
def test_attention_pattern_shape_mismatch(shape):
    with pytest.raises(ValueError) as err:
        attention_pattern(np.zeros(shape), TOKENS)
    msg = str(err.value)
    assert str(shape) in msg
    assert str(len(TOKENS)) in msg


def test_attention_pattern_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        attention_pattern(np.zeros((1, 5, 5)), TOKENS)


def test_attention_patterns_grid(tmp_path):
    n = 6
    pats = torch.tensor(np.stack([_random_pattern(len(TOKENS), seed=s) for s in range(n)]))
    labels = [f"L{i // 2}H{i % 2}" for i in range(n)]
    save = tmp_path / "sub" / "grid.png"
    fig = attention_patterns(pats, TOKENS, labels=labels, ncols=4, title="heads", save=save)
    _render(fig)
    main = _main_axes(fig)
    assert len(main) == n
    colorbars = [ax for ax in fig.axes if hasattr(ax, "_colorbar")]
    assert len(colorbars) == 1
    hidden = [ax for ax in fig.axes if not ax.get_visible()]
    assert len(hidden) == 2  # 2x4 grid, 6 used
    assert [ax.get_title() for ax in main] == labels
    for i, ax in enumerate(main):
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), pats[i].numpy())
        assert _tick_texts(ax.get_xticklabels()) == [format_token(t) for t in TOKENS]
    assert fig.get_suptitle() == "heads"
    _assert_png(save)


def test_attention_patterns_label_mismatch():
    with pytest.raises(ValueError, match="labels"):
        attention_patterns(np.zeros((3, 2, 2)), ["a", "b"], labels=["x", "y"])


def test_attention_patterns_token_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        attention_patterns(np.zeros((1, 2, 2)), ["a", "b", "c"], labels=["h"])


def test_patching_heatmap_layers_by_positions(tmp_path):
    vals = np.array([[0.1, -0.5, 0.2, 0.0], [2.0, -0.3, 0.4, -1.5], [0.0, 0.0, 0.3, 0.1]])
    toks = ["The", " cat", "\n", " sat"]
    rows = ["L0", "L1", "L2"]
    save = tmp_path / "a" / "b" / "patch.png"
    fig = patching_heatmap(
        torch.tensor(vals),
        row_labels=rows,
        col_labels=toks,
        xlabel="position",
        ylabel="layer",
        title="resid patching",
        save=save,
        cbar_label="logit diff",
    )
    _render(fig)
    main = _main_axes(fig)
    assert len(main) == 1 and len(fig.axes) == 2
    ax = main[0]
    im = ax.images[0]
    np.testing.assert_allclose(np.asarray(im.get_array()), vals)
    assert im.norm.vmin == pytest.approx(-2.0)
    assert im.norm.vmax == pytest.approx(2.0)
    assert im.get_cmap().name.startswith("RdBu")
    assert _tick_texts(ax.get_xticklabels()) == ["The", "␣cat", "\\n", "␣sat"]
    assert _tick_texts(ax.get_yticklabels()) == rows
    assert ax.get_xlabel() == "position"
    assert ax.get_ylabel() == "layer"
    assert ax.get_title() == "resid patching"
    cbar_ax = next(a for a in fig.axes if hasattr(a, "_colorbar"))
    assert cbar_ax.get_ylabel() == "logit diff"
    _assert_png(save)


def test_patching_heatmap_layers_by_heads_negative_max():
    vals = -np.abs(np.arange(12, dtype=float).reshape(3, 4)) - 0.5
    fig = patching_heatmap(
        vals,
        row_labels=[0, 1, 2],
        col_labels=[0, 1, 2, 3],
        xlabel="head",
        ylabel="layer",
    )
    ax = _main_axes(fig)[0]
    im = ax.images[0]
    m = np.abs(vals).max()
    assert (im.norm.vmin, im.norm.vmax) == (pytest.approx(-m), pytest.approx(m))
    assert im.norm.vmin == -im.norm.vmax
    assert _tick_texts(ax.get_xticklabels()) == ["0", "1", "2", "3"]
    assert ax.get_title() == ""
    cbar_ax = next(a for a in fig.axes if hasattr(a, "_colorbar"))
    assert cbar_ax.get_ylabel() == "metric"


def test_patching_heatmap_all_zero_guard():
    fig = patching_heatmap(
        np.zeros((2, 2)), row_labels=["a", "b"], col_labels=["c", "d"], xlabel="x", ylabel="y"
    )
    _render(fig)
    im = _main_axes(fig)[0].images[0]
    assert im.norm.vmax == pytest.approx(1e-12)
    assert im.norm.vmin == pytest.approx(-1e-12)


def test_patching_heatmap_label_mismatch():
    with pytest.raises(ValueError, match="col_labels"):
        patching_heatmap(np.zeros((2, 3)), row_labels=["a", "b"], col_labels=["c"], xlabel="x", ylabel="y")


def test_logit_lens_content(tmp_path):
    top = [
        [" the", "\n", "cat"],
        [" extraordinary", "sat", " on"],
    ]
    vals = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 1.0]])
    save = tmp_path / "lens" / "ll.png"
    fig = logit_lens(
        top,
        torch.tensor(vals, dtype=torch.float32),
        layer_labels=["L0", "L1"],
        position_labels=["The", " cat", "\n"],
        title="lens",
        save=save,
    )
    _render(fig)
    main = _main_axes(fig)
    assert len(main) == 1 and len(fig.axes) == 2
    ax = main[0]
    im = ax.images[0]
    np.testing.assert_allclose(np.asarray(im.get_array()), vals, rtol=1e-6)
    assert (im.norm.vmin, im.norm.vmax) == (0.0, 1.0)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts == {
        (0, 0): "␣the",
        (0, 1): "\\n",
        (0, 2): "cat",
        (1, 0): "␣extr…",
        (1, 1): "sat",
        (1, 2): "␣on",
    }
    assert all(len(t.get_text()) <= 6 for t in ax.texts)
    assert _tick_texts(ax.get_xticklabels()) == ["The", "␣cat", "\\n"]
    assert _tick_texts(ax.get_yticklabels()) == ["L0", "L1"]
    assert ax.get_xlabel() == "position"
    assert ax.get_ylabel() == "layer"
    assert ax.get_title() == "lens"
    cbar_ax = next(a for a in fig.axes if hasattr(a, "_colorbar"))
    assert cbar_ax.get_ylabel() == "p(top token)"
    _assert_png(save)


def test_logit_lens_shape_mismatch():
    with pytest.raises(ValueError, match="top_tokens"):
        logit_lens([["a", "b"]], np.zeros((1, 3)), layer_labels=["L0"], position_labels=["x", "y", "z"])
    with pytest.raises(ValueError, match="layer_labels"):
        logit_lens([["a"]], np.zeros((1, 1)), layer_labels=["L0", "L1"], position_labels=["x"])


def test_induction_scores_content(tmp_path):
    scores = np.array([[0.0, 0.123, 0.987], [0.5, 0.004, 0.666]])
    save = tmp_path / "ind" / "scores.png"
    fig = induction_scores(torch.tensor(scores), title="induction", save=save)
    _render(fig)
    main = _main_axes(fig)
    assert len(main) == 1 and len(fig.axes) == 2
    ax = main[0]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), scores)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts == {
        (0, 0): "0.00",
        (0, 1): "0.12",
        (0, 2): "0.99",
        (1, 0): "0.50",
        (1, 1): "0.00",
        (1, 2): "0.67",
    }
    assert ax.get_xlabel() == "head"
    assert ax.get_ylabel() == "layer"
    assert ax.get_title() == "induction"
    assert _tick_texts(ax.get_xticklabels()) == ["0", "1", "2"]
    assert _tick_texts(ax.get_yticklabels()) == ["0", "1"]
    _assert_png(save)


def test_save_none_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    induction_scores(np.eye(2))
    assert list(tmp_path.iterdir()) == []


def test_save_accepts_str_path(tmp_path):
    path = tmp_path / "s" / "t.png"
    induction_scores(np.eye(2), save=str(path))
    _assert_png(path)


def test_module_does_not_import_pyplot():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(plotting.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    code = "import sys, neox_lab.analysis.plotting; print('matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------- over_training
def test_over_training_draws_one_line_per_head_on_a_log_step_axis(tmp_path):
    steps = [0, 10, 100, 1000]
    scores = torch.rand(4, 2, 3)
    fig = plotting.over_training(steps, scores, ylabel="induction score", mark_step=100,
                                 mark_label="induction heads appear", save=tmp_path / "t.png")
    _render(fig)
    _assert_png(tmp_path / "t.png")
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_label().startswith("L")]
    assert [line.get_label() for line in lines] == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    np.testing.assert_array_equal(lines[4].get_xdata(), steps)
    np.testing.assert_allclose(lines[4].get_ydata(), scores[:, 1, 1].numpy())
    # Step 0 stays on the axis: symlog, linear below the first positive step.
    assert ax.get_xscale() == "symlog"
    # Heads of one layer share a colour; layers differ.
    assert lines[0].get_color() == lines[2].get_color() != lines[3].get_color()
    marks = [line for line in ax.get_lines() if line.get_label() == "induction heads appear"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [100, 100]
    assert ax.get_ylabel() == "induction score" and ax.get_xlabel() == "training step"


def test_over_training_single_series_and_log_scale_without_step_zero():
    fig = plotting.over_training([1, 2, 4], [0.5, 0.4, 0.1], labels=["icl"])
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [line.get_label() for line in ax.get_lines()] == ["icl"]


def test_over_training_rejects_mismatched_steps_and_missing_steps():
    with pytest.raises(ValueError, match="one step per row"):
        plotting.over_training([0, 1], torch.zeros(3, 2))
    with pytest.raises(ValueError, match="finite and >= 0"):
        plotting.over_training([0, None], torch.zeros(2))
    with pytest.raises(ValueError, match="labels has length 1"):
        plotting.over_training([0, 1], torch.zeros(2, 2), labels=["a"])
