"""neox_lab vs transformers' GPTNeoX, over random configs and inputs: logits, loss, hidden states, attention.

Bounds. Both sides compute the same expression graph; they differ only in the order of some fp
operations (q is scaled before q.k rather than after, LayerNorm divides by sqrt(var + eps) rather than
multiplying by its reciprocal, a few sums are associated differently). Each such reordering perturbs a
result by a few units of roundoff u (2^-24 ~ 6e-8 in fp32, 2^-53 ~ 1.1e-16 in fp64), and the
perturbations propagate through at most 3 blocks whose Jacobians are O(1) for these random-init models
(weights ~ N(0, 0.02)). So we expect ||a - b|| / ||b|| of order 10-100 u: we assert 2e-5 in fp32
(~300 u) and 1e-12 in fp64 (~10^4 u, still 7 orders below any real bug). The fp64 test is what proves a
gap is rounding: a wrong rotary channel, mask or residual would show up at 1e-3 or more.

The task heads are compared in fp64: a head with one or two outputs can land near zero by cancellation
(terms ~0.2 summing to ~1e-4), where an fp32 relative error of 1e-3 is rounding, not a bug (hypothesis'
thorough profile found such a token-classification logit). Their losses are compared at fp32 precision:
transformers casts the logits to fp32 (`.float()`) before its loss functions, an fp64 model included.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from neox_lab.testing.strategies import build_pair, neox_configs, token_batches  # noqa: E402

FP32_REL = 2e-5
FP64_REL = 1e-12


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_causal(cfg, batch, seed, dtype, bound):
    hf, nx = build_pair(cfg, seed, "causal_lm", dtype=dtype)
    # A label is predicted from the previous position: drop labels whose predictor is padding, since
    # outputs at padded positions are unspecified (transformers and neox_lab differ there by design).
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(batch.attention_mask[:, :-1] == 0, -100)
    with torch.no_grad():
        ref = hf(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 labels=labels, output_hidden_states=True, output_attentions=True)
        out = nx(batch.input_ids, attention_mask=batch.attention_mask, labels=labels,
                 output_hidden_states=True, output_attentions=True)
    valid = batch.attention_mask.bool()
    assert rel(out.logits[valid], ref.logits[valid]) < bound
    if valid[:, 1:].any() and torch.isfinite(ref.loss):
        # transformers takes its loss in fp32 whatever the model dtype, so the loss gets the fp32 bound.
        assert abs(float(out.loss - ref.loss)) < FP32_REL * max(1.0, abs(float(ref.loss)))
    assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel(ours[valid], theirs[valid]) < bound
    for ours, theirs in zip(out.attentions, ref.attentions):
        rows = valid[:, None, :, None].expand_as(theirs)
        assert rel(ours[rows], theirs[rows]) < bound
        keys = valid[:, None, None, :].expand_as(ours)
        masked = ours[rows & ~keys]
        assert masked.numel() == 0 or float(masked.abs().max()) == 0.0  # masked keys get exactly zero


@given(cfg=neox_configs(), data=st.data(), seed=st.integers(0, 2**16))
def test_causal_lm_matches_transformers_fp32(cfg, data, seed):
    batch = data.draw(token_batches(cfg, max_len=min(32, 2 * cfg.max_position_embeddings)))
    compare_causal(cfg, batch, seed, torch.float32, FP32_REL)


@pytest.fixture
def hf_softmax_keeps_fp64(monkeypatch):
    """transformers' eager attention always takes its softmax in fp32 (even for fp64 inputs), which
    alone puts ~1e-9 between the two; neox_lab keeps fp64. Let transformers' softmax keep fp64 too so
    the fp64 comparison measures structure, not that one deliberate downcast."""
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and x.dtype == torch.float64:
            dtype = torch.float64
        return original(x, dim=dim, dtype=dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


@given(cfg=neox_configs(), data=st.data(), seed=st.integers(0, 2**16))
def test_causal_lm_matches_transformers_fp64(cfg, data, seed, hf_softmax_keeps_fp64):
    batch = data.draw(token_batches(cfg, max_len=min(32, 2 * cfg.max_position_embeddings)))
    compare_causal(cfg, batch, seed, torch.float64, FP64_REL)


@given(cfg=neox_configs(max_layers=2), data=st.data(), seed=st.integers(0, 2**16))
def test_sequence_classification_matches_transformers(cfg, data, seed, hf_softmax_keeps_fp64):
    cfg = cfg.replace(pad_token_id=1)
    batch = data.draw(token_batches(cfg, max_len=16, padding=("none", "left", "right")))
    hf, nx = build_pair(cfg, seed, "sequence_classification", dtype=torch.float64)
    labels = (torch.randn(batch.input_ids.shape[0], cfg.num_labels, dtype=torch.float64)
              if cfg.num_labels > 1 and seed % 2 else torch.randint(0, cfg.num_labels, (batch.input_ids.shape[0],)))
    if cfg.num_labels == 1:
        labels = torch.randn(batch.input_ids.shape[0], dtype=torch.float64)
    with torch.no_grad():
        ref = hf(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 labels=labels)
        out = nx(batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
    assert out.logits.shape == ref.logits.shape == (batch.input_ids.shape[0], cfg.num_labels)
    # Each row is read at its last token that is not the pad id (transformers' rule, both sides). A row
    # whose real tokens all equal the pad id is read at position 0, a padding position under left
    # padding, whose output is unspecified (see compare_causal).
    positions = torch.arange(batch.input_ids.shape[1])
    last = (positions * (batch.input_ids != cfg.pad_token_id)).argmax(-1)
    real = batch.attention_mask[torch.arange(len(last)), last].bool()
    assert rel(out.logits[real], ref.logits[real]) < FP64_REL
    if bool(real.all()):
        assert abs(float(out.loss - ref.loss)) < FP32_REL * max(1.0, abs(float(ref.loss)))


@given(cfg=neox_configs(max_layers=2), data=st.data(), seed=st.integers(0, 2**16))
def test_token_classification_matches_transformers(cfg, data, seed, hf_softmax_keeps_fp64):
    batch = data.draw(token_batches(cfg, max_len=16))
    hf, nx = build_pair(cfg, seed, "token_classification", dtype=torch.float64)
    labels = torch.randint(0, cfg.num_labels, batch.input_ids.shape).masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        ref = hf(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 labels=labels)
        out = nx(batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
    valid = batch.attention_mask.bool()
    assert rel(out.logits[valid], ref.logits[valid]) < FP64_REL
    assert abs(float(out.loss - ref.loss)) < FP32_REL * max(1.0, abs(float(ref.loss)))


@given(cfg=neox_configs(max_layers=2), data=st.data(), seed=st.integers(0, 2**16))
def test_question_answering_matches_transformers(cfg, data, seed, hf_softmax_keeps_fp64):
    batch = data.draw(token_batches(cfg, max_len=16, padding=("none", "right")))
    hf, nx = build_pair(cfg, seed, "question_answering", dtype=torch.float64)
    n, t = batch.input_ids.shape
    # Positions past the end exercise the clamp-and-ignore rule.
    start, end = torch.randint(0, t + 3, (n,)), torch.randint(0, t + 3, (n,))
    with torch.no_grad():
        ref = hf(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 start_positions=start, end_positions=end)
        out = nx(batch.input_ids, attention_mask=batch.attention_mask, start_positions=start, end_positions=end)
    valid = batch.attention_mask.bool()
    assert rel(out.start_logits[valid], ref.start_logits[valid]) < FP64_REL
    assert rel(out.end_logits[valid], ref.end_logits[valid]) < FP64_REL
    if torch.isfinite(ref.loss):
        assert abs(float(out.loss - ref.loss)) < FP32_REL * max(1.0, abs(float(ref.loss)))


@given(cfg=neox_configs(max_layers=2), data=st.data(), seed=st.integers(0, 2**16))
@settings(max_examples=6)
def test_base_model_matches_transformers(cfg, data, seed):
    batch = data.draw(token_batches(cfg, max_len=16, padding=("none",)))
    hf, nx = build_pair(cfg, seed, "base")
    with torch.no_grad():
        ref = hf(batch.input_ids).last_hidden_state
        out = nx(batch.input_ids).last_hidden_state
    assert rel(out, ref) < FP32_REL


@given(cfg=neox_configs(), data=st.data(), seed=st.integers(0, 2**16))
def test_left_padding_equals_unpadded_row(cfg, data, seed):
    """Position ids come from the mask, so a left-padded row computes exactly what it computes alone."""
    import neox_lab

    torch.manual_seed(seed)
    model = neox_lab.NeoXForCausalLM(cfg).eval()
    length = data.draw(st.integers(1, 12))
    n_pad = data.draw(st.integers(1, 6))
    ids = torch.randint(0, cfg.vocab_size, (1, length))
    padded = torch.cat([torch.zeros(1, n_pad, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, n_pad, dtype=torch.long), torch.ones(1, length, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(ids).logits
        left = model(padded, attention_mask=mask).logits[:, n_pad:]
    assert rel(left, alone) < FP32_REL


@given(cfg=neox_configs(max_layers=2), seed=st.integers(0, 2**16))
@settings(max_examples=8)
def test_saved_checkpoint_loads_in_transformers_with_identical_logits(cfg, seed, tmp_path_factory):
    import transformers

    import neox_lab

    torch.manual_seed(seed)
    model = neox_lab.NeoXForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("saved")
    model.save_pretrained(path)
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, hf(ids).logits)
        assert rel(model(ids).logits, hf(ids).logits) < FP32_REL
    again = neox_lab.NeoXForCausalLM.from_pretrained(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
