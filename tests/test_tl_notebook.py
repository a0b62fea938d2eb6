"""The TransformerLens notebook (experiments/transformerlens_notebook.py) runs on neox_lab alone, every cell,
and its results say what the TransformerLens lines mean (the cross-check compares them with TransformerLens
itself, number for number, where it is installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "transformerlens_notebook.py"


def load():
    spec = importlib.util.spec_from_file_location("transformerlens_notebook", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results():
    nb = load()
    grad = torch.is_grad_enabled()
    try:
        return nb, nb.notebook(nb.build_model())
    finally:
        torch.set_grad_enabled(grad)  # the notebook switches autodiff off, as such notebooks do


def test_the_notebook_lines_mean_what_they_mean_in_transformer_lens(results):
    nb, r = results
    assert r["cfg"][9:11] == (False, "LNPre")  # default_prepend_bos, normalization_type: as TransformerLens
    assert r["tokens"][0, 0] != 0 and r["str_tokens"][0] == "def"  # no BOS for a GPT-NeoX checkpoint
    assert r["str_tokens_bos"][0] == "<|endoftext|>"
    # model(tokens)[0][-1].argmax(): batch row 0, last position
    assert r["next_token"] == int(r["logits"][0, -1].argmax()) and isinstance(r["next_token_str"], str)
    assert r["logits"].shape == (1, r["tokens"].shape[1], r["cfg"][5])
    # run_with_cache() caches the patterns, which only the eager kernel materialises: fp32 rounding apart
    torch.testing.assert_close(r["cache_logits"], r["logits"], rtol=1e-5, atol=1e-5)
    assert r["pos_slice_int_shape"] == (1, 1, r["cfg"][2])  # run_with_cache(pos_slice=-1) keeps the axis
    assert torch.equal(r["run_with_cache_stop_at_layer"], r["resid_post_1"])  # the stream entering block 2
    assert isinstance(r["generate_greedy"], str) and r["generate_greedy"].startswith("import numpy as")
    assert r["generate_tokens"].shape == (1, r["tokens"].shape[1] + 5)
    assert r["induction_top"][0] == 1  # the shipped model's induction heads are in layer 1
    assert r["decompose_labels"][0] == "embed" and len(r["head_labels"]) == r["cfg"][0] * r["cfg"][1]
    torch.testing.assert_close(r["logit_attrs"], r["dla_components"], rtol=1e-5, atol=1e-5)


def test_patching_cells_agree_with_each_other(results):
    _, r = results
    grid = r["patch_resid_pre"]
    # The prompts differ at positions 3 and 5 ("width" and "height" swapped): patching the clean embedding
    # at any other position changes nothing (metric 0); at those two it moves the metric. fp32 rounding: 1e-4.
    differ = torch.tensor([p in (3, 5) for p in range(grid.shape[1])])
    assert float(grid[0][~differ].abs().max()) < 1e-4 and float(grid[0][differ].abs().min()) > 1e-2
    assert abs(float(r["patch_by_hand"]) - float(grid[1, 3])) < 1e-4
    torch.testing.assert_close(r["patch_block_every"][0], grid)
    assert r["attribution_values"][0] == pytest.approx(1.0, abs=1e-5)
    assert r["attr_resid_pre"].shape == grid.shape and r["attr_z"].shape == r["patch_heads_all_pos"].shape


def test_backward_hooks_on_one_stream_alone_fire(results):
    nb, r = results
    for cell in nb.BACKWARD_ALONE:
        assert r[cell] is not None, f"{cell}: the backward hook did not fire"
