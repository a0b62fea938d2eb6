"""Backward hooks fire on every stream, whatever else is hooked, with autograd's gradient.

The reference for a stream's gradient is the plainest one autograd offers: a forward hook that hands on
a copy of the activation and keeps it (`retain_grad`), so nothing downstream can touch the tensor the
gradient is read from. A backward hook (and `run_with_cache(incl_bwd=True)`, built on them) must give
the same gradient for any subset of hooked streams: q, k, v, rot_q, rot_k (rotated in place inside the
fused projection when nobody watches them), the per-head inputs behind the stream flags, and the rest.

Exactness: fp64. The reference's copies change no arithmetic; where a hooked stream changes which
kernel runs (scores / pattern hooks put a layer on the eager kernel, a hooked hook_result sums the heads
instead of the fused projection) the two gradients are the same sums in another order, so they agree to
fp64 roundoff: we assert 1e-10 relative to the largest entry (~10^6 u; a lost or misrouted gradient is
O(1), a zero gradient is 100% off).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from neox_lab import NeoXForCausalLM
from neox_lab.hooks.registry import FLAG_HOOKS
from neox_lab.testing.pairs import make_trained_like
from neox_lab.testing.strategies import neox_configs, token_batches

configs = neox_configs(max_layers=2, max_heads=3, head_dims=(8, 16), vocab=(16, 64))
REL = 1e-10
#: The streams the in-place rotary touches, weighted up in the draws.
ROTARY_STREAMS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k")


def make_model(cfg, backend, flags, seed=0):
    model = make_trained_like(NeoXForCausalLM(cfg, attn_backend=backend).double().eval(), seed)
    for flag in flags:
        getattr(model, f"set_{flag}")(True)
    return model


def close(got, want, what):
    assert got is not None, f"{what}: no gradient"
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= REL * max(scale, 1e-30), f"{what}: max error {err:.3g} vs largest entry {scale:.3g}"


@st.composite
def hooked_setups(draw):
    cfg = draw(configs)
    flags = draw(st.sets(st.sampled_from(sorted(FLAG_HOOKS))))
    backend = draw(st.sampled_from(["eager", "sdpa"]))
    model = make_model(cfg, backend, flags, seed=draw(st.integers(0, 2**16)))
    names = model.hook_names()
    rotary = [n for n in names if n.endswith(ROTARY_STREAMS)]
    chosen = draw(st.lists(st.sampled_from(rotary), min_size=1, max_size=4, unique=True))
    chosen += draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
    chosen = [n for n in names if n in set(chosen)]  # forward order, no repeats
    batch = draw(token_batches(cfg, max_batch=2, max_len=6))
    return model, chosen, batch.input_ids, batch.attention_mask


def reference_grads(model, names, ids, mask):
    """d loss / d activation for each name, from kept copies."""
    kept = {}

    def keep(x, *, hook):
        y = x.clone()
        y.retain_grad()
        kept[hook.name] = y
        return y

    model.run_with_hooks(ids, attention_mask=mask, labels=ids, fwd_hooks=[(n, keep) for n in names]).loss.backward()
    return {n: kept[n].grad for n in names}


@given(setup=hooked_setups())
def test_backward_hooks_on_any_subset_get_autograd_gradients(setup):
    model, names, ids, mask = setup
    want = reference_grads(model, names, ids, mask)
    got = {}
    bwd = [(n, lambda g, hook: got.__setitem__(hook.name, g.clone())) for n in names]
    model.run_with_hooks(ids, attention_mask=mask, labels=ids, bwd_hooks=bwd).loss.backward()
    for name in names:
        close(got.get(name), want[name], f"backward hook on {name} (hooked: {names})")


@given(setup=hooked_setups())
def test_run_with_cache_incl_bwd_caches_a_gradient_for_every_stream(setup):
    model, names, ids, mask = setup
    want = reference_grads(model, names, ids, mask)
    _, cache = model.run_with_cache(ids, attention_mask=mask, labels=ids, incl_bwd=True, names_filter=names)
    assert sorted(cache.keys()) == sorted(names + [f"{n}_grad" for n in names])
    for name in names:
        close(cache[f"{name}_grad"], want[name], f"run_with_cache {name}_grad (cached: {names})")
