"""Attention backends on CPU: "sdpa" against "eager" (fp32 and half, padding, KV cache, head_mask),
switching, "auto" and "flash" on CPU, the eager fallback for scores/pattern, dead rows. The flash kernel's
own bookkeeping is in test_flash_kernel.py, the CUDA-graph decoding step in test_fast_decode.py, and
everything that needs a GPU in test_gpu.py.

Bounds, fp32 (u = 2^-24 ~ 6e-8). "sdpa" and "eager" evaluate the same expression and differ only in
association: where the 1/sqrt(d_head) scale is applied, an online (running-max) softmax against a
two-pass one, and the order of the q.k and pattern.v sums (<= 64 terms here). Each attention output
then moves by a few u per element; through <= 3 blocks whose Jacobians are O(1) at these sizes the
normwise relative change of the logits is of order 10 u. A KV-cache step reads the same keys as the full
forward, in a different blocking, so the same holds. We assert FP32_REL = 1e-5 (~170 u; measured
<= 1.3e-6 over 150 examples per test): a wrong mask, position or head order moves logits by >= 1e-2.

Bounds, half. Every op rounds its output to the storage type (u = 2^-8 for bf16, 2^-11 for fp16).
Both backends share every rounding outside attention; inside it, "eager" rounds the scores and the
pattern to half where torch's fused CPU kernel keeps fp32 and rounds z once. A block has ~10 rounding
points, so first-order accumulation over <= 3 blocks gives ||x - x_fp32|| / ||x_fp32|| <~ 30 u for
either backend, and sdpa vs eager within twice that: HALF_REL = 60 u (bf16 0.23, fp16 0.029). Measured
over 100 examples per dtype: <= 4.5 u against fp32, <= 3.5 u between the backends. Loose, but a masking
or layout error is O(1) in relative terms.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from neox_lab import KVCache, NeoXConfig, NeoXForCausalLM
from neox_lab.model import kernels
from neox_lab.model.flash import FlashKernel
from neox_lab.model.kernels import AttnMask, eager_attention, resolve_backend, sdpa_attention
from neox_lab.testing.strategies import neox_configs, token_batches

FP32_REL = 1e-5
U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
HALF_REL_U = 60

TINY = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64, initializer_range=0.2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def model_for(cfg: NeoXConfig, seed: int, backend: str = "eager") -> NeoXForCausalLM:
    # initializer_range 0.2: peaked attention patterns, so a wrong mask cannot hide in near-uniform ones.
    torch.manual_seed(seed)
    return NeoXForCausalLM(cfg.replace(initializer_range=0.2), attn_backend=backend).eval()


def run(model, backend, *args, **kwargs):
    model.set_attn_backend(backend)
    with torch.no_grad():
        return model(*args, **kwargs)


# ------------------------------------------------------------------------------------------ sdpa vs eager
@given(cfg=neox_configs(), data=st.data(), seed=st.integers(0, 2**16))
def test_sdpa_matches_eager_fp32(cfg, data, seed):
    batch = data.draw(token_batches(cfg, max_len=32))
    model = model_for(cfg, seed)
    kw = dict(attention_mask=batch.attention_mask, output_hidden_states=True)
    ref, out = run(model, "eager", batch.input_ids, **kw), run(model, "sdpa", batch.input_ids, **kw)
    assert model.attn_kernels() == ["sdpa"] * cfg.num_hidden_layers
    # Every position, padding included: both backends give padding queries the same (defined) rows.
    assert rel(out.logits, ref.logits) < FP32_REL
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel(ours, theirs) < FP32_REL


@given(cfg=neox_configs(), data=st.data(), seed=st.integers(0, 2**16), backend=st.sampled_from(["sdpa", "eager"]),
       preallocate=st.booleans())
def test_kv_cache_decoding_matches_full_eager_forward(cfg, data, seed, backend, preallocate):
    """Prefill, several one-token steps, then a multi-token chunk: each call's logits equal the full
    eager forward's at those positions (left padding in the prompt, as generation has)."""
    batch = data.draw(token_batches(cfg, max_len=12, padding=("none", "left")))
    n_steps, chunk = data.draw(st.integers(1, 4)), data.draw(st.integers(2, 4))
    total = batch.input_ids.shape[1] + n_steps + chunk
    # Dynamic rotary scaling recomputes frequencies per call beyond max_position_embeddings, so cached
    # keys and a full forward legitimately differ there.
    assume(cfg.rope_scaling is None or cfg.rope_scaling["type"] != "dynamic" or total <= cfg.max_position_embeddings)
    model = model_for(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, cfg.vocab_size, (batch.input_ids.shape[0], n_steps + chunk), generator=g)
    ids = torch.cat([batch.input_ids, extra], 1)
    mask = torch.cat([batch.attention_mask, torch.ones_like(extra)], 1)
    ref = run(model, "eager", ids, attention_mask=mask).logits
    model.set_attn_backend(backend)
    cache = KVCache(cfg.num_hidden_layers, max_length=total if preallocate else None)
    bounds = [batch.input_ids.shape[1] + i for i in range(n_steps + 1)] + [total]
    start = 0
    with torch.no_grad():
        for end in bounds:
            out = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True)
            real = mask[:, start:end].bool()  # left-padding rows of the prompt are dead: zero on both sides
            assert rel(out.logits[real], ref[:, start:end][real]) < FP32_REL
            start = end
    assert cache.length == total


def test_set_attn_backend_switches_every_layer_and_heads_follow():
    model = model_for(TINY, 0)
    ids = torch.randint(0, 97, (2, 9))
    ref = run(model, "eager", ids).logits
    assert model.attn_kernels() == ["eager", "eager"]
    out = run(model, "sdpa", ids).logits
    assert model.attn_backend == model.model.attn_backend == "sdpa"
    assert model.attn_kernels() == ["sdpa", "sdpa"]
    assert rel(out, ref) < FP32_REL
    assert torch.equal(run(model, "eager", ids).logits, ref)
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        model.set_attn_backend("flash2")


def test_auto_resolves_to_sdpa_on_cpu_and_falls_back_silently():
    """transformers' default on CPU is sdpa; "auto" takes it too (same function to rounding), and a
    layer whose pattern is hooked runs eager for that call without the warning a named backend gives."""
    import warnings

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert resolve_backend("auto", torch.zeros(1, dtype=dtype)) == "sdpa"
    model = model_for(TINY, 0, backend="auto")
    ids = torch.randint(0, 97, (1, 5))
    out = run(model, "auto", ids).logits
    assert model.attn_kernels() == ["sdpa", "sdpa"]
    ref = run(model, "eager", ids).logits
    assert rel(out, ref) < FP32_REL
    model.set_attn_backend("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: None)])
    assert model.attn_kernels() == ["sdpa", "eager (fallback)"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_on_cpu_raises_a_clear_error(dtype):
    model = model_for(TINY, 0).to(dtype)
    with pytest.raises(ValueError, match="'flash' needs CUDA tensors in float16/bfloat16.*use 'eager' or 'sdpa'"):
        run(model, "flash", torch.randint(0, 97, (1, 5)))
    q = torch.zeros(1, 3, 2, 8, dtype=dtype)
    with pytest.raises(ValueError, match="needs CUDA"):
        FlashKernel()(q, q, q, AttnMask(3, 3, q.device), scale=1.0)


# ---------------------------------------------------------------------------------- eager fallback
def zero_head_0(pattern, *, hook):
    pattern = pattern.clone()
    pattern[:, 0] = 0.0
    return pattern


def test_pattern_hook_on_sdpa_runs_eager_for_that_layer_only():
    model = model_for(TINY, 0, backend="sdpa")
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with pytest.warns(UserWarning, match="layer 1: attention scores/pattern were requested"):
        out = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[("blocks.1.attn.hook_pattern", zero_head_0)])
    assert model.attn_kernels() == ["sdpa", "eager (fallback)"]
    eager = model_for(TINY, 0, backend="eager")
    ref = eager.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[("blocks.1.attn.hook_pattern", zero_head_0)])
    plain = eager(ids, attention_mask=mask)
    assert rel(out.logits, ref.logits) < FP32_REL
    assert rel(out.logits, plain.logits) > 1e-3  # the patch did something
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert model.attn_kernels() == ["sdpa", "sdpa"]  # hooks gone: back on the fast kernel
    with pytest.warns(UserWarning, match="layer 0: attention scores/pattern"):  # layer 1 warned already
        _, cache = model.run_with_cache(ids, attention_mask=mask,
                                        names_filter=lambda n: "pattern" in n or "scores" in n)
    _, ref_cache = eager.run_with_cache(ids, attention_mask=mask,
                                        names_filter=lambda n: "pattern" in n or "scores" in n)
    assert model.attn_kernels() == ["eager (fallback)", "eager (fallback)"]
    for name, value in ref_cache.items():
        finite = torch.isfinite(value)
        assert torch.equal(finite, torch.isfinite(cache[name]))
        assert rel(cache[name][finite], value[finite]) < FP32_REL


def _scale_in_place(x, *, hook):
    x[:, 0] *= 0.5


#: Hooks on scores / pattern. "read" only looks; the rest change the stream (in place, by a replacement).
PATTERN_HOOKS = {
    "read": lambda x, hook: None,
    "identity": lambda x, hook: x,
    "in_place": _scale_in_place,
    "replace": lambda x, hook: x * 0.5,
}


def _as_replacement(fn):
    """`fn` made to return a new tensor (its edit of a copy): no hook point can then take it as read-only."""
    def replace(x, *, hook):
        y = x.clone()
        out = fn(y, hook=hook)
        return y if out is None or out is y else out
    return replace


def _recorded(model, ids, names, hooks, **kw):
    """(logits, {name: activation}) of a forward with `hooks`, recording `names` after them."""
    store = {}
    record = [(n, lambda x, hook: store.__setitem__(hook.name, x.detach())) for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = model.run_with_hooks(ids, fwd_hooks=hooks + record, **kw).logits
    return logits, store


@given(cfg=neox_configs(max_layers=2, head_dims=(8, 16)), data=st.data(), seed=st.integers(0, 2**16),
       grad=st.booleans(), block_rows=st.sampled_from([1, 3, 64]))
def test_scores_and_pattern_hooks_on_sdpa_equal_eager(cfg, data, seed, grad, block_rows, monkeypatch):
    """Every kind of scores/pattern hook, with autograd and without (where the eager kernel runs by
    causal blocks, as far as the hooks leave the streams as they were), on sdpa (its fallback): the
    streams and logits of the eager kernel's dense, differentiable form with the same edits made as
    replacements. fp64, 1e-12 relative (the forms reassociate the same sums)."""
    monkeypatch.setattr(kernels, "MIN_BLOCK_ROWS", block_rows)  # small blocks: several per short input
    batch = data.draw(token_batches(cfg, max_len=12))
    kw = dict(attention_mask=batch.attention_mask)
    sdpa, eager = model_for(cfg, seed, "sdpa").double(), model_for(cfg, seed, "eager").double()
    names = data.draw(st.lists(st.sampled_from([n for n in sdpa.hook_names() if n.endswith(("scores", "pattern"))]),
                               min_size=1, unique=True))
    kinds = {n: data.draw(st.sampled_from(sorted(PATTERN_HOOKS)), label=n) for n in names}
    hooks = [(n, PATTERN_HOOKS[k]) for n, k in kinds.items()]
    watched = [n for n in sdpa.hook_names() if n.endswith(("scores", "pattern", "hook_z"))]
    with torch.set_grad_enabled(grad):
        logits, got = _recorded(sdpa, batch.input_ids, watched, hooks, **kw)
    with torch.enable_grad():
        ref_logits, want = _recorded(eager, batch.input_ids, watched, [(n, _as_replacement(f)) for n, f in hooks], **kw)
    assert rel(logits, ref_logits) < 1e-12
    for name, value in want.items():
        finite = torch.isfinite(value)
        assert torch.equal(finite, torch.isfinite(got[name])), name
        assert rel(got[name][finite], value[finite]) < 1e-12, name
    assert sdpa.attn_kernels() == ["eager (fallback)"] * cfg.num_hidden_layers  # recording reads them all


@given(data=st.data(), block_rows=st.sampled_from([1, 2, 5, 64]))
def test_blockwise_eager_kernel_equals_the_dense_one(data, block_rows, monkeypatch):
    """The no-grad eager kernel by causal blocks against its differentiable dense form: a KV-cache offset
    (fewer queries than keys), padding anywhere (dead rows included), head_mask. fp64, 1e-12 relative."""
    monkeypatch.setattr(kernels, "MIN_BLOCK_ROWS", block_rows)
    batch, heads, d_head = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), 4
    k_len = data.draw(st.integers(1, 12))
    q_len = data.draw(st.integers(1, k_len))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k, v = (torch.randn(batch, n, heads, d_head, generator=g, dtype=torch.float64) for n in (q_len, k_len, k_len))
    key_mask = torch.rand(batch, k_len, generator=g) < data.draw(st.sampled_from([0.5, 1.0]))
    mask = AttnMask(q_len=q_len, k_len=k_len, device=q.device, key_mask=None if key_mask.all() else key_mask)
    head_mask = data.draw(st.sampled_from([None, torch.rand(heads, generator=g, dtype=torch.float64)]))
    with torch.no_grad():
        z, pattern = eager_attention(q, k, v, mask, scale=0.5, head_mask=head_mask)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_z, ref_pattern = eager_attention(*leaves, mask, scale=0.5, head_mask=head_mask)
    assert torch.equal(pattern == 0, ref_pattern == 0)  # the same keys masked, the same rows dead
    assert rel(pattern, ref_pattern) < 1e-12 and rel(z, ref_z) < 1e-12


def test_a_backward_hook_on_the_pattern_gets_the_eager_gradient():
    model = model_for(TINY, 2, "sdpa").double()
    eager = model_for(TINY, 2, "eager").double()
    ids = torch.randint(0, 97, (2, 6))
    grads = {}
    name = "blocks.0.attn.hook_pattern"
    for m in (model, eager):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = m.run_with_hooks(ids, labels=ids, bwd_hooks=[(name, lambda g, hook, m=m: grads.__setitem__(m, g))])
        out.loss.backward()
    assert rel(grads[model], grads[eager]) < 1e-12


def test_output_attentions_on_sdpa_equal_eager():
    model = model_for(TINY, 1, backend="sdpa")
    ids = torch.randint(0, 97, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    with pytest.warns(UserWarning, match="eager kernel"):
        out = run(model, "sdpa", ids, attention_mask=mask, output_attentions=True)
    ref = run(model, "eager", ids, attention_mask=mask, output_attentions=True)
    for ours, theirs in zip(out.attentions, ref.attentions):
        assert rel(ours, theirs) < FP32_REL


@given(cfg=neox_configs(max_layers=2), data=st.data(), seed=st.integers(0, 2**16))
def test_head_mask_on_sdpa_equals_eager(cfg, data, seed):
    batch = data.draw(token_batches(cfg, max_len=16))
    g = torch.Generator().manual_seed(seed)
    head_mask = torch.rand(cfg.num_hidden_layers, cfg.num_attention_heads, generator=g)
    head_mask[head_mask < 0.3] = 0.0
    model = model_for(cfg, seed)
    kw = dict(attention_mask=batch.attention_mask, head_mask=head_mask)
    assert rel(run(model, "sdpa", batch.input_ids, **kw).logits,
               run(model, "eager", batch.input_ids, **kw).logits) < FP32_REL


# ------------------------------------------------------------------------------------------ half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@given(cfg=neox_configs(max_layers=3, head_dims=(8, 16)), data=st.data(), seed=st.integers(0, 2**16))
def test_half_precision_sdpa_and_eager_track_fp32(dtype, cfg, data, seed):
    batch = data.draw(token_batches(cfg, max_len=16))
    model = model_for(cfg, seed)
    kw = dict(attention_mask=batch.attention_mask)
    ref = run(model, "eager", batch.input_ids, **kw).logits
    model.to(dtype)
    eager = run(model, "eager", batch.input_ids, **kw).logits
    sdpa = run(model, "sdpa", batch.input_ids, **kw).logits
    real = batch.attention_mask.bool()
    bound = HALF_REL_U * U[dtype]
    assert torch.isfinite(eager).all() and torch.isfinite(sdpa).all()
    assert rel(eager[real], ref[real]) < bound / 2
    assert rel(sdpa[real], ref[real]) < bound / 2
    assert rel(sdpa[real], eager[real]) < bound


@pytest.mark.parametrize("kernel", [eager_attention, sdpa_attention], ids=["eager", "sdpa"])
def test_fp16_scores_that_would_overflow_unscaled_stay_finite(kernel):
    """q.k reaches ~1.6e5 > 65504 (fp16 max) but q.k / sqrt(d_head) = 2e4 does not: scaling q first
    (eager) or inside the kernel (sdpa) keeps 2048-token fp16 attention finite and exact."""
    torch.manual_seed(0)
    d, n = 64, 2048
    q = torch.randn(1, n, 2, d)
    k = torch.randn(1, n, 2, d)
    q, k = 50 * q / q.norm(dim=-1, keepdim=True), 50 * k / k.norm(dim=-1, keepdim=True)  # |q.k| <= 2500 ...
    q = q * 64  # ... then 1.6e5 at most: overflows in fp16 unless scaled before the product
    v = torch.randn(1, n, 2, d)
    mask = AttnMask(n, n, q.device)
    half = kernel(q.half(), k.half(), v.half(), mask, scale=d**-0.5)
    z = half[0] if isinstance(half, tuple) else half
    ref = eager_attention(q.double(), k.double(), v.double(), mask, scale=d**-0.5)[0]
    assert torch.isfinite(z).all()
    # fp16 inputs (u = 4.9e-4) with scores ~1e4: the input rounding moves scores by ~1e4 u = 5, so the
    # one-hot-like softmax can swap winners on near ties; compare normwise, loosely.
    assert rel(z.double(), ref) < 0.2


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_dead_rows_are_zero_not_nan(backend):
    model = model_for(TINY, 2, backend=backend)
    ids = torch.randint(0, 97, (3, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6, [0] * 6])  # left padding, none, all padding
    _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n.endswith("hook_z"))
    assert model.attn_kernels() == [backend] * 2
    for name, z in cache.items():
        assert torch.isfinite(z).all(), name
        dead = torch.tensor([[1, 1, 1, 0, 0, 0], [0] * 6, [1] * 6]).bool()
        assert float(z[dead].abs().max()) == 0.0, name
    assert torch.isfinite(run(model, backend, ids, attention_mask=mask).logits).all()


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_autocast_keeps_q_k_v_in_the_autocast_dtype(backend):
    """Under autocast the projections give bf16 while rotary's tables follow the fp32 residual: rotated
    q and k must come back bf16 like v (the flash kernels refuse mixed dtypes), and the logits must track
    fp32 within the half-precision bound above."""
    model = model_for(TINY, 3, backend=backend)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    ref = run(model, "eager", ids, attention_mask=mask).logits
    names = [f"blocks.{layer}.attn.hook_{s}" for layer in range(2) for s in ("q", "rot_q", "rot_k", "v", "z")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=names)
    assert {name: cache[name].dtype for name in names} == {name: torch.bfloat16 for name in names}
    real = mask.bool()
    assert rel(logits.float()[real], ref[real]) < HALF_REL_U * U[torch.bfloat16] / 2


def test_fallback_warns_once_naming_every_layer_at_the_callers_line():
    model = model_for(TINY, 4, backend="sdpa")
    ids = torch.randint(0, 97, (1, 5))
    with pytest.warns(UserWarning) as caught:
        model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    fallback = [w for w in caught if "attention scores/pattern" in str(w.message)]
    assert len(fallback) == 1 and str(fallback[0].message).startswith("layers 0, 1: ")
    assert fallback[0].filename == __file__  # points at this call, not inside neox_lab or torch
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer: a second call is silent
        model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
