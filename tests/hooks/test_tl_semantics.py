"""Names neox_lab shares with TransformerLens 3.x mean what they mean there (issue 13, items 1-4).

Every comparison is in fp64 on a random model with non-trivial LayerNorms and biases, so a misplaced
affine or a wrong scale shows far above rounding: the bound 1e-10 is ~1e5 ulps of fp64 over a few
dozen accumulations of O(1) values, while the errors these tests catch are O(0.1).
"""

from __future__ import annotations

import math

import pytest
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM

FP64 = dict(atol=1e-10, rtol=1e-10)


def model_and_cache(parallel=True, backend="eager", seed=0):
    cfg = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64,
                     use_parallel_residual=parallel)
    torch.manual_seed(seed)
    model = NeoXForCausalLM(cfg, attn_backend=backend).eval().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(seed + 1))
    logits, cache = model.run_with_cache(ids)
    return model, ids, logits, cache


def ln_by_hand(ln, x):
    """(standardised before the affine, after the affine) of LayerNorm `ln` on x, fp64."""
    centered = x - x.mean(-1, keepdim=True)
    standardized = centered / (centered.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    return standardized, standardized * ln.weight + ln.bias


@pytest.mark.parametrize("parallel", [True, False])
def test_hook_normalized_is_before_the_affine(parallel):
    model, _, _, cache = model_and_cache(parallel)
    body = model.body
    for L, block in enumerate(body.blocks):
        reads = {"ln1": cache["resid_pre", L],
                 "ln2": cache["resid_pre", L] if parallel else cache["resid_mid", L]}
        for which, x in reads.items():
            std, out = ln_by_hand(getattr(block, which), x)
            torch.testing.assert_close(cache[f"blocks.{L}.{which}.hook_normalized"], std, **FP64)
            torch.testing.assert_close(cache[f"blocks.{L}.{which}.hook_ln_out"], out, **FP64)
            torch.testing.assert_close(cache["normalized", L, which], std, **FP64)
    std, out = ln_by_hand(body.ln_final, cache["resid_post", -1])
    torch.testing.assert_close(cache["ln_final.hook_normalized"], std, **FP64)
    torch.testing.assert_close(cache["ln_final.hook_ln_out"], out, **FP64)
    assert not any(name.endswith("hook_standardized") for name in model.hook_names())


@pytest.mark.parametrize("parallel", [True, False])
def test_accumulated_resid_normalises_each_stream_by_its_own_scale(parallel):
    model, _, logits, cache = model_and_cache(parallel)
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    for i, name in enumerate(labels):
        raw = cache["resid_post", -1] if name == "final_post" else cache["resid_pre", int(name.split("_")[0])]
        torch.testing.assert_close(stack[i], model.body.ln_final(raw), **FP64)
    # the logit lens of the last stream is the model's own logits
    torch.testing.assert_close(model.unembed(stack[-1]), logits, **FP64)


def test_accumulated_resid_agrees_with_logit_lens():
    from neox_lab.analysis.logit_lens import logit_lens

    model, ids, _, cache = model_and_cache(True)
    lens = logit_lens(model, ids)
    probs = model.unembed(cache.accumulated_resid(apply_ln=True)).softmax(-1)
    torch.testing.assert_close(probs.max(-1).values.float(), lens.top_probs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("parallel", [True, False])
def test_logit_attrs_applies_the_final_ln_scale(parallel):
    """TransformerLens' DLA line: logit_attrs on the raw decomposition sums (with the LayerNorm bias's
    term) to the logit difference the model computes."""
    model, ids, logits, cache = model_and_cache(parallel)
    correct, wrong = ids[:, -1], ids[:, 0]
    stack = cache.decompose_resid(pos_slice=-1)
    assert stack.shape == (1 + 2 * 3, 2, 32)           # an int pos_slice drops the pos axis
    attrs = cache.logit_attrs(stack, correct, wrong, pos_slice=-1)
    assert attrs.shape == (7, 2)
    W = model.unembed.weight
    direction = W[correct] - W[wrong]
    bias_term = (model.body.ln_final.bias * direction).sum(-1)
    want = logits[:, -1].gather(-1, correct[:, None])[:, 0] - logits[:, -1].gather(-1, wrong[:, None])[:, 0]
    torch.testing.assert_close(attrs.sum(0) + bias_term, want, **FP64)
    # batch_slice and a batch-less stack (after remove_batch_dim) follow TransformerLens
    one = cache.logit_attrs(stack[:, :1], correct[:1], wrong[:1], pos_slice=-1, batch_slice=[0])
    torch.testing.assert_close(one, attrs[:, :1], **FP64)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_scores_hook_emptying_a_row_gives_zero_attention(backend):
    model, ids, _, _ = model_and_cache(True, backend=backend)

    def knock_out(scores, hook):
        scores = scores.clone()
        scores[:, 1, 3, :] = -math.inf       # head 1, query 3 may attend to nothing
        return scores

    seen = {}
    with pytest.warns(UserWarning, match="eager kernel") if backend != "eager" else _nothing():
        logits = model.run_with_hooks(ids, fwd_hooks=[
            ("blocks.0.attn.hook_attn_scores", knock_out),
            ("blocks.0.attn.hook_z", lambda z, hook: seen.__setitem__("z", z))]).logits
    assert torch.isfinite(logits).all()
    assert (seen["z"][:, 3, 1] == 0).all()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
