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
    logits = model.run_with_hooks(ids, fwd_hooks=[
        ("blocks.0.attn.hook_attn_scores", knock_out),
        ("blocks.0.attn.hook_z", lambda z, hook: seen.__setitem__("z", z))]).logits
    assert model.attn_kernels()[0] == ("eager" if backend == "eager" else "eager (fallback)")
    assert torch.isfinite(logits).all()
    assert (seen["z"][:, 3, 1] == 0).all()



# ----------------------------------------------------------------------------- TransformerLens' cache helpers
@pytest.mark.parametrize("parallel", [True, False])
def test_full_resid_decomposition_sums_to_the_stream_read(parallel):
    model, _, _, cache = model_and_cache(parallel)
    for layer in (0, 1, 3):
        for mlp_input in ((False, True) if layer < 3 else (False,)):
            reads = cache._stream_into(layer, mlp_input)
            for expand in (True, False):
                stack, labels = cache.get_full_resid_decomposition(layer, mlp_input, expand_neurons=expand,
                                                                   return_labels=True)
                assert len(labels) == stack.shape[0] and labels[-2:] == ["embed", "bias"]
                torch.testing.assert_close(stack.sum(0), reads, **FP64)
            # frozen-scale LayerNorm is linear: the LayerNorm'd components plus its bias give its output
            normed = cache.get_full_resid_decomposition(layer, mlp_input, apply_ln=True).sum(0)
            prefix, path = cache._reader(layer, mlp_input)
            ln = model.body.get_submodule(path)
            torch.testing.assert_close(normed + ln.bias, ln(reads), **FP64)


@pytest.mark.parametrize("parallel", [True, False])
def test_neuron_and_head_stacks(parallel):
    model, _, _, cache = model_and_cache(parallel)
    mlp = model.body.blocks[1].mlp
    neurons = cache.get_neuron_results(1)
    torch.testing.assert_close(neurons.sum(-2) + mlp.fc_out.bias, cache["mlp_out", 1], **FP64)
    stack, labels = cache.stack_neuron_results(2, return_labels=True, incl_remainder=True)
    assert labels[:2] == ["L0N0", "L0N1"] and labels[-1] == "remainder" and stack.shape[0] == 2 * 64 + 1
    torch.testing.assert_close(stack.sum(0), cache["resid_pre", 2], **FP64)
    p = torch.randn(32, 3, dtype=torch.float64)
    folded = cache.stack_neuron_results(2, apply_ln=True, project_output_onto=p, pos_slice=-1)
    explicit = cache.apply_ln_to_stack(cache.stack_neuron_results(2, pos_slice=-1), 2, pos_slice=-1) @ p
    torch.testing.assert_close(folded, explicit, **FP64)
    heads, labels = cache.stack_head_results(2, incl_remainder=True, return_labels=True)
    assert labels[-1] == "remainder"
    torch.testing.assert_close(heads.sum(0), cache["resid_pre", 2], **FP64)
    assert cache.stack_head_results(0).shape == (0, 2, 7, 32)
    attn_only = cache.decompose_resid(2, mode="attn", incl_embeds=False, return_labels=True)[1]
    assert attn_only == ["0_attn_out", "1_attn_out"]
    assert cache.stack_activation("pattern").shape == (3, 2, 4, 7, 7)
    assert torch.equal(cache.stack_activation("resid_pre", 2)[1], cache["resid_pre", 1])
    _, small = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    assert "blocks.0.attn.hook_result" not in small  # as TransformerLens without use_attn_result
    small.compute_head_results()
    assert small["result", 0].shape == (1, 3, 4, 32)


def test_batch_dim_helpers():
    model, ids, logits, cache = model_and_cache(True)
    row = cache.apply_slice_to_batch_dim(1)
    assert not row.has_batch_dim and row["resid_pre", 0].shape == (7, 32)
    torch.testing.assert_close(row.accumulated_resid(apply_ln=True)[-1], cache.accumulated_resid(apply_ln=True)[-1, 1])
    attrs = row.logit_attrs(row.decompose_resid(), ids[1], has_batch_dim=False)
    torch.testing.assert_close(attrs, cache.logit_attrs(cache.decompose_resid(), ids)[:, 1], **FP64)
    _, one = model.run_with_cache(ids[:1], remove_batch_dim=True)
    assert not one.has_batch_dim and one["resid_post", 2].shape == (7, 32)
    with pytest.raises(ValueError, match="batch of 1"):
        cache.remove_batch_dim()
    kept = cache.apply_slice_to_batch_dim([1])
    assert kept.has_batch_dim and kept["resid_pre", 0].shape == (1, 7, 32)


def test_apply_ln_to_stack_is_transformerlens_formula_on_processed_weights():
    """TransformerLens divides the centred stack by the cached scale only; that is right once fold_ln has
    set the LayerNorm weight to 1 (and its bias to 0). neox_lab also multiplies by the weight, so on such
    weights both give the same numbers, and on unprocessed weights neox_lab's is the LayerNorm's own map."""
    model, _, _, cache = model_and_cache(True)
    stack = cache.decompose_resid(pos_slice=-1)
    ln = model.body.ln_final
    centered = stack - stack.mean(-1, keepdim=True)
    scale = cache["ln_final.hook_scale"][:, -1]
    torch.testing.assert_close(cache.apply_ln_to_stack(stack, pos_slice=-1), centered / scale * ln.weight, **FP64)
    with torch.no_grad():
        ln.weight.fill_(1.0)
        ln.bias.zero_()
    torch.testing.assert_close(cache.apply_ln_to_stack(stack, pos_slice=-1), centered / scale, **FP64)


def test_cache_analysis_fires_no_hooks():
    """accumulated_resid(apply_ln=True) recomputes LayerNorms without calling the modules, so hooks a
    user left attached (a permanent one, say) do not fire during an analysis."""
    model, _, _, cache = model_and_cache(True)
    fired = []
    model.add_perma_hook(lambda name: name.startswith("ln_final"), lambda x, hook: fired.append(hook.name))
    try:
        cache.accumulated_resid(apply_ln=True)
        cache.apply_ln_to_stack(cache.decompose_resid(), recompute_ln=True)
    finally:
        model.reset_hooks(including_permanent=True)
    assert fired == []
