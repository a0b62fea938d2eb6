"""Say what happened: a reference that gives NaN is named as the cause (with the settings of it that are
finite), not blamed on the candidate; a side after TransformerLens' weight processing is "same function,
different parametrisation", with its own exit status; a NaN in the candidate names the side and where."""

from __future__ import annotations

import copy

import pytest
import torch

from neox_lab import HookedTransformer, NeoXForCausalLM
from neox_lab.testing import EXIT_STATUS, REFERENCE_UNUSABLE, REPARAMETRISED, assert_equivalent, compare
from neox_lab.testing.pairs import build_pair, make_trained_like, tiny_config

CFG = tiny_config(num_hidden_layers=3)


@pytest.fixture(scope="module")
def ref64():
    torch.manual_seed(0)
    return make_trained_like(NeoXForCausalLM(CFG, attn_backend="eager").eval(), seed=0, std=0.2).double()


def _left_padded():
    ids = torch.randint(2, CFG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :2] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def test_a_nan_reference_is_named_and_a_working_setting_suggested():
    """transformers' eager attention in fp64 takes its softmax in fp32, where a left-padded row's -inf
    mask gives NaN; the NaN reaches real positions one layer later. neox_lab is finite."""
    hf, nx = build_pair(CFG, 0, dtype=torch.float64, trained_like=0.2)
    report = compare(nx, hf, _left_padded())
    assert report.verdict == REFERENCE_UNUSABLE and report.exit_status == EXIT_STATUS[REFERENCE_UNUSABLE] == 4
    summary = report.summary()
    assert summary.startswith("REFERENCE UNUSABLE: the reference is unusable on the main batch: non-finite on one "
                              "side only: model_b, transformers (eager, float64): NaN at ")
    assert "real positions of the main batch; model_a finite there" in summary
    assert "transformers (sdpa, float64) is finite on the same inputs (--backend-b sdpa)" in report.suggestions
    assert "main" in report.unusable_batches and report.first_divergence is None  # nothing blamed on model_a
    with pytest.raises(AssertionError, match="REFERENCE UNUSABLE"):
        assert_equivalent(report)


def test_a_nan_candidate_names_its_side_and_positions(ref64):
    broken = copy.deepcopy(ref64)

    def nan_at(t, *, hook):
        t = t.clone()
        if t.shape[1] > 3:
            t[0, 3] = float("nan")
        return t
    broken.add_hook("blocks.1.mlp.hook_post", nan_at, permanent=True)
    report = compare(broken, ref64, torch.randint(0, CFG.vocab_size, (2, 8)), decode_steps=0, probe_len=None)
    first = report.first_divergence
    assert first.name == "blocks.1.mlp.hook_post" and report.verdict == "not equivalent"
    assert first.nonfinite.startswith("non-finite on one side only: model_a, neox_lab (eager, float64): NaN at 1 "
                                      "of 16 real positions of the main batch; model_b finite there")


def test_a_processed_side_is_same_function_different_parametrisation(ref64):
    # TransformerLens' defaults, through its front door; compare runs the HookedTransformer's view of it.
    processed = HookedTransformer(copy.deepcopy(ref64)).process_weights_()
    report = compare(processed, ref64)
    assert report.verdict == REPARAMETRISED and report.exit_status == 3 and not report.equivalent
    assert report.summary().startswith("SAME FUNCTION, DIFFERENT PARAMETRISATION (center_unembed, "
                                       "center_writing_weights, fold_ln, fold_value_biases): the outputs agree")
    assert report.logits.passed_up_to_shift and not report.logits.passed  # center_unembed: a constant per row
    assert report.processed == {"model_a": ["center_unembed", "center_writing_weights", "fold_ln",
                                            "fold_value_biases"]}
    assert_equivalent(report, allow_reparametrisation=True)
    with pytest.raises(AssertionError, match="SAME FUNCTION"):
        assert_equivalent(report)
    # Without the record (a processed checkpoint saved and reloaded), the evidence alone says the same:
    # streams far past their bounds, outputs within rounding.
    processed.hf().weights_processed = set()
    assert compare(processed, ref64).verdict == REPARAMETRISED


def test_a_small_weight_change_is_not_called_a_reparametrisation(ref64):
    edited = copy.deepcopy(ref64).half()
    with torch.no_grad():
        edited.model.blocks[1].mlp.fc_in.weight[3, 5] *= 1.01
    report = compare(edited, ref64.float())
    assert report.verdict == "not equivalent" and report.weights.failures  # invisible in fp16 activations
