"""TransformerLens' stream flags: set_use_split_qkv_input, set_use_attn_in, set_use_hook_mlp_in.

What they must do: list their hook points only while on (and say which flag when one is named while
off), hold TransformerLens' streams (checked against TransformerLens itself in
tests/test_transformer_lens_crosscheck.py), let an edit of one head's copy reach only that head, and cost
nothing while off. Exactness: the flagged streams are copies, so "equal" is torch.equal; logits through
the per-head projection differ from the fused one by reassociation only, compared in fp64.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from neox_lab import (
    HookError,
    HookPoint,
    KVCache,
    NeoXConfig,
    NeoXForCausalLM,
    NeoXForSequenceClassification,
    NeoXModel,
    get_act_name,
    hook_names,
)
from neox_lab.hooks.registry import FLAG_HOOKS
from neox_lab.testing.pairs import make_trained_like
from neox_lab.testing.strategies import neox_configs, token_batches

configs = neox_configs(max_layers=2, max_heads=3, head_dims=(8, 16), vocab=(16, 64))
FLAGS = sorted(FLAG_HOOKS)
flag_sets = st.sets(st.sampled_from(FLAGS))


def make_model(cfg, seed=0, cls=NeoXForCausalLM, backend="eager", dtype=torch.float64, flags=()):
    model = make_trained_like(cls(cfg, attn_backend=backend).to(dtype).eval(), seed)
    for flag in flags:
        getattr(model, f"set_{flag}")(True)
    return model


def tiny_cfg(**kw):
    return NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64, **kw)


# ----------------------------------------------------------------------------- registry and errors
@given(cfg=configs, flags=flag_sets)
def test_hook_names_follow_the_flags(cfg, flags):
    for cls in (NeoXModel, NeoXForCausalLM, NeoXForSequenceClassification):
        model = make_model(cfg, cls=cls, dtype=torch.float32, flags=flags)
        assert model.stream_flags == frozenset(flags)
        for flag in FLAGS:
            assert getattr(model, flag) == (flag in flags)
        expected = hook_names(cfg, head=cls is not NeoXModel, flags=flags)
        assert model.hook_names() == list(expected) == list(model.hook_dict), cls.__name__
        assert all(model.hook_dict[n].shape == shape for n, shape in expected.items())
        # the module tree holds every hook point whatever the flags: the registry's flags=None
        tree = sorted(name.removeprefix("model.") for name, m in model.named_modules() if isinstance(m, HookPoint))
        assert tree == sorted(hook_names(cfg, head=cls is not NeoXModel, flags=None))
        per_head_ln1 = {"use_attn_in", "use_split_qkv_input"} & set(flags)
        assert any(".ln1." in n for n in expected) != bool(per_head_ln1)


def test_flagged_hooks_are_in_transformer_lens_order():
    cfg = tiny_cfg(use_parallel_residual=False)
    names = list(hook_names(cfg, flags=["use_attn_in", "use_split_qkv_input", "use_hook_mlp_in"]))
    block = [n.split(".", 2)[2] for n in names if n.startswith("blocks.0.")]
    assert block[:6] == ["hook_resid_pre", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input",
                         "attn.hook_q"]
    assert block[block.index("hook_resid_mid") + 1: block.index("hook_resid_mid") + 3] == [
        "hook_mlp_in", "ln2.hook_scale"]


def test_a_flagged_hook_named_while_off_says_which_flag():
    model, ids = make_model(tiny_cfg()), torch.randint(0, 97, (1, 5))
    for flag, points in FLAG_HOOKS.items():
        for point in points:
            name = f"blocks.1.{point}"
            assert name not in model.hook_dict and name not in model.hook_names()
            with pytest.raises(KeyError, match=rf"set_{flag}\(True\)"):
                model.run_with_hooks(ids, fwd_hooks=[(name, lambda x, hook: None)])
            with pytest.raises(KeyError, match=rf"set_{flag}\(True\)"):
                model.run_with_cache(ids, names_filter=[name])
            with pytest.raises(HookError, match=rf"set_{flag}\(True\)"):
                model.blocks[1].get_submodule(point).add(lambda x, hook: None)
            _, cache = model.run_with_cache(ids)
            with pytest.raises(KeyError, match=rf"set_{flag}\(True\)"):
                cache[name]
    assert model.stream_flags == frozenset()


def test_ln1_hooks_do_not_exist_while_heads_read_their_own_copies():
    model, ids = make_model(tiny_cfg()), torch.randint(0, 97, (1, 5))
    for flag in ("use_split_qkv_input", "use_attn_in"):
        getattr(model, f"set_{flag}")(True)
        with pytest.raises(KeyError, match="ln1 normalises each head's input separately"):
            model.run_with_cache(ids, names_filter="blocks.0.ln1.hook_scale")
        _, cache = model.run_with_cache(ids)
        assert not any(".ln1." in n for n in cache) and any(".ln2." in n for n in cache)
        getattr(model, f"set_{flag}")(False)
    _, cache = model.run_with_cache(ids)
    assert "blocks.0.ln1.hook_scale" in cache


def test_a_flag_change_that_would_strand_a_hook_is_refused():
    model = make_model(tiny_cfg())
    model.set_use_split_qkv_input(True)
    model.add_perma_hook("blocks.0.hook_k_input", lambda x, hook: None)
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_k_input.*reset_hooks"):
        model.set_use_split_qkv_input(False)
    assert model.use_split_qkv_input  # nothing half-done
    model.reset_hooks(including_permanent=True)
    model.use_split_qkv_input = False  # the attribute spelling goes through the setter
    model.add_hook("blocks.1.ln1.hook_normalized", lambda x, hook: None)
    with pytest.raises(ValueError, match=r"blocks\.1\.ln1\.hook_normalized"):
        model.set_use_attn_in(True)
    assert model.stream_flags == frozenset()
    with pytest.raises(TypeError, match="True or False"):
        model.set_use_hook_mlp_in("yes")


def test_shorthand_names():
    assert get_act_name("q_input", 3) == "blocks.3.hook_q_input"
    assert get_act_name("mlp_in", 0) == "blocks.0.hook_mlp_in"
    assert get_act_name("attn_in", 1) == "blocks.1.hook_attn_in"
    model = make_model(tiny_cfg(), flags=FLAGS)
    _, cache = model.run_with_cache(torch.randint(0, 97, (1, 5)))
    assert cache["v_input", -1] is cache["blocks.1.hook_v_input"]


# ----------------------------------------------------------------------------- free when off
class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_flags_off_cost_nothing():
    """An idle flag adds no tensor operation and never calls its hook points; toggling leaves no trace."""
    model, ids = make_model(tiny_cfg(), dtype=torch.float32), torch.randint(0, 97, (2, 5))
    called = []
    original = HookPoint.__call__

    def recording(self, x):
        called.append(self.name)
        return original(self, x)

    def ops():
        with torch.no_grad(), _Ops() as mode:
            model(ids)
        return mode.ops

    before = ops()
    for flag in FLAGS:
        getattr(model, f"set_{flag}")(True)
    assert ops() != before  # the probe sees the per-head work
    for flag in FLAGS:
        getattr(model, f"set_{flag}")(False)
    HookPoint.__call__ = recording
    try:
        assert ops() == before
    finally:
        HookPoint.__call__ = original
    flagged = {name for points in FLAG_HOOKS.values() for name in points}
    assert called and not [n for n in called if n.split(".", 2)[-1] in flagged]


# ----------------------------------------------------------------------------- what the streams hold
@given(cfg=configs, flags=flag_sets.filter(bool), data=st.data())
def test_flagged_streams_hold_copies_and_leave_the_function_unchanged(cfg, flags, data):
    off, on = make_model(cfg), make_model(cfg, flags=flags)
    batch = data.draw(token_batches(cfg, max_batch=2, max_len=6))
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        ref_logits, ref = off.run_with_cache(ids, attention_mask=mask)
        logits, got = on.run_with_cache(ids, attention_mask=mask)
    for layer in range(cfg.num_hidden_layers):
        resid_pre = got["resid_pre", layer]
        for flag in flags:
            for point in FLAG_HOOKS[flag]:
                x = got[f"blocks.{layer}.{point}"]
                if point == "hook_mlp_in":
                    source = resid_pre if cfg.use_parallel_residual else got["resid_mid", layer]
                    assert torch.equal(x, source)
                else:
                    assert torch.equal(x, resid_pre[:, :, None].expand_as(x))
    # Per-head projections reassociate the fused one's sums: fp64 roundoff, relative to the logits' size.
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() <= 1e-12 * scale
    for name in ("blocks.0.attn.hook_q", "blocks.0.attn.hook_v", "blocks.0.hook_mlp_out"):
        assert (got[name] - ref[name]).abs().max() <= 1e-12 * ref[name].abs().max(), name


@given(cfg=configs, data=st.data())
def test_an_edit_of_one_heads_copy_reaches_only_that_head(cfg, data):
    flag = data.draw(st.sampled_from(["use_split_qkv_input", "use_attn_in"]))
    model = make_model(cfg, flags=[flag])
    point = data.draw(st.sampled_from(sorted(FLAG_HOOKS[flag])))
    layer = data.draw(st.integers(0, cfg.num_hidden_layers - 1))
    head = data.draw(st.integers(0, cfg.num_attention_heads - 1))
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(layer))
    watched = [f"blocks.{layer}.attn.hook_{s}" for s in "qkv"]

    def edit(x, *, hook):
        x[:, :, head, : x.shape[-1] // 2] += 1.0  # in place: the hook was handed a copy

    with torch.no_grad():
        _, clean = model.run_with_cache(ids, names_filter=watched + [f"blocks.{layer}.hook_resid_pre"])
        with model.hooks(fwd_hooks=[(f"blocks.{layer}.{point}", edit)]):
            _, dirty = model.run_with_cache(ids, names_filter=watched + [f"blocks.{layer}.hook_resid_pre"])
    assert torch.equal(clean["resid_pre", layer], dirty["resid_pre", layer])  # a copy was edited, not the stream
    edited = "qkv" if point == "hook_attn_in" else point.removeprefix("hook_")[0]
    others = [h for h in range(cfg.num_attention_heads) if h != head]
    for stream, name in zip("qkv", watched, strict=True):
        assert torch.equal(clean[name][:, :, others], dirty[name][:, :, others]), name
        assert torch.equal(clean[name][:, :, head], dirty[name][:, :, head]) == (stream not in edited), name


@given(cfg=configs)
def test_an_edit_of_mlp_in_reaches_the_mlp_only(cfg):
    model = make_model(cfg, flags=["use_hook_mlp_in"])
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    layer = cfg.num_hidden_layers - 1
    names = [f"blocks.{layer}.{n}" for n in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")]

    def edit(x, *, hook):
        x[:, :, : x.shape[-1] // 2] += 1.0

    with torch.no_grad():
        _, clean = model.run_with_cache(ids, names_filter=names)
        with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_mlp_in", edit)]):
            _, dirty = model.run_with_cache(ids, names_filter=names)
    pre, attn, mlp, post = names
    assert torch.equal(clean[pre], dirty[pre]) and torch.equal(clean[attn], dirty[attn])
    assert not torch.equal(clean[mlp], dirty[mlp])
    # The edited copy feeds the MLP only: what resid_post carries besides mlp_out is unchanged.
    rest_clean, rest_dirty = clean[post] - clean[mlp], dirty[post] - dirty[mlp]
    assert (rest_clean - rest_dirty).abs().max() <= 1e-12 * clean[post].abs().max()


# ----------------------------------------------------------------------------- backends and decoding
@given(cfg=configs, flags=flag_sets.filter(bool), data=st.data())
def test_flags_on_sdpa_match_eager(cfg, flags, data):
    eager, sdpa = make_model(cfg, flags=flags), make_model(cfg, backend="sdpa", flags=flags)
    batch = data.draw(token_batches(cfg, max_batch=2, max_len=6))
    ids, mask = batch.input_ids, batch.attention_mask
    wanted = lambda n: "attn_scores" not in n and "pattern" not in n  # noqa: E731
    with torch.no_grad():
        ref_logits, ref = eager.run_with_cache(ids, attention_mask=mask, names_filter=wanted)
        logits, got = sdpa.run_with_cache(ids, attention_mask=mask, names_filter=wanted)
    assert sorted(got) == sorted(ref)
    live = mask.bool()
    for name in ref:  # sdpa's fused softmax differs from eager's by fp64 rounding
        assert (got[name][live] - ref[name][live]).abs().max() <= 1e-12 * (1 + ref[name][live].abs().max()), name
    assert (logits[live] - ref_logits[live]).abs().max() <= 1e-12 * ref_logits[live].abs().max()


@pytest.mark.parametrize("flags", [["use_split_qkv_input"], ["use_attn_in", "use_hook_mlp_in"], FLAGS])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_flags_with_kv_cache_decoding(flags, backend):
    """Step-by-step decoding equals the full forward, and the flagged hooks see each step's new positions."""
    cfg = tiny_cfg()
    model = make_model(cfg, backend=backend, flags=flags)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    name = f"blocks.1.{next(iter(FLAG_HOOKS[flags[0]]))}"

    def scale_head_0(x, *, hook):
        if x.dim() == 4:
            x[:, :, 0, :4] *= 3.0
        else:
            x[..., :4] *= 3.0

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, scale_head_0)]):
        full = model(ids).logits
        cache, seen, steps = KVCache(cfg.num_hidden_layers), [], []
        with model.hooks(fwd_hooks=[(name, lambda x, hook: seen.append(x.shape[1]))]):
            for start, end in itertools.pairwise([0, 4, 5, 6, 7]):
                steps.append(model(ids[:, start:end], past_key_values=cache, use_cache=True).logits)
    assert seen == [4, 1, 1, 1]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-12 * full.abs().max()
