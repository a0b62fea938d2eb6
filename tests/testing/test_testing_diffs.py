"""The config and weight diffs of `compare`, the KL noise floor, and the JSON numbers.

Weight-diff bounds are exact (rounding to nearest moves an element by at most u |x|), so a cast
passes with no slack and any other change fails; edits here are 1e-3 relative, 10^4 x fp32's u.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from neox_lab import NeoXForCausalLM
from neox_lab.testing import compare, diff_configs, diff_weights
from neox_lab.testing.metrics import kl_noise
from neox_lab.testing.mutations import head_permutation, rotary_base
from neox_lab.testing.pairs import make_trained_like, tiny_config
from neox_lab.testing.report_json import clean

CFG = tiny_config(num_hidden_layers=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_trained_like(NeoXForCausalLM(CFG).eval(), seed=0, std=0.2)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))


def test_config_diff_separates_function_changing_fields():
    diffs = {d.name: d for d in diff_configs(CFG.replace(rotary_emb_base=10001.0, layer_norm_eps=1e-6,
                                                         hidden_dropout=0.1, use_parallel_residual=False), CFG)}
    assert set(diffs) == {"rope_theta", "layer_norm_eps", "hidden_dropout", "use_parallel_residual"}
    assert diffs["rope_theta"].changes_function and not diffs["rope_theta"].structural
    assert diffs["layer_norm_eps"].changes_function
    assert not diffs["hidden_dropout"].changes_function  # eval mode: no dropout
    assert diffs["use_parallel_residual"].structural


def test_cast_passes_the_weight_diff_and_one_element_does_not(model):
    assert diff_weights(copy.deepcopy(model).half(), model, CFG.num_attention_heads).passed
    assert diff_weights(copy.deepcopy(model).bfloat16(), model, CFG.num_attention_heads).passed
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.blocks[2].mlp.fc_out.weight[4, 9] *= 1 + 1e-3
    diff = diff_weights(edited, model, CFG.num_attention_heads)
    (bad,) = diff.failures
    assert (bad.name, bad.layer, bad.n_changed) == ("blocks.2.mlp.fc_out.weight", 2, 1)
    assert "layer 2, the MLP output weight" in bad.where()


def test_head_and_part_are_named(model, ids):
    broken, _ = head_permutation(model, layer=1, i=0, j=2)
    report = compare(broken, model, ids)
    (bad,) = report.weights.failures
    assert (bad.layer, bad.heads, bad.parts) == (1, [0, 2], ["query"])
    assert report.summary().startswith("NOT EQUIVALENT: layer 1, heads 0, 2, query rows of the fused QKV weight")
    first = report.first_divergence
    assert first.name == "blocks.1.attn.hook_q" and sorted(first.heads) == [0, 2]


def test_fp64_eager_vs_sdpa_is_equivalent_including_the_kl(model, ids):
    """Failed before: KL ~1e-16 (the noise of computing a KL in fp64) against a bound of ~1e-25."""
    eager = copy.deepcopy(model).double()
    eager.set_attn_backend("eager")  # "auto" is sdpa on CPU
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_backend("sdpa")
    report = compare(sdpa, eager, ids)
    assert report.logits.rel > 0  # the backends do differ, so the KL is computed from rounding noise
    assert report.equivalent, report.table()
    assert report.logits.kl_bound >= report.logits.kl_noise > 0


def test_kl_noise_is_the_order_of_fp64_rounding():
    logits = torch.randn(8, 50, dtype=torch.float64) * 5
    perturbed = logits * (1 + 1e-15 * torch.randn_like(logits))
    p = logits.log_softmax(-1)
    kl = (p.exp() * (p - perturbed.log_softmax(-1))).sum(-1).abs().max()
    assert kl <= kl_noise(logits) < 1e-12


def test_structural_difference_is_a_report_not_an_error(model, ids):
    other = NeoXForCausalLM(CFG.replace(use_parallel_residual=False)).eval()
    report = compare(other, model, ids)
    assert not report.equivalent and report.structural and report.hooks == []
    assert "use_parallel_residual" in report.summary()
    json.loads(report.to_json())


def test_json_numbers_are_numbers_and_non_finite_is_null_with_a_flag():
    data = clean({"rel": math.inf, "max_abs": 1.5, "nested": [{"kl": math.nan}]})
    assert data == {"rel": None, "rel_nonfinite": "inf", "max_abs": 1.5,
                    "nested": [{"kl": None, "kl_nonfinite": "nan"}]}


def test_lossy_mode_accepts_uniform_quantisation_but_not_a_zeroed_bias(model, ids):
    def int8(m):
        q = copy.deepcopy(m)
        with torch.no_grad():
            for p in q.parameters():
                if p.dim() == 2:
                    scale = p.abs().amax(-1, keepdim=True) / 127
                    p.copy_((p / scale).round() * scale)
        return q

    quantised = int8(model)
    assert not compare(quantised, model, ids).equivalent
    lossy = compare(quantised, model, ids, mode="lossy")
    assert lossy.equivalent, lossy.table()
    with torch.no_grad():
        quantised.model.blocks[1].attn.out.bias.zero_()
    broken = compare(quantised, model, ids, mode="lossy")
    assert not broken.equivalent
    assert [t.name for t in broken.weights.failures] == ["blocks.1.attn.out.bias"]


def test_long_probe_sees_a_rotary_base_change_that_short_inputs_hide():
    """rope_theta 10000 -> 10000.01 in fp32: at 8 positions the rotated q moves by a tenth of the measured
    fp32 floor (4 x the rounding of rot_q in fp32, ~3e-7); the angle error grows with the position, and
    at 512 it is past the floor. (At 10001, the old default, the measured floor sees it at 8 already.)"""
    cfg = tiny_config(num_hidden_layers=1, max_position_embeddings=1024, rotary_pct=1.0)
    torch.manual_seed(0)
    good = make_trained_like(NeoXForCausalLM(cfg).eval(), seed=0, std=0.2)
    bad, _ = rotary_base(good, factor=1 + 1e-6)
    short = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    report = compare(bad, good, short)
    assert all(h.passed for h in report.hooks), report.table()  # the activations alone miss it at 8
    assert report.probe_shape == [1, 512] and report.first_divergence in report.probe
    assert report.first_divergence.name == "blocks.0.attn.hook_rot_q"
    assert compare(bad, good, short, probe_len=None).first_divergence is None
