"""ActivationCache: lookup, save/load, weak model reference, and the residual-stream decompositions."""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neox_lab import ActivationCache, NeoXConfig, NeoXForCausalLM, NeoXForTokenClassification
from neox_lab.testing.strategies import neox_configs, token_batches

configs = neox_configs(max_layers=3, max_heads=4, head_dims=(8, 16), vocab=(16, 96))
TOL = dict(atol=2e-5, rtol=1e-5)


def make_model(cfg, seed=0, cls=NeoXForCausalLM):
    torch.manual_seed(seed)
    model = cls(cfg, attn_backend="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def tiny_cfg(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64)
    return NeoXConfig(**{**base, **kw})


@pytest.fixture(params=[True, False], ids=["parallel", "sequential"])
def run(request):
    model = make_model(tiny_cfg(use_parallel_residual=request.param))
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    logits, cache = model.run_with_cache(ids)
    return model, ids, logits, cache


def draw_run(data, cfg, **cache_kw):
    model = make_model(cfg, seed=data.draw(st.integers(0, 2**16)))
    batch = data.draw(token_batches(cfg, max_batch=2, max_len=8))
    logits, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask, **cache_kw)
    return model, batch, logits, cache


# ----------------------------------------------------------------------------- mapping
def test_lookup_by_name_and_shorthand(run):
    model, ids, logits, cache = run
    cached = [n for n in model.hook_names() if not n.endswith("attn.hook_result")]  # opt-in, as in TL
    assert list(cache) == list(cache.keys()) == cached
    assert len(cache) == len(cached)
    assert dict(cache.items()).keys() == set(cache.keys())
    assert len(list(cache.values())) == len(cache)
    assert cache["resid_post", 2] is cache["blocks.2.hook_resid_post"]
    assert cache["resid_post", -1] is cache["blocks.2.hook_resid_post"]
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["scale", 2, "ln2"] is cache["blocks.2.ln2.hook_scale"]
    assert cache["scale", 1] is cache["blocks.1.ln1.hook_scale"]
    assert cache["scale"] is cache["ln_final.hook_scale"]
    assert cache["embed"] is cache["hook_embed"]
    assert torch.equal(cache["logits"], logits)
    assert ("z", 1) in cache and "hook_embed" in cache
    assert ("resid_mid", 0) in cache or model.cfg.use_parallel_residual
    assert "blocks.9.hook_resid_pre" not in cache and ("nonsense", 0) not in cache
    assert "activations" in repr(cache)


def test_missing_keys_explain_themselves(run):
    model, ids, _, _ = run
    _, cache = model.run_with_cache(ids, names_filter="blocks.0.attn.hook_z")
    with pytest.raises(KeyError, match=r"'blocks\.1\.hook_resid_pre' exists but was not cached.*hook_z"):
        cache["resid_pre", 1]
    with pytest.raises(KeyError, match=r"did you mean 'blocks\.0\.hook_resid_pre'"):
        cache["blocks.0.hook_resid_pr"]
    with pytest.raises(KeyError, match="unknown shorthand"):
        cache["nonsense", 0]
    with pytest.raises(KeyError, match="incl_bwd"):
        cache["z_grad", 0]
    if model.cfg.use_parallel_residual:
        with pytest.raises(KeyError, match="parallel residual"):
            cache["resid_mid", 0]


def test_gradients_by_shorthand():
    model = make_model(tiny_cfg())
    ids = torch.randint(0, 97, (1, 5))
    _, cache = model.run_with_cache(ids, labels=ids, incl_bwd=True, names_filter=lambda n: "resid" in n)
    assert cache["resid_post_grad", 1] is cache["blocks.1.hook_resid_post_grad"]
    assert cache["resid_post_grad", 1].shape == cache["resid_post", 1].shape


def test_to_returns_a_new_cache(run):
    model, ids, _, cache = run
    wide = cache.to("cpu", dtype=torch.float64)
    assert wide is not cache and wide["resid_pre", 0].dtype == torch.float64
    assert cache["resid_pre", 0].dtype == torch.float32
    assert torch.equal(wide["resid_pre", 0], cache["resid_pre", 0].double())
    assert wide.model is model


# ----------------------------------------------------------------------------- save / load, weak model
def test_save_load_round_trip(run, tmp_path):
    model, ids, _, cache = run
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    loaded = ActivationCache.load(path)
    assert list(loaded) == list(cache)
    assert all(torch.equal(loaded[k], cache[k]) for k in cache)
    assert loaded.cfg == model.cfg
    torch.testing.assert_close(loaded.decompose_resid(), cache.decompose_resid())
    with pytest.raises(RuntimeError, match="was not given"):
        loaded.apply_ln_to_stack(loaded.decompose_resid())
    attached = ActivationCache.load(path, model=model)
    lens = cache.accumulated_resid(apply_ln=True)
    torch.testing.assert_close(attached.accumulated_resid(apply_ln=True), lens)
    other = make_model(tiny_cfg(use_parallel_residual=not model.cfg.use_parallel_residual))
    with pytest.raises(ValueError, match="another config"):
        ActivationCache.load(path, model=other)


def test_save_copes_with_aliased_tensors(tmp_path):
    model = make_model(tiny_cfg(rotary_pct=0.0))  # nothing rotates: rot_k is k itself
    _, cache = model.run_with_cache(torch.randint(0, 97, (1, 4)), pos_slice=slice(1, 3))
    cache.save(tmp_path / "c.safetensors")
    loaded = ActivationCache.load(tmp_path / "c.safetensors")
    assert torch.equal(loaded["rot_k", 0], cache["k", 0])


def test_cache_holds_the_model_weakly():
    model = make_model(tiny_cfg())
    ids = torch.randint(0, 97, (1, 5))
    _, cache = model.run_with_cache(ids, names_filter=lambda n: not n.endswith("hook_result"))
    expected = cache.stack_head_results()
    del model
    gc.collect()
    assert cache._model_ref() is None  # the cache did not keep the model (and its weights) alive
    with pytest.raises(RuntimeError, match="garbage-collected"):
        cache.stack_head_results()
    assert cache.decompose_resid().shape[0] == 1 + 2 * 3  # activation-only methods still work
    model = make_model(tiny_cfg())
    cache.model = model
    torch.testing.assert_close(cache.stack_head_results(), expected)


# ----------------------------------------------------------------------------- decompositions
@given(cfg=configs, data=st.data())
def test_decompose_resid_sums_to_each_stream(cfg, data):
    model, batch, logits, cache = draw_run(data, cfg)
    n = cfg.num_hidden_layers
    stack, labels = cache.decompose_resid(return_labels=True)
    assert stack.shape == (1 + 2 * n, *cache["resid_post", -1].shape)
    assert labels[0] == "embed" and labels[-1] == f"{n - 1}_mlp_out"
    torch.testing.assert_close(stack.sum(0), cache["resid_post", -1], **TOL)
    for L in range(n):
        torch.testing.assert_close(cache.decompose_resid(L).sum(0), cache["resid_pre", L], **TOL)
        mlp_in, labels = cache.decompose_resid(L, mlp_input=True, return_labels=True)
        reads = cache["resid_pre", L] if cfg.use_parallel_residual else cache["resid_mid", L]
        torch.testing.assert_close(mlp_in.sum(0), reads, **TOL)
        assert (labels[-1] == f"{L}_attn_out") != cfg.use_parallel_residual
        # frozen-scale LayerNorm is linear: components' images + bias == what the LayerNorm output
        ln2 = model.model.blocks[L].ln2
        normed = cache.decompose_resid(L, mlp_input=True, apply_ln=True).sum(0) + ln2.bias
        torch.testing.assert_close(normed.detach(), cache["ln_out", L, "ln2"], **TOL)
    final = cache.decompose_resid(apply_ln=True).sum(0) + model.model.ln_final.bias
    torch.testing.assert_close(final.detach(), cache["ln_final.hook_ln_out"], **TOL)


@given(cfg=configs, data=st.data(), cache_result=st.booleans())
def test_stack_head_results_sum_to_attn_out(cfg, data, cache_result):
    keep = (lambda n: True) if cache_result else None  # None leaves hook_result out, as TransformerLens
    model, batch, _, cache = draw_run(data, cfg, names_filter=keep)
    n, h = cfg.num_hidden_layers, cfg.num_attention_heads
    stack, labels = cache.stack_head_results(return_labels=True)
    assert stack.shape == (n * h, *cache["attn_out", 0].shape)
    assert labels == [f"L{L}H{i}" for L in range(n) for i in range(h)]
    for L in range(n):
        bias = model.model.blocks[L].attn.out.bias
        heads = stack[L * h:(L + 1) * h].sum(0) + (0 if bias is None else bias.detach())
        torch.testing.assert_close(heads, cache["attn_out", L], **TOL)
    assert cache.stack_head_results(1).shape[0] == h
    if cache_result:  # both routes agree
        no_result = ActivationCache({k: v for k, v in cache.items() if not k.endswith("hook_result")}, model)
        torch.testing.assert_close(no_result.stack_head_results(), stack, **TOL)


@given(cfg=configs, data=st.data())
def test_accumulated_resid_is_a_logit_lens(cfg, data):
    model, batch, logits, cache = draw_run(data, cfg)
    n = cfg.num_hidden_layers
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == [f"{L}_pre" for L in range(n)] + ["final_post"]
    assert torch.equal(stack[-1], cache["resid_post", -1]) and torch.equal(stack[0], cache["resid_pre", 0])
    lens = cache.accumulated_resid(apply_ln=True)
    torch.testing.assert_close(lens[-1], cache["ln_final.hook_ln_out"], **TOL)
    torch.testing.assert_close(model.unembed(lens).detach()[-1], logits, **TOL)
    for L in range(n):
        upto = cache.accumulated_resid(L, apply_ln=True)
        assert upto.shape[0] == L + 1
        torch.testing.assert_close(upto[-1], cache["ln_out", L, "ln1"], **TOL)
    last = cache.accumulated_resid(apply_ln=True, pos_slice=-1)  # an int drops the pos axis
    torch.testing.assert_close(last, lens[:, :, -1], **TOL)


def test_accumulated_resid_incl_mid():
    seq = make_model(tiny_cfg(use_parallel_residual=False))
    _, cache = seq.run_with_cache(torch.randint(0, 97, (1, 4)))
    stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "final_post"]
    assert torch.equal(stack[1], cache["resid_mid", 0])
    assert cache.accumulated_resid(1, incl_mid=True, return_labels=True)[1] == ["0_pre", "0_mid", "1_pre"]
    par = make_model(tiny_cfg())
    _, cache = par.run_with_cache(torch.randint(0, 97, (1, 4)))
    with pytest.raises(ValueError, match="parallel residual"):
        cache.accumulated_resid(incl_mid=True)
    with pytest.raises(ValueError, match=r"layer must lie in \[0, 3\]"):
        cache.accumulated_resid(7)


# ----------------------------------------------------------------------------- logit attribution
@given(cfg=configs, data=st.data())
def test_logit_attrs_add_up_to_logits(cfg, data):
    model, batch, logits, cache = draw_run(data, cfg)
    ids = batch.input_ids
    stack = cache.decompose_resid()  # raw: logit_attrs applies the final LayerNorm's scaling itself
    W_U = model.unembed.weight.detach().T  # [d_model d_vocab]
    bias_logits = model.model.ln_final.bias.detach() @ W_U
    target = torch.roll(ids, -1, dims=1)
    attrs = cache.logit_attrs(stack, target)
    assert attrs.shape == (stack.shape[0], *ids.shape)
    expected = logits.gather(-1, target[..., None])[..., 0] - bias_logits[target]
    torch.testing.assert_close(attrs.sum(0), expected, **TOL)
    diff = cache.logit_attrs(stack, target, incorrect_tokens=ids)
    torch.testing.assert_close(diff, attrs - cache.logit_attrs(stack, ids), **TOL)
    one = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), 3, pos_slice=-1)
    torch.testing.assert_close(one.sum(0), logits[:, -1, 3] - bias_logits[3], **TOL)
    per_row = cache.logit_attrs(stack, ids[:, 0])
    torch.testing.assert_close(per_row[..., -1], cache.logit_attrs(stack, ids[:, :1].expand_as(ids))[..., -1])


def test_logit_attrs_needs_an_unembedding():
    model = make_model(tiny_cfg(), cls=NeoXForTokenClassification)
    _, cache = model.run_with_cache(torch.randint(0, 97, (1, 4)))
    with pytest.raises(TypeError, match="causal LM"):
        cache.logit_attrs(cache.decompose_resid(), 1)
    assert cache.stack_head_results().shape[0] == 3 * 4  # the body is found through any head class
