"""The inputs `compare` adds to yours expose the input-dependent bugs at default settings: a left-padded
batch (a model that attends to pad keys) and a long probe through every layer (a 256-key sliding
window, which no input of 32 tokens can show). The main inputs here are what the CLI draws by default
(4 x 32 random ids, seed 0), on which both bugs compute exactly what the reference does."""

from __future__ import annotations

import pytest
import torch

from neox_lab import NeoXForCausalLM
from neox_lab.testing import compare
from neox_lab.testing.code_bugs import pad_keys_attended, sliding_window
from neox_lab.testing.mutations import named_place
from neox_lab.testing.pairs import make_trained_like, tiny_config

CFG = tiny_config(num_hidden_layers=2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return make_trained_like(NeoXForCausalLM(CFG, attn_backend="eager").eval(), seed=0, std=0.2)


@pytest.fixture(scope="module")
def cli_ids():
    return torch.randint(0, CFG.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))


def test_attending_to_pad_keys_fails_at_defaults(ref, cli_ids):
    bad, expected = pad_keys_attended(ref)
    report = compare(bad, ref, cli_ids)
    assert all(h.passed for h in report.hooks) and report.logits.passed  # no padding in the main batch
    assert not report.equivalent and named_place(report, expected), report.table()
    first = report.first_divergence
    assert (first.name, first.batch) == ("blocks.0.attn.hook_attn_scores", "left-padded")
    assert first.n_failing_positions == 48  # every real position of the 3 padded rows (8 + 16 + 24 pads of 32)
    assert "model_a attends" in first.nonfinite and "model_b masks (-inf)" in first.nonfinite
    assert not report.padded_logits.passed
    assert report.verdict == "not equivalent"  # the reference's -inf is a mask, not a broken reference


def test_a_256_key_window_fails_at_defaults_and_says_from_where(ref, cli_ids):
    bad, expected = sliding_window(ref)
    report = compare(bad, ref, cli_ids)
    assert all(h.passed for h in report.hooks + report.padded)  # 32 tokens never reach the window
    assert not report.equivalent and named_place(report, expected), report.table()
    first = report.first_divergence
    assert (first.name, first.batch, first.positions[0]) == ("blocks.0.attn.hook_z", "probe", 256)
    assert report.probe_shape == [1, 512]
    # every layer is probed, not block 0's rotary only
    assert {h.layer for h in report.probe} == {0, 1} and {h.name.split(".", 2)[2] for h in report.probe} == \
        {"attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z", "hook_resid_post"}
    assert "from position 256" in report.summary() and "long probe, 1x512" in report.summary()


def test_the_probe_is_capped_by_the_config_and_said_so():
    cfg = tiny_config(num_hidden_layers=1, max_position_embeddings=24)
    model = NeoXForCausalLM(cfg).eval()
    report = compare(model, model, torch.randint(0, cfg.vocab_size, (2, 24)))
    assert report.probe == [] and any("long probe skipped" in n for n in report.notes)
