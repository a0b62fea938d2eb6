"""TransformerLens weight processing (fold_ln, center_writing_weights, center_unembed, fold_value_biases)
keeps next-token probabilities, on random NeoX configs (parallel and sequential residual, tied and
untied embeddings, with and without attention biases), random biases and LayerNorm parameters, and
sharp attention (weights ~ N(0, 0.3^2): attention logits of tens, near one-hot patterns).

Bounds. Each step is an exact identity in real arithmetic; processing rounds every weight once (in
fp64) and the forward then runs a reassociated computation. Rounding errors of a few u (u = 1.1e-16 in
fp64, 6e-8 in fp32) propagate through <= 3 blocks whose sharp softmaxes and GELUs amplify them: measured
worst over 60 random examples, log-probabilities moved by 1.5e-13 in fp64 (~1400 u) and 5.4e-5 in fp32
(~900 u). We assert 1e-11 in fp64 and 1e-3 in fp32 (about 10x the measured worst); a real folding bug
(a LayerNorm weight in the wrong place, a bias dropped) moves them by O(0.1).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neox_lab import CheckpointError, HookedTransformer, NeoXForCausalLM, NeoXForSequenceClassification, NeoXModel
from neox_lab.lens.processing import process_weights
from neox_lab.testing.pairs import make_trained_like, tiny_config
from neox_lab.testing.strategies import neox_configs

FP64_ABS = 1e-11
FP32_ABS = 1e-3
STEPS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


def randomize(model, seed: int = 0):
    """Random weights, biases and LayerNorm parameters at std 0.3: sharp attention on these tiny models."""
    return make_trained_like(model, seed, std=0.3, bias_std=0.3).eval()


def run(model, ids):
    with torch.no_grad():
        # Random ids may start with the pad token: the all-ones mask says no row is padded.
        return model.hf()(ids, attention_mask=torch.ones_like(ids)).logits


@given(cfg=neox_configs(max_layers=3, scaling=False), seed=st.integers(0, 2**16),
       steps=st.sets(st.sampled_from(STEPS), min_size=1))
@torch.no_grad()  # the checks read parameters; no graph
def test_processing_keeps_next_token_probabilities_fp64(cfg, seed, steps):
    model = HookedTransformer(randomize(NeoXForCausalLM(cfg, attn_backend="eager").double(), seed))
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before, cache_before = model.run_with_cache(ids)
    assert model.cfg.normalization_type == "LN"
    out = model.process_weights_(**{s: s in steps for s in STEPS})
    assert out is model and model.weights_processed == model.hf().weights_processed == set(steps)
    assert model.cfg.normalization_type == ("LNPre" if "fold_ln" in steps else "LN")  # as TransformerLens
    with torch.no_grad():
        after, cache_after = model.run_with_cache(ids)
    assert float((after.log_softmax(-1) - before.log_softmax(-1)).abs().max()) < FP64_ABS
    shift = after - before
    if "center_unembed" in steps:
        # Logits move by one constant per position, and W_U's columns sum to zero.
        assert float((shift - shift.mean(-1, keepdim=True)).abs().max()) < FP64_ABS
        assert float(model.W_U.sum(-1).abs().max()) < 1e-12 * float(model.W_U.abs().sum())
    else:
        assert float(shift.abs().max()) < FP64_ABS
    if cfg.tie_word_embeddings and steps & {"fold_ln", "center_writing_weights", "center_unembed"}:
        assert model.unembed.weight is not model.embed.weight and not model.config.tie_word_embeddings
        assert not model.cfg.tie_word_embeddings and model.hf().model.cfg is model.config
    if "fold_ln" in steps:
        for ln in [b.ln1 for b in model.blocks] + [b.ln2 for b in model.blocks] + [model.ln_final]:
            assert torch.equal(ln.weight, torch.ones_like(ln.weight))
            assert torch.equal(ln.bias, torch.zeros_like(ln.bias))
        # The LayerNorm inputs did not change unless writing weights were centred; the scale is what TL hooks.
        if "center_writing_weights" not in steps:
            for layer in range(cfg.num_hidden_layers):
                name = f"blocks.{layer}.ln1.hook_scale"
                assert torch.allclose(cache_after[name], cache_before[name], rtol=1e-12, atol=0)
        # Reading weights are centred over d_model, as TransformerLens leaves them.
        for w in (model.W_Q, model.W_K, model.W_V, model.W_in):
            assert float(w.mean(-2).abs().max()) < 1e-12
    if "center_writing_weights" in steps:
        for w in (model.W_E, model.W_O, model.W_out, model.b_out, model.b_O):
            assert float(w.mean(-1).abs().max()) < 1e-12
        assert float(cache_after["blocks.0.hook_resid_pre"].mean(-1).abs().max()) < 1e-12
    if "fold_value_biases" in steps:
        assert torch.equal(model.b_V, torch.zeros_like(model.b_V))


@given(cfg=neox_configs(max_layers=2, scaling=False), seed=st.integers(0, 2**16))
def test_processing_keeps_next_token_probabilities_fp32(cfg, seed):
    model = HookedTransformer(randomize(NeoXForCausalLM(cfg, attn_backend="eager"), seed))
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    before = run(model, ids).log_softmax(-1)
    after = run(model.process_weights_(), ids).log_softmax(-1)
    assert float((after - before).abs().max()) < FP32_ABS


@pytest.mark.parametrize("cls", [NeoXModel, NeoXForSequenceClassification])
def test_processing_other_classes_keeps_outputs(cls):
    """The processing function serves every class (HookedTransformer only views causal LMs)."""
    cfg = tiny_config(use_parallel_residual=False)
    model = randomize(cls(cfg, attn_backend="eager").double(), 3)
    ids = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        process_weights(model)
        after = model(ids)
    key = "last_hidden_state" if cls is NeoXModel else "logits"
    assert float((after[key] - before[key]).abs().max()) < FP64_ABS
    # Their final LayerNorm has no TransformerLens reader to fold into: its affine stays.
    assert not torch.equal(model.body.ln_final.weight, torch.ones_like(model.body.ln_final.weight))
    assert torch.equal(model.blocks[0].ln1.weight, torch.ones_like(model.blocks[0].ln1.weight))


def test_refactor_factored_attn_matrices_refuses_rotary():
    model = HookedTransformer(NeoXForCausalLM(tiny_config()))
    with pytest.raises(ValueError, match="rotary"):
        model.process_weights_(refactor_factored_attn_matrices=True)


def test_from_pretrained_processes_as_transformer_lens_does(tmp_path):
    """HookedTransformer.from_pretrained: TransformerLens' defaults (the four steps, float32, no bos);
    NeoXForCausalLM.from_pretrained: the weights transformers loads."""
    cfg = tiny_config()
    src = randomize(NeoXForCausalLM(cfg), 5)
    with torch.no_grad():
        src.model.ln_final.bias.zero_()  # so the processed model is still a transformers checkpoint
    src.save_pretrained(tmp_path / "raw")
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = NeoXForCausalLM.from_pretrained(tmp_path / "raw")
    raw = HookedTransformer.from_pretrained_no_processing(tmp_path / "raw")
    assert plain.weights_processed == raw.weights_processed == set()
    assert torch.equal(run(plain, ids), run(src, ids)) and torch.equal(run(raw, ids), run(src, ids))
    processed = HookedTransformer.from_pretrained(tmp_path / "raw")
    assert processed.weights_processed == set(STEPS) and processed.cfg.normalization_type == "LNPre"
    assert processed.cfg.default_prepend_bos is False and processed.cfg.dtype == torch.float32
    assert processed.cfg.model_name == "raw"
    assert torch.equal(run(processed, ids), run(HookedTransformer(plain).process_weights_(), ids))
    only_ln = HookedTransformer.from_pretrained(tmp_path / "raw", center_writing_weights=False, center_unembed=False,
                                                fold_value_biases=False)
    assert only_ln.weights_processed == {"fold_ln"}
    with pytest.raises(TypeError, match="HookedTransformer"):
        NeoXForCausalLM.from_pretrained(tmp_path / "raw", fold_ln=True)
    # A processed model without an unembedding bias is an ordinary checkpoint again.
    processed.hf().save_pretrained(tmp_path / "processed")
    again = NeoXForCausalLM.from_pretrained(tmp_path / "processed")
    assert torch.equal(run(again, ids), run(processed, ids))
    # hf_model=: the weights are copied, as TransformerLens converts them; the source stays unprocessed
    source = NeoXForCausalLM.from_pretrained(tmp_path / "raw")
    copied = HookedTransformer.from_pretrained("unused", hf_model=source)
    assert torch.equal(run(copied, ids), run(processed, ids))
    assert source.weights_processed == set() and torch.equal(run(source, ids), run(src, ids))


def test_save_refuses_a_folded_unembedding_bias(tmp_path):
    model = HookedTransformer(randomize(NeoXForCausalLM(tiny_config()), 1)).process_weights_()
    assert model.unembed.bias is not None and float(model.b_U.detach().abs().max()) > 0
    with pytest.raises(CheckpointError, match="unembed.bias"):
        model.hf().save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
