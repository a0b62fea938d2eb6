"""The "flash" kernel's bookkeeping on CPU: which flash-attn function runs for which mask (plain,
KV cache, left padding via cache_leftpad, any other padding via the unpadded kernel, the static
decoding mask), the gather/scatter of real tokens, dead and padding rows, and the torch-fused
fallback's kernel choice. The flash-attn functions are replaced by CPU stand-ins written from
flash-attn's documented semantics (causal aligned bottom-right, rows with no key give 0,
cache_seqlens counting slots from 0 with padding, cache_leftpad the first real slot); test_gpu.py runs
the real kernels. The last two tests run the whole model, on the stand-ins and on torch's fused kernels.
Tolerance: fp32 with d_head 8 and <= 12 keys, so only rounding (~1e-7) separates a stand-in from the
eager reference; 1e-5 absolute.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from neox_lab.model import flash as flash_kernel
from neox_lab.model.flash import FlashKernel
from neox_lab.model.kernels import AttnMask, StaticDecodeMask, eager_attention


def _one_sequence(q, k, v, scale, causal):
    """flash-attn's documented semantics for one sequence: causal aligned bottom-right, rows with no key
    give 0, fp32 accumulation and softmax with the output in the input's dtype.
    q [q_len n_heads d_head], k and v [k_len n_heads d_head]."""
    dtype, acc = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    scores = torch.einsum("qhd,khd->hqk", q * scale, k)
    if causal:
        q_len, k_len = q.shape[0], k.shape[0]
        allowed = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
        scores = scores.masked_fill(~allowed, float("-inf"))
    pattern = scores.softmax(-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", pattern, v).to(dtype)


def fake_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    return torch.stack([_one_sequence(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    assert cu_q.dtype == cu_k.dtype == torch.int32 and q.dim() == k.dim() == 3
    assert int(cu_q[-1]) == q.shape[0] and int(cu_k[-1]) == k.shape[0]
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    return torch.cat([_one_sequence(q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]],
                                    softmax_scale, causal) for i in range(len(cu_q) - 1)])


def fake_kvcache(q, k_cache, v_cache, cache_seqlens=None, cache_leftpad=None, softmax_scale=None, causal=False):
    assert k_cache.stride(-1) == v_cache.stride(-1) == 1
    batch = q.shape[0]
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32)
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (batch,)
    assert cache_leftpad is None or (cache_leftpad.dtype == torch.int32 and cache_leftpad.shape == (batch,))
    left = cache_leftpad if cache_leftpad is not None else torch.zeros(batch, dtype=torch.int32)
    # cache_seqlens is where the row's filled slots end (padding counted); keys are [leftpad, seqlens).
    return torch.stack([_one_sequence(q[b], k_cache[b, left[b]:cache_seqlens[b]], v_cache[b, left[b]:cache_seqlens[b]],
                                      softmax_scale, causal) for b in range(batch)])


@pytest.fixture
def stand_in_flash_attn(monkeypatch):
    monkeypatch.setattr(flash_kernel, "HAVE_FLASH_ATTN", True)
    monkeypatch.setattr(flash_kernel, "flash_attn_func", fake_func)
    monkeypatch.setattr(flash_kernel, "flash_attn_varlen_func", fake_varlen)
    monkeypatch.setattr(flash_kernel, "flash_attn_with_kvcache", fake_kvcache)
    return monkeypatch


def _qkv(batch, q_len, k_len, heads, d, seed, preallocated_extra=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, heads, d, generator=g)
    # k, v as a preallocated cache hands them out: a slice of a longer buffer (batch stride > rows).
    k = torch.randn(batch, k_len + preallocated_extra, heads, d, generator=g)[:, :k_len]
    v = torch.randn(batch, k_len + preallocated_extra, heads, d, generator=g)[:, :k_len]
    return q, k, v


@given(batch=st.integers(1, 3), q_len=st.integers(1, 6), past=st.integers(0, 6), heads=st.integers(1, 3),
       padding=st.sampled_from(["none", "left", "right", "holes"]), leftpad_ok=st.booleans(),
       grad=st.booleans(), data=st.data(), seed=st.integers(0, 2**16))
def test_flash_attn_paths_match_eager_on_real_queries(stand_in_flash_attn, batch, q_len, past, heads, padding,
                                                     leftpad_ok, grad, data, seed):
    stand_in_flash_attn.setattr(flash_kernel, "FLASH_KVCACHE_LEFTPAD", leftpad_ok)
    k_len = past + q_len
    key_mask = torch.ones(batch, k_len, dtype=torch.bool)
    for row in range(batch):
        n_pad = data.draw(st.integers(0, k_len - 1))
        if padding == "left":
            key_mask[row, :n_pad] = False
        elif padding == "right":
            key_mask[row, k_len - n_pad:] = False
        elif padding == "holes":
            key_mask[row] = torch.tensor(data.draw(st.lists(st.booleans(), min_size=k_len, max_size=k_len)))
    mask = AttnMask(q_len, k_len, torch.device("cpu"), None if bool(key_mask.all()) else key_mask)
    q, k, v = _qkv(batch, q_len, k_len, heads, 8, seed, preallocated_extra=3)  # d_head 8: every path open
    q.requires_grad_(grad)
    head_mask = torch.rand(heads, generator=torch.Generator().manual_seed(seed))
    kernel = FlashKernel()
    z = kernel.dispatch(q, k, v, mask, scale=0.3, head_mask=head_mask)
    ref, _ = eager_attention(q, k, v, mask, scale=0.3, head_mask=head_mask)
    real_q = torch.ones(batch, q_len, dtype=torch.bool) if mask.key_mask is None else key_mask[:, -q_len:]
    assert torch.allclose(z[real_q], ref[real_q], atol=1e-5, rtol=1e-5)
    assert not z[~real_q].any()  # padding queries: zero (see neox_lab/model/kernels.py's docstring)
    expected = ("flash_attn.func" if mask.key_mask is None and (past == 0 or grad) else
                "flash_attn.kvcache" if past and not grad and (mask.key_mask is None or
                                                               (leftpad_ok and mask.leftpad is not None)) else
                "flash_attn.varlen")
    assert kernel.last == expected


def test_flash_attn_static_decode_mask_reads_the_whole_cache(stand_in_flash_attn):
    """The CUDA-graph step's view: every slot of the buffer, lengths and left padding on the device."""
    stand_in_flash_attn.setattr(flash_kernel, "FLASH_KVCACHE_LEFTPAD", True)
    batch, slots, filled = 3, 10, 7
    key_mask = torch.zeros(batch, slots, dtype=torch.bool)
    leftpad = torch.tensor([0, 2, 5], dtype=torch.int32)
    for row in range(batch):
        key_mask[row, int(leftpad[row]):filled] = True
    q, k, v = _qkv(batch, 1, slots, 2, 8, 0)
    mask = StaticDecodeMask(key_mask, torch.full((batch,), filled, dtype=torch.int32), leftpad, True)
    kernel = FlashKernel()
    z = kernel.dispatch(q, k, v, mask, scale=0.3)
    assert kernel.last == "flash_attn.kvcache"
    ref, _ = eager_attention(q, k, v, mask, scale=0.3)  # the eager kernel reads mask.allowed
    assert torch.allclose(z, ref, atol=1e-6)
    fused = FlashKernel()
    stand_in_flash_attn.setattr(flash_kernel, "HAVE_FLASH_ATTN", False)
    with pytest.raises(RuntimeError, match="no fused attention kernel accepted"):  # CPU has no masked fused kernel
        fused.dispatch(q, k, v, StaticDecodeMask(key_mask, mask.cache_seqlens, None, False), scale=0.3)


@pytest.mark.parametrize("q_len,past", [(5, 0), (1, 4), (3, 4)], ids=["causal", "decode", "chunk"])
def test_torch_fused_fallback_picks_a_fused_kernel(monkeypatch, q_len, past):
    """Without flash-attn: torch's flash kernel runs (bottom-right causal through a CausalBias for a chunk
    after a past); `last` says so. A padding mask needs memory-efficient attention, which CPU lacks."""
    monkeypatch.setattr(flash_kernel, "HAVE_FLASH_ATTN", False)
    monkeypatch.setattr(flash_kernel, "_TORCH_CHOICE", {})
    q, k, v = _qkv(2, q_len, past + q_len, 2, 8, 1, preallocated_extra=2)
    mask = AttnMask(q_len, past + q_len, q.device)
    kernel = FlashKernel()
    z = kernel.dispatch(q, k, v, mask, scale=0.4)
    assert kernel.last == "sdpa.flash"
    assert torch.allclose(z, eager_attention(q, k, v, mask, scale=0.4)[0], atol=1e-6)
    padded = AttnMask(q_len, past + q_len, q.device, torch.tensor([[0] + [1] * (past + q_len - 1)] * 2).bool())
    with pytest.raises(RuntimeError, match=r"accepted this call \(efficient: "):
        kernel.dispatch(q, k, v, padded, scale=0.4)


@pytest.mark.parametrize("cuda,grad,switch,offered", [
    (None, False, True, False), ("12.8", False, True, False), ("12.9", False, True, True),
    ("13.0", False, True, True), ("13.0", True, True, False), ("13.0", False, False, False)])
def test_cudnn_is_offered_for_inference_on_cuda_12_9_and_later_only(monkeypatch, cuda, grad, switch, offered):
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: switch)
    assert flash_kernel._cudnn_offered(grad) is offered


def test_torch_fused_tries_cudnn_quietly_then_falls_back(monkeypatch, recwarn):
    """A refused candidate costs nothing visible: no warning, and the next kernel runs."""
    monkeypatch.setattr(flash_kernel, "HAVE_FLASH_ATTN", False)
    monkeypatch.setattr(flash_kernel, "_cudnn_offered", lambda needs_grad: True)
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def cuda_like_sdpa(*args, **kwargs):
        # On CUDA a kernel that cannot take a call warns why, then torch raises; CPU just raises.
        if torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled():
            warnings.warn("cuDNN attention kernel not used because: unsupported here", UserWarning)
            raise RuntimeError("No available kernel. Aborting execution.")
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(flash_kernel.F, "scaled_dot_product_attention", cuda_like_sdpa)
    q, k, v = _qkv(2, 5, 5, 2, 8, 2)
    mask = AttnMask(5, 5, q.device)
    kernel = FlashKernel()
    z = kernel.dispatch(q, k, v, mask, scale=0.4)
    assert kernel.last == "sdpa.flash"
    assert torch.allclose(z, eager_attention(q, k, v, mask, scale=0.4)[0], atol=1e-6)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_torch_fused_honours_torch_global_switches(monkeypatch):
    monkeypatch.setattr(flash_kernel, "HAVE_FLASH_ATTN", False)
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: False)
    q, k, v = _qkv(1, 4, 4, 2, 8, 3)
    with pytest.raises(RuntimeError, match="every candidate is switched off"):
        FlashKernel().dispatch(q, k, v, AttnMask(4, 4, q.device), scale=0.4)


def _sdpa_switches() -> tuple[bool, ...]:
    cuda = torch.backends.cuda
    return (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled(),
            cuda.math_sdp_enabled())


@pytest.mark.parametrize("name,backend", [("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                                          ("cudnn", "CUDNN_ATTENTION")])
def test_only_sdpa_kernel_sets_what_torchs_sdpa_kernel_sets_and_restores_it(name, backend):
    """The cheap switch (flash.only_sdpa_kernel) leaves torch's global switches as torch's own context
    manager does inside the block, and restores the user's settings after it, also when the call raises."""
    users = _sdpa_switches()
    torch.backends.cuda.enable_math_sdp(False)  # a user's own setting, to be restored as it was
    try:
        outside = _sdpa_switches()
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            expected = _sdpa_switches()
        with flash_kernel.only_sdpa_kernel(name):
            assert _sdpa_switches() == expected
        assert _sdpa_switches() == outside
        with pytest.raises(RuntimeError, match="refused"), flash_kernel.only_sdpa_kernel(name):
            raise RuntimeError("refused")
        assert _sdpa_switches() == outside
    finally:
        for (_, set_), on in zip(flash_kernel._SDPA_SWITCHES.values(), users, strict=True):
            getattr(torch.backends.cuda, set_)(on)


# ------------------------------------------------------------------------ the whole model on stand-ins
@pytest.fixture
def flash_on_cpu(stand_in_flash_attn):
    """The model's "flash" path on CPU: stand-in flash-attn functions, and the device check lifted."""
    from neox_lab.model import base as model_module

    real_resolve = model_module.resolve_backend
    stand_in_flash_attn.setattr(flash_kernel, "FLASH_KVCACHE_LEFTPAD", True)
    stand_in_flash_attn.setattr(model_module, "resolve_backend",
                                lambda name, x: "flash" if name == "flash" else real_resolve(name, x))
    stand_in_flash_attn.setattr(FlashKernel, "__call__", FlashKernel.dispatch)
    return stand_in_flash_attn


def test_model_on_the_flash_path_matches_eager_with_padding_cache_and_hooks(flash_on_cpu):
    """Attention.forward's use of the kernel, end to end: padded prefill (varlen), left-padded decoding
    (kvcache with cache_leftpad), every hook but scores/pattern firing, the eager fallback for a pattern
    hook, and `attn_kernels()` naming what ran. fp32, so only rounding separates the paths (1e-5)."""
    from neox_lab import KVCache, NeoXConfig, NeoXForCausalLM

    cfg = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(0)
    model = NeoXForCausalLM(cfg, attn_backend="eager").eval()
    ids = torch.randint(0, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :8] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        model.set_attn_backend("flash")
        got = model(ids, attention_mask=mask).logits
        assert model.attn_kernels() == ["flash_attn.varlen"] * 2
        real = mask.bool()
        assert torch.allclose(got[real], ref[real], atol=1e-5, rtol=1e-5)

        cache, steps = KVCache(2, max_length=12), []
        out = model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        for end in range(7, 10):
            out = model(ids[:, end - 1:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        assert model.attn_kernels() == ["flash_attn.kvcache"] * 2
        decoded = torch.cat(steps, 1)
        assert torch.allclose(decoded[real], ref[real], atol=1e-5, rtol=1e-5)

    wanted = [n for n in model.hook_names() if "attn_scores" not in n and "pattern" not in n]
    logits, acts = model.run_with_cache(ids, attention_mask=mask, names_filter=wanted)
    assert sorted(acts.keys()) == sorted(wanted) and model.attn_kernels() == ["flash_attn.varlen"] * 2
    model.set_attn_backend("eager")
    _, ref_acts = model.run_with_cache(ids, attention_mask=mask, names_filter=wanted)
    for name in wanted:  # real positions only: flash leaves padding queries at zero
        a, b = acts[name], ref_acts[name]
        if a.dim() >= 2 and a.shape[:2] == mask.shape:
            a, b = a[real], b[real]
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name

    model.set_attn_backend("flash")
    with pytest.warns(UserWarning, match="layer 1: attention scores/pattern"):
        model.run_with_cache(ids, attention_mask=mask, names_filter="blocks.1.attn.hook_pattern")
    assert model.attn_kernels() == ["flash_attn.varlen", "eager (fallback)"]


def test_model_on_torch_fused_kernels_matches_eager_without_padding(monkeypatch):
    """No flash-attn: prefill (causal), a chunk after the cache (lower-right CausalBias) and one-token
    steps, all on torch's flash kernel (CPU has it; masks would need memory-efficient, which CPU lacks)."""
    from neox_lab import KVCache, NeoXConfig, NeoXForCausalLM
    from neox_lab.model import base as model_module

    real_resolve = model_module.resolve_backend
    monkeypatch.setattr(flash_kernel, "HAVE_FLASH_ATTN", False)
    monkeypatch.setattr(model_module, "resolve_backend",
                        lambda name, x: "flash" if name == "flash" else real_resolve(name, x))
    monkeypatch.setattr(FlashKernel, "__call__", FlashKernel.dispatch)
    cfg = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(1)
    model = NeoXForCausalLM(cfg, attn_backend="eager").eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        model.set_attn_backend("flash")
        cache, pieces, seen = KVCache(2), [], []
        for start, end in [(0, 5), (5, 9), (9, 10), (10, 11), (11, 12)]:
            pieces.append(model(ids[:, start:end], past_key_values=cache, use_cache=True).logits)
            seen.append(model.attn_kernels())
    assert torch.allclose(torch.cat(pieces, 1), ref, atol=1e-5, rtol=1e-5)
    assert seen == [["sdpa.flash"] * 2] * 5
