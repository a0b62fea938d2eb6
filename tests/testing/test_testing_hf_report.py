"""neox_lab vs transformers' GPTNeoX through the public pieces: `strategies` draw the configs, inputs
and seeded pairs, `compare` maps transformers' module outputs onto neox_lab hook names and holds each
stream to the derived noise floor, `assert_equivalent` names the first hook that leaves it.

The floors come from `neox_lab.testing.tolerance` (fp32 vs transformers-fp32 at width <= 128:
C sqrt(2) u32 (1 + sqrt(width)) sqrt(depth) ~ 3e-5 sqrt(depth)); see its docstring.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from neox_lab.hooks.registry import hook_names  # noqa: E402
from neox_lab.testing import assert_equivalent, compare  # noqa: E402
from neox_lab.testing.pairs import tiny_config  # noqa: E402
from neox_lab.testing.strategies import build_pair, neox_configs, paired_models, token_batches  # noqa: E402


@given(pair=paired_models(neox_configs(max_layers=3)), data=st.data())
def test_causal_lm_matches_transformers_hook_by_hook(pair, data):
    cfg = pair.cfg
    batch = data.draw(token_batches(cfg, max_len=min(24, 2 * cfg.max_position_embeddings)))
    report = compare(pair.neox, pair.hf, batch)
    assert_equivalent(report)
    # Every hook: read from transformers' modules or recomputed from them (sides.py); none skipped.
    assert [h.name for h in report.hooks] == list(hook_names(cfg)) and report.skipped == {}
    assert report.n_positions == int(batch.attention_mask.sum())


@given(cfg=neox_configs(max_layers=2), data=st.data(), seed=st.integers(0, 2**16))
@settings(max_examples=6)
def test_fp64_matches_transformers_within_its_fp32_softmax(cfg, data, seed):
    """transformers' eager softmax is fp32 even in fp64, so the policy counts that side as fp32.
    Left padding is left out (padded=False drops compare's own left-padded batch): there transformers'
    fp64 eager attention gives fully masked query rows NaN (softmax of -inf after the fp32 cast), which
    leaks into the real positions one layer later (test_testing_verdicts.py checks that report)."""
    hf, nx = build_pair(cfg, seed, dtype=torch.float64)
    batch = data.draw(token_batches(cfg, max_len=16, padding=("none", "right")))
    report = compare(nx, hf, batch, padded=False)
    assert report.tolerance.label == "float64/eager vs float32/hf-eager"
    assert_equivalent(report)


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification", "question_answering"])
def test_task_heads_match_transformers(task):
    cfg = tiny_config(pad_token_id=1, num_labels=3)
    hf, nx = build_pair(cfg, 3, task)
    ids = torch.randint(2, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 1  # right padding with the pad token, which sequence classification pools by
    report = compare(nx, hf, ids, attention_mask=mask)
    assert_equivalent(report)
    assert "hook_logits" in {h.name for h in report.hooks}


@pytest.mark.parametrize(("module", "first"), [("mlp.dense_h_to_4h", "mlp.hook_pre"),
                                               ("attention.dense", "attn.hook_result"),
                                               ("post_attention_layernorm", "ln2.hook_ln_out")])
def test_an_edit_on_the_transformers_side_is_located(module, first):
    """The mapping puts each transformers stream at its neox_lab name: an edit in layer 1 of
    transformers' model is found at the right hook of layer 1, with layer 0 exact to rounding."""
    cfg = tiny_config(num_hidden_layers=3)
    hf, nx = build_pair(cfg, 0)
    with torch.no_grad():
        hf.gpt_neox.layers[1].get_submodule(module).weight.mul_(1.5)
    report = compare(nx, hf, torch.randint(0, cfg.vocab_size, (2, 9)))
    assert report.first_divergence.name == f"blocks.1.{first}", report.table()
    assert all(h.passed for h in report.hooks if h.layer == 0)
