"""Hook points, run_with_hooks and run_with_cache: the hook contract, over random small configs.

Exactness: hooks that only read must not change a single bit of the forward pass (on CPU, fp32), so
those comparisons use torch.equal. Comparisons against transformers and autograd use fp32 tolerances.
"""

from __future__ import annotations

import collections
import tempfile

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neox_lab import (
    HookError,
    KVCache,
    NeoXForCausalLM,
    NeoXForQuestionAnswering,
    NeoXForSequenceClassification,
    NeoXForTokenClassification,
    NeoXModel,
    hook_names,
)
from neox_lab.testing.strategies import neox_configs, token_batches

configs = neox_configs(max_layers=3, max_heads=4, head_dims=(8, 16), vocab=(16, 96))
CLASSES = (NeoXModel, NeoXForCausalLM, NeoXForSequenceClassification, NeoXForTokenClassification,
           NeoXForQuestionAnswering)
EAGER_ONLY = ("hook_attn_scores", "hook_pattern")
EVERY_HOOK = lambda name: True  # noqa: E731 - names_filter=None leaves attn.hook_result out


def make_model(cfg, seed=0, cls=NeoXForCausalLM, backend="eager"):
    """A random model whose LayerNorms and biases are not the identity / zero, so every term matters."""
    torch.manual_seed(seed)
    model = cls(cfg, attn_backend=backend).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def draw_batch(data, cfg, padding=("none", "left", "right"), min_len=1):
    batch = data.draw(token_batches(cfg, max_batch=2, max_len=8, padding=padding))
    if batch.input_ids.shape[1] < min_len:
        ids = torch.randint(0, cfg.vocab_size, (batch.input_ids.shape[0], min_len))
        return ids, torch.ones_like(ids)
    return batch.input_ids, batch.attention_mask


def all_clean(model) -> bool:
    return all(not hp.fwd_fns and not hp.bwd_fns for hp in model.hook_dict.values())


# ----------------------------------------------------------------------------- registry
@given(cfg=configs)
def test_registry_matches_module_tree(cfg):
    for cls in CLASSES:
        model = cls(cfg)
        expected = hook_names(cfg, head=cls is not NeoXModel)
        assert model.hook_names() == list(expected), cls.__name__
        for name, hp in model.hook_dict.items():
            assert hp.name == name and hp.shape == expected[name]
            assert hp.layer == (int(name.split(".")[1]) if name.startswith("blocks.") else None)
        assert any(n.endswith("hook_resid_mid") for n in expected) != cfg.use_parallel_residual


@given(cfg=configs, data=st.data())
def test_each_hook_fires_once_in_registry_order(cfg, data):
    model = make_model(cfg)
    ids, mask = draw_batch(data, cfg)
    fired, grads = [], collections.Counter()
    fwd = [(lambda n: True, lambda x, hook: fired.append(hook.name))]
    bwd = [(lambda n: True, lambda g, hook: grads.update([hook.name]))]
    out = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=fwd, bwd_hooks=bwd)
    assert fired == model.hook_names()
    out.logits.sum().backward()
    assert grads == collections.Counter(model.hook_names())
    assert all_clean(model)


# ----------------------------------------------------------------------------- reading never changes anything
@given(cfg=configs, data=st.data())
def test_identity_hooks_are_bit_identical(cfg, data):
    model = make_model(cfg)
    ids, mask = draw_batch(data, cfg)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        for fn in (lambda x, hook: None, lambda x, hook: x):
            out = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(lambda n: True, fn)])
            assert torch.equal(out.logits, ref)
        logits, _ = model.run_with_cache(ids, attention_mask=mask, names_filter=EVERY_HOOK)
    assert torch.equal(logits, ref)


@given(cfg=configs, data=st.data())
def test_replacing_with_cached_values_is_identical(cfg, data):
    model = make_model(cfg)
    ids, mask = draw_batch(data, cfg)
    logits, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=EVERY_HOOK)

    def replace(x, hook):
        return cache[hook.name].clone()

    with torch.no_grad():
        # A replaced hook_result is summed over heads instead of going through the fused projection.
        out = model.run_with_hooks(ids, attention_mask=mask,
                                   fwd_hooks=[(lambda n: not n.endswith("hook_result"), replace)])
        assert torch.equal(out.logits, logits)
        out = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(lambda n: True, replace)])
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)


@given(cfg=configs, data=st.data())
def test_perturbing_one_hook_changes_downstream_only(cfg, data):
    model = make_model(cfg)
    ids, _ = draw_batch(data, cfg, padding=("none",), min_len=3)
    names = model.hook_names()
    target = data.draw(st.sampled_from(names))
    _, clean = model.run_with_cache(ids, names_filter=EVERY_HOOK)
    with model.hooks(fwd_hooks=[(target, lambda x, hook: x * 1.5 + 0.5)]):
        _, dirty = model.run_with_cache(ids, names_filter=EVERY_HOOK)
    i = names.index(target)
    for name in names[:i]:
        assert torch.equal(clean[name], dirty[name]), f"{name} is upstream of {target} but changed"
    assert not torch.equal(clean[target], dirty[target])
    assert not torch.equal(clean["hook_logits"], dirty["hook_logits"])


def test_rotary_follows_replaced_q_and_k():
    """A replaced q or k is what rotates. Rotation is linear and doubling is exact in floating point, so
    2q must give exactly 2 rot_q."""
    from neox_lab import NeoXConfig

    cfg = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64)
    model = make_model(cfg)
    ids = torch.randint(0, 97, (2, 7))
    names = ["blocks.1.attn.hook_rot_q", "blocks.1.attn.hook_rot_k"]
    _, clean = model.run_with_cache(ids, names_filter=names)
    for target, fn, expect_q, expect_k in [
        ("blocks.1.attn.hook_q", lambda x, hook: 2 * x, 2 * clean[names[0]], clean[names[1]]),
        ("blocks.1.attn.hook_k", lambda x, hook: torch.zeros_like(x), clean[names[0]], 0 * clean[names[1]]),
    ]:
        with model.hooks(fwd_hooks=[(target, fn)]):
            _, dirty = model.run_with_cache(ids, names_filter=names)
        assert torch.equal(dirty[names[0]], expect_q) and torch.equal(dirty[names[1]], expect_k), target


# ----------------------------------------------------------------------------- stream identities
@given(cfg=configs, data=st.data())
def test_stream_identities(cfg, data):
    model = make_model(cfg)
    ids, mask = draw_batch(data, cfg)
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    _, c = model.run_with_cache(ids, attention_mask=mask, names_filter=EVERY_HOOK)
    n, ch = cfg.num_hidden_layers, cfg.rotary_channels
    for L in range(n):
        if L + 1 < n:
            assert torch.equal(c["resid_post", L], c["resid_pre", L + 1])
        if cfg.use_parallel_residual:
            parts = c["resid_pre", L] + c["attn_out", L] + c["mlp_out", L]
            torch.testing.assert_close(c["resid_post", L], parts)
        else:
            torch.testing.assert_close(c["resid_mid", L], c["resid_pre", L] + c["attn_out", L])
            torch.testing.assert_close(c["resid_post", L], c["resid_mid", L] + c["mlp_out", L])
        assert torch.equal(c["rot_q", L][..., ch:], c["q", L][..., ch:])
        assert torch.equal(c["rot_k", L][..., ch:], c["k", L][..., ch:])
        assert torch.equal(out.hidden_states[L], c["resid_pre", L])
        for ln in ("ln1", "ln2"):
            w = getattr(model.model.blocks[L], ln).weight
            b = getattr(model.model.blocks[L], ln).bias
            torch.testing.assert_close(c["ln_out", L, ln], c["normalized", L, ln] * w + b)
        # pattern: rows of real queries sum to 1; masked (padding or future) keys get exactly 0
        pattern, scores = c["pattern", L], c["attn_scores", L]
        T = ids.shape[1]
        allowed = torch.ones(T, T).tril().bool()[None, None] & mask.bool()[:, None, None, :]
        assert (pattern[~allowed.expand_as(pattern)] == 0).all()
        assert torch.isneginf(scores[~allowed.expand_as(scores)]).all()
        live = allowed.any(-1).expand(-1, pattern.shape[1], -1)
        torch.testing.assert_close(pattern.sum(-1)[live], torch.ones(int(live.sum())))
    assert torch.equal(out.hidden_states[n], c["ln_final.hook_ln_out"])
    resid = c["resid_post", -1]
    centered = resid - resid.mean(-1, keepdim=True)
    var = centered.pow(2).mean(-1, keepdim=True)
    torch.testing.assert_close(c["scale"], (var + cfg.layer_norm_eps).sqrt())


# ----------------------------------------------------------------------------- against transformers
def hf_pair(cfg, seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_cfg = transformers.GPTNeoXConfig(**cfg.to_hf(), attn_implementation="eager")
    hf = transformers.GPTNeoXForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = NeoXForCausalLM.from_pretrained(path, attn_backend="eager").eval()
    return hf, ours


def hf_streams(hf, ids, mask, cfg):
    """q/k/v, rotated q/k, pattern, LayerNorm and residual streams of transformers' forward, by our names."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    rec, handles = {}, []

    def keep(key, pick=lambda out: out):
        return lambda module, args, out: rec.__setitem__(key, pick(out))

    body = hf.gpt_neox
    handles.append(body.rotary_emb.register_forward_hook(keep("cos_sin")))
    handles.append(body.final_layer_norm.register_forward_hook(keep("ln_final.hook_ln_out")))
    for L, layer in enumerate(body.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, L=L: rec.__setitem__(f"blocks.{L}.hook_resid_pre", args[0])))
        handles += [
            layer.register_forward_hook(keep(f"blocks.{L}.hook_resid_post")),
            layer.input_layernorm.register_forward_hook(keep(f"blocks.{L}.ln1.hook_ln_out")),
            layer.post_attention_layernorm.register_forward_hook(keep(f"blocks.{L}.ln2.hook_ln_out")),
            layer.attention.query_key_value.register_forward_hook(keep(f"qkv{L}")),
            layer.attention.register_forward_hook(keep(f"blocks.{L}.hook_attn_out", lambda o: o[0])),
            layer.attention.register_forward_hook(keep(f"blocks.{L}.attn.hook_pattern", lambda o: o[1])),
            layer.mlp.register_forward_hook(keep(f"blocks.{L}.hook_mlp_out")),
        ]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        with torch.no_grad():
            out = hf(ids, attention_mask=mask, position_ids=position_ids)
    finally:
        for h in handles:
            h.remove()
    rec["hook_logits"] = out.logits
    cos, sin = rec.pop("cos_sin")
    for L in range(cfg.num_hidden_layers):
        qkv = rec.pop(f"qkv{L}").view(*ids.shape, cfg.num_attention_heads, 3 * cfg.head_dim)
        q, k, v = qkv.chunk(3, dim=-1)
        rot_q, rot_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        for name, t in (("q", q), ("k", k), ("v", v), ("rot_q", rot_q.transpose(1, 2)),
                        ("rot_k", rot_k.transpose(1, 2))):
            rec[f"blocks.{L}.attn.hook_{name}"] = t
    return rec


@given(cfg=configs, data=st.data(), seed=st.integers(0, 2**16))
def test_cached_streams_match_transformers(cfg, data, seed):
    hf, ours = hf_pair(cfg, seed)
    ids, mask = draw_batch(data, cfg)
    ref = hf_streams(hf, ids, mask, cfg)
    _, cache = ours.run_with_cache(ids, attention_mask=mask, names_filter=EVERY_HOOK)
    live = mask.bool()  # padded positions compute nothing meaningful in either model
    for name, theirs in ref.items():
        ours_t = cache[name]
        if name.endswith("hook_pattern"):
            ours_t, theirs = ours_t.transpose(1, 2), theirs.transpose(1, 2)  # query rows first
        torch.testing.assert_close(ours_t[live], theirs[live], atol=2e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- gradients
@given(cfg=configs, data=st.data())
def test_backward_hooks_get_autograd_gradients(cfg, data):
    model = make_model(cfg)
    ids, mask = draw_batch(data, cfg, min_len=2)
    acts, grads = {}, {}
    fwd = [(lambda n: True, lambda x, hook: acts.__setitem__(hook.name, x))]
    bwd = [(lambda n: True, lambda g, hook: grads.__setitem__(hook.name, g.clone()))]
    out = model.run_with_hooks(ids, attention_mask=mask, labels=ids, fwd_hooks=fwd, bwd_hooks=bwd)
    names = list(acts)
    expected = torch.autograd.grad(out.loss, [acts[n] for n in names], retain_graph=True)
    out.loss.backward()
    for name, g in zip(names, expected, strict=True):
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=name)
    # run_with_cache's gradients against backward hooks on the same points: the same arithmetic, so
    # equal bit for bit. (Not against `grads` above: a backward hook on hook_result makes the heads'
    # sum the attention output, which moves fp32 gradients by rounding; fp64 measures that at 1e-15.)
    wanted = lambda n: "resid" in n or n.endswith("hook_z")  # noqa: E731
    same = {}
    model.zero_grad()
    model.run_with_hooks(ids, attention_mask=mask, labels=ids, fwd_hooks=[(wanted, lambda x, hook: None)],
                         bwd_hooks=[(wanted, lambda g, hook: same.__setitem__(hook.name, g.clone()))]).loss.backward()
    _, cache = model.run_with_cache(ids, attention_mask=mask, labels=ids, incl_bwd=True, names_filter=wanted)
    for name in cache:
        if name.endswith("_grad"):
            assert torch.equal(cache[name], same[name[: -len("_grad")]]), name
        else:
            assert not cache[name].requires_grad
    assert sum(n.endswith("_grad") for n in cache) == len(cache) // 2
    assert all_clean(model)


# ----------------------------------------------------------------------------- errors
@pytest.fixture
def tiny():
    from neox_lab import NeoXConfig

    cfg = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64)
    return make_model(cfg), torch.randint(0, 97, (2, 6))


def test_unknown_hook_name_suggests_close_match(tiny):
    model, ids = tiny
    with pytest.raises(KeyError, match=r"did you mean 'blocks\.1\.hook_resid_post'"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_psot", lambda x, hook: None)])
    assert all_clean(model)


def test_resid_mid_on_parallel_model_says_why(tiny):
    model, ids = tiny
    with pytest.raises(KeyError, match="parallel residual"):
        model.run_with_cache(ids, names_filter="blocks.0.hook_resid_mid")
    sequential = make_model(model.cfg.replace(use_parallel_residual=False))
    _, cache = sequential.run_with_cache(ids, names_filter="blocks.0.hook_resid_mid")
    assert list(cache) == ["blocks.0.hook_resid_mid"]


@pytest.mark.parametrize("bad", [lambda x: x[..., :-1], lambda x: x.double(), lambda x: "nope"])
def test_wrong_replacement_names_the_hook(tiny, bad):
    model, ids = tiny
    with pytest.raises(HookError, match=r"blocks\.1\.attn\.hook_v"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_v", lambda x, hook: bad(x))])
    assert all_clean(model)


@pytest.mark.parametrize("max_length", [None, 16])
def test_raising_hook_leaves_no_hook_and_kv_cache_unchanged(tiny, max_length):
    model, ids = tiny
    step = torch.randint(0, 97, (2, 1))
    kv = KVCache(model.cfg.num_hidden_layers, max_length=max_length)
    model(ids, past_key_values=kv, use_cache=True)
    keys = [k[:, :kv.length].clone() for k in kv.keys]
    lengths = list(kv.lengths)
    model.add_hook("hook_embed", lambda x, hook: None, permanent=True)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(step, past_key_values=kv, use_cache=True,
                             fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: None),
                                        ("blocks.1.attn.hook_z", boom)],
                             bwd_hooks=[("blocks.0.hook_mlp_out", lambda g, hook: None)])
    assert kv.lengths == lengths
    assert all(torch.equal(k[:, :kv.length], k0) for k, k0 in zip(kv.keys, keys, strict=True))
    assert [hp.name for hp in model.hook_dict.values() if hp.active] == ["hook_embed"]  # permanent stays
    model.reset_hooks(including_permanent=True)
    assert all_clean(model)
    # the cache still decodes exactly as one that never saw the failure
    fresh = KVCache(model.cfg.num_hidden_layers)
    model(ids, past_key_values=fresh, use_cache=True)
    assert torch.equal(model(step, past_key_values=kv).logits, model(step, past_key_values=fresh).logits)


def test_failing_forward_in_run_with_cache_detaches_hooks(tiny):
    model, ids = tiny
    with pytest.raises(ValueError):
        model.run_with_cache(ids + 1000)
    assert all_clean(model)


def test_incl_bwd_with_stop_at_layer_is_refused(tiny):
    model, ids = tiny
    with pytest.raises(ValueError, match="stop_at_layer"):
        model.run_with_cache(ids, incl_bwd=True, stop_at_layer=1)
    assert all_clean(model)


def test_add_hook_permanent_and_reset(tiny):
    model, ids = tiny
    seen = []
    model.add_hook("blocks.0.hook_attn_out", lambda x, hook: seen.append("tmp"))
    model.add_hook(lambda n: n == "hook_embed", lambda x, hook: seen.append("perm"), permanent=True)
    model(ids)
    model.reset_hooks()
    model(ids)
    assert seen == ["perm", "tmp", "perm"]
    model.reset_hooks(including_permanent=True)
    assert all_clean(model)
    with pytest.raises(ValueError, match="dir"):
        model.add_hook("hook_embed", lambda x, hook: None, dir="sideways")


# ----------------------------------------------------------------------------- run_with_cache options
@given(cfg=configs, data=st.data())
def test_run_with_cache_options(cfg, data):
    model = make_model(cfg)
    ids, mask = draw_batch(data, cfg, padding=("none",), min_len=3)
    logits, full = model.run_with_cache(ids)
    assert list(full) == [n for n in model.hook_names() if not n.endswith("attn.hook_result")]
    model.set_use_attn_result(True)  # TransformerLens' flag: no filter now caches hook_result too
    assert list(model.run_with_cache(ids)[1]) == model.hook_names()
    model.set_use_attn_result(False)
    assert not any(t.requires_grad for t in full.values())

    _, one = model.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
    assert list(one) == ["blocks.0.hook_resid_post"]
    wanted = ["hook_embed", "blocks.0.attn.hook_pattern"]
    _, some = model.run_with_cache(ids, names_filter=wanted)
    assert list(some) == wanted
    _, pred = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"))
    assert list(pred) == [f"blocks.{L}.attn.hook_z" for L in range(cfg.num_hidden_layers)]

    _, wide = model.run_with_cache(ids, names_filter="blocks.0.hook_mlp_out", device="cpu",
                                   dtype=torch.float64)
    assert wide["mlp_out", 0].dtype == torch.float64
    assert torch.equal(wide["mlp_out", 0], full["mlp_out", 0].double())

    pos_slice = data.draw(st.sampled_from([-1, 0, slice(1, 3)]))
    _, sliced = model.run_with_cache(ids, pos_slice=pos_slice)
    model_pos = {"hook_embed": 1, "blocks.0.attn.hook_pattern": 2, "blocks.0.attn.hook_q": 1,
                 "blocks.0.ln1.hook_scale": 1, "hook_logits": 1}
    # An int keeps the position axis (one position), as TransformerLens' Slice.unwrap makes it [int].
    sl = [pos_slice] if isinstance(pos_slice, int) else pos_slice
    for name, axis in model_pos.items():
        assert torch.equal(sliced[name], full[name][(slice(None),) * axis + (sl,)]), name
    assert sliced["pattern", 0].shape[-1] == ids.shape[1]  # key positions are never sliced

    stop = data.draw(st.integers(0, cfg.num_hidden_layers - 1))
    stream, early = model.run_with_cache(ids, stop_at_layer=stop)
    assert torch.equal(stream, full["resid_pre", stop])  # the stream entering block `stop`, as TransformerLens
    assert list(early) == [n for n in model.hook_names() if n == "hook_embed" or (
        n.startswith("blocks.") and int(n.split(".")[1]) < stop and not n.endswith("hook_result"))]
    assert all(torch.equal(early[n], full[n]) for n in early)
    assert all_clean(model)


# ----------------------------------------------------------------------------- other attention kernels
@given(cfg=configs, data=st.data())
def test_hooks_fire_identically_on_sdpa(cfg, data):
    eager, sdpa = make_model(cfg), make_model(cfg, backend="sdpa")
    ids, mask = draw_batch(data, cfg)
    not_eager_only = lambda n: not n.endswith(EAGER_ONLY)  # noqa: E731
    fired = collections.Counter()
    _, ref = eager.run_with_cache(ids, attention_mask=mask, names_filter=not_eager_only)
    with sdpa.hooks(fwd_hooks=[(not_eager_only, lambda x, hook: fired.update([hook.name]))]):
        _, got = sdpa.run_with_cache(ids, attention_mask=mask, names_filter=not_eager_only)
    assert fired == collections.Counter(ref.keys())
    live = mask.bool()
    for name in ref:
        torch.testing.assert_close(got[name][live], ref[name][live], atol=1e-5, rtol=1e-4, msg=name)


def test_pattern_on_sdpa_falls_back_to_eager_with_warning(tiny):
    eager, ids = tiny
    sdpa = make_model(eager.cfg, backend="sdpa")
    _, ref = eager.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    with pytest.warns(UserWarning, match="eager kernel"):
        _, got = sdpa.run_with_cache(ids, names_filter="blocks.1.attn.hook_pattern")
    # layer 0 ran sdpa (rounding differs); layer 1 materialised its pattern with the eager kernel
    torch.testing.assert_close(got["pattern", 1], ref["pattern", 1])
