"""CUDA only: the "flash" backend in fp16/bf16 against the fp32 eager reference and transformers, with
padding, a KV cache, hooks, the eager fallback, 2048-token inputs at Pythia shapes, and CUDA-graph
decoding. Skipped on machines without CUDA (tests/conftest.py), with that reason.

Bound on ||logits_half - logits_fp32|| / ||logits_fp32||. A half-precision model rounds every weight
once and every activation at each op's output, each a relative perturbation of at most u/2 (u = 2^-11
for fp16, 2^-8 for bf16); the kernels accumulate in fp32 (cuBLAS, FlashAttention, softmax, LayerNorm),
so sums add no error of order u * length. (torch lets cuBLAS round split-K partial sums to half by
default, `allow_fp16_reduced_precision_reduction`: at most one more rounding point per matmul, already
inside the factor 2 below.) With <= 3 blocks of ~10 rounding points plus embedding and
unembedding (~35 in all), independent perturbations add in quadrature to sqrt(35) * u/2 ~ 3 u, and the
O(1) Jacobians of these random-init models at most double that: ~6 u. We assert 10 u: fp16 4.9e-3
(the issue's ~5e-3) and bf16 3.9e-2 (the same constant; on CPU the measured constant is ~4.5 for both
types, so the issue's 2e-2 for bf16, ~5 u, would leave no margin). Two half models (ours, transformers')
are each within 10 u of fp32, so within 20 u of each other.

Argmax. Random-init logits are nearly tied: over 128 tokens the top-2 gap averages ~0.3 sigma while a
bf16 logit moves by ~0.02 sigma, so ~3% of positions flip in bf16 (measured on CPU, 3-layer d_model 64
models; ~1% in fp16) however correct the kernels; with a handful of positions per example, one flip is
already > 1%. A trained model's margins are far wider. So agreement >= 99% is asserted on the positions
whose fp32 top-2 margin exceeds 4x the per-logit error the bound allows (a flip there needs an error
~10x the measured one); every other position is covered by the norm-wise bound.

Depth. The same count for L blocks: N = 10 L + 5 rounding points, sqrt(N) * u/2, doubled for the
Jacobians, and the same 1.7x margin, is REL_U * sqrt(N / 35) u: 26.5 u for Pythia's 24 blocks. Measured
on CPU (sdpa in fp16 and bf16 against fp32 eager, 24 blocks, trained-like weights with attention-score
rms ~5: widths 128 to 2048, 128 to 2048 tokens): 6.4-7.6 u, i.e. 0.82-0.97 x sqrt(N) u/2, independent
of width and length, as the count says.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neox_lab import PRESETS, KVCache, NeoXForCausalLM
from neox_lab.model.fast_decode import decoder_of
from neox_lab.model.flash import FLASH_KVCACHE_LEFTPAD, HAVE_FLASH_ATTN
from neox_lab.testing.pairs import make_trained_like
from neox_lab.testing.strategies import build_pair, neox_configs, token_batches

pytestmark = pytest.mark.gpu
# tests/model/test_gpu_emulated.py reruns most of these bodies on CPU with stand-in kernels, through these two.
DEVICE = "cuda"
CAPTURES = True  # generate(compile=True) captures a CUDA graph

U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
REL_U = 10
FLASH_KERNELS = {"flash_attn.func", "flash_attn.varlen", "flash_attn.kvcache", "sdpa.flash", "sdpa.cudnn",
                 "sdpa.efficient"}
HALVES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
# FlashAttention kernels are built for head dims that are multiples of 8 (all Pythia models).
configs = neox_configs(head_dims=(8, 64)).filter(lambda c: c.head_dim % 8 == 0)


@pytest.fixture(autouse=True)
def exact_fp32():
    """The fp32 reference must be fp32: no TF32 in matmuls."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def models(cfg, seed: int, dtype, backend: str = "flash"):
    """(fp32 eager reference, half copy on `backend`), same weights, on CUDA."""
    torch.manual_seed(seed)
    ref = NeoXForCausalLM(cfg, attn_backend="eager").to(DEVICE).eval()
    half = copy.deepcopy(ref).to(dtype)
    half.set_attn_backend(backend)
    return ref, half


def check_logits(half: torch.Tensor, ref: torch.Tensor, dtype, bound_u: float = REL_U) -> None:
    """Norm-wise relative error and argmax agreement (module docstring), over [n d_vocab] rows."""
    half, ref = half.float(), ref.float()
    assert torch.isfinite(half).all()
    bound = bound_u * U[dtype]
    assert rel(half, ref) < bound
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    per_logit = bound * ref.pow(2).mean(-1).sqrt()
    decisive = margin > 4 * per_logit
    agree = half.argmax(-1) == ref.argmax(-1)
    if decisive.any():
        assert float(agree[decisive].float().mean()) >= 0.99


def depth_bound_u(n_layers: int) -> float:
    """The bound in units of u for `n_layers` blocks (module docstring, Depth)."""
    return REL_U * math.sqrt((10 * n_layers + 5) / 35)


def check_at_depth(cfg, dtypes, seq: int, seed: int = 0) -> None:
    """Half-precision logits (each of `dtypes`) of a trained-like `cfg` model over `seq` random tokens, on
    the flash backend, within the depth bound of the fp32 eager ones. Weights ~N(0, 5 / d_model):
    attention-score rms ~5 and an MLP gain of a few, whatever the width (make_trained_like's fixed 0.2
    is for tiny models)."""
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        ref = NeoXForCausalLM(cfg, attn_backend="eager").eval()
    make_trained_like(ref, seed=seed + 1, std=math.sqrt(5 / cfg.hidden_size), bias_std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), device=DEVICE)
    with torch.no_grad():
        expected = ref(ids).logits[0]
        for dtype in dtypes:
            half = copy.deepcopy(ref).to(dtype)
            half.set_attn_backend("flash")
            got = half(ids).logits[0]
            del half
            check_logits(got, expected, dtype, bound_u=depth_bound_u(cfg.num_hidden_layers))


def cuda_batch(batch):
    return batch.input_ids.to(DEVICE), batch.attention_mask.to(DEVICE)


# ------------------------------------------------------------------------------ against fp32 eager
@HALVES
@pytest.mark.parametrize("backend", ["flash", "sdpa"])
@given(cfg=configs, data=st.data(), seed=st.integers(0, 2**16))
def test_half_backends_match_fp32_eager(dtype, backend, cfg, data, seed):
    ids, mask = cuda_batch(data.draw(token_batches(cfg, max_len=48)))
    ref, half = models(cfg, seed, dtype, backend)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        got = half(ids, attention_mask=mask).logits
    real = mask.bool()  # flash zeroes padding queries; outputs there are unspecified anyway
    check_logits(got[real], expected[real], dtype)
    kernels = half.attn_kernels()
    assert all(k in FLASH_KERNELS for k in kernels) if backend == "flash" else kernels == ["sdpa"] * len(kernels)


@given(cfg=configs, data=st.data(), seed=st.integers(0, 2**16))
def test_flash_fp16_matches_transformers_sdpa_fp16(cfg, data, seed):
    pytest.importorskip("transformers")
    batch = data.draw(token_batches(cfg, max_len=48, padding=("none", "left")))
    hf, ours = build_pair(cfg, seed, "causal_lm", dtype=torch.float16, attn_backend="flash",
                          attn_implementation="sdpa")
    _, ref = build_pair(cfg, seed, "causal_lm", dtype=torch.float32)
    hf, ours, ref = hf.to(DEVICE), ours.to(DEVICE), ref.to(DEVICE)
    # `.to(float16)` rounded transformers' rotary frequency table too (neox_lab keeps its own in fp32):
    # give it back the exact table, so the comparison measures the attention path, not that rounding.
    from neox_lab.model.rotary import inverse_frequencies

    rotary = hf.gpt_neox.rotary_emb
    rotary.inv_freq = rotary.original_inv_freq = inverse_frequencies(cfg, device=DEVICE)
    ids, mask = cuda_batch(batch)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=batch.position_ids.to(DEVICE)).logits
        got = ours(ids, attention_mask=mask).logits
        expected = ref(ids, attention_mask=mask).logits
    real = mask.bool()
    check_logits(got[real], expected[real], torch.float16)
    assert rel(got[real].float(), theirs[real].float()) < 2 * REL_U * U[torch.float16]


@HALVES
@given(cfg=configs, data=st.data(), seed=st.integers(0, 2**16))
def test_left_padded_rows_equal_the_rows_alone(dtype, cfg, data, seed):
    if cfg.rope_scaling is not None and cfg.rope_scaling["type"] == "dynamic":
        cfg = cfg.replace(rope_scaling=None)  # frequencies follow the batch's longest row by design
    batch = data.draw(token_batches(cfg, max_len=32, padding=("left",)))
    ids, mask = cuda_batch(batch)
    _, half = models(cfg, seed, dtype)
    with torch.no_grad():
        padded = half(ids, attention_mask=mask).logits
        for row in range(ids.shape[0]):
            n_pad = int((mask[row] == 0).sum())
            alone = half(ids[row:row + 1, n_pad:]).logits[0]
            # Same model, same dtype: only the kernels' blocking differs (varlen vs dense).
            assert rel(padded[row, n_pad:].float(), alone.float()) < REL_U * U[dtype]


@HALVES
@given(cfg=configs, data=st.data(), seed=st.integers(0, 2**16), preallocate=st.booleans())
def test_kv_cache_decoding_equals_full_forward(dtype, cfg, data, seed, preallocate):
    batch = data.draw(token_batches(cfg, max_len=24, padding=("none", "left")))
    n_steps, chunk = data.draw(st.integers(1, 4)), data.draw(st.integers(2, 5))
    total = batch.input_ids.shape[1] + n_steps + chunk
    if cfg.rope_scaling is not None and cfg.rope_scaling["type"] == "dynamic":
        cfg = cfg.replace(rope_scaling=None)  # per-call frequencies differ from a full forward by design
    ref, half = models(cfg, seed, dtype)
    ids, mask = cuda_batch(batch)
    extra = torch.randint(0, cfg.vocab_size, (ids.shape[0], n_steps + chunk), device=DEVICE)
    ids, mask = torch.cat([ids, extra], 1), torch.cat([mask, torch.ones_like(extra)], 1)
    cache = KVCache(cfg.num_hidden_layers, max_length=total if preallocate else None)
    got, start = [], 0
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        for end in [batch.input_ids.shape[1] + i for i in range(n_steps + 1)] + [total]:
            out = half(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True)
            got.append(out.logits)
            if start and HAVE_FLASH_ATTN and (FLASH_KVCACHE_LEFTPAD or bool(mask.all())):
                assert set(half.attn_kernels()) == {"flash_attn.kvcache"}
            start = end
    real = mask.bool()
    check_logits(torch.cat(got, 1)[real], expected[real], dtype)


# --------------------------------------------------------------------------------------------- hooks
def zero_head_0(pattern, *, hook):
    pattern = pattern.clone()
    pattern[:, 0] = 0.0
    return pattern


@HALVES
def test_pattern_hook_falls_back_to_eager_for_that_layer_and_matches_eager(dtype):
    cfg = PRESETS["pythia-14m"].replace(num_hidden_layers=3, vocab_size=512)
    ref, half = models(cfg, 0, dtype)
    eager_half = copy.deepcopy(half)
    eager_half.set_attn_backend("eager")
    ids = torch.randint(0, 512, (2, 64), device=DEVICE)
    hooks = [("blocks.1.attn.hook_pattern", zero_head_0)]
    with pytest.warns(UserWarning, match="layer 1"):
        got = half.run_with_hooks(ids, fwd_hooks=hooks).logits
    kernels = half.attn_kernels()
    assert kernels[1] == "eager (fallback)" and kernels[0] in FLASH_KERNELS and kernels[2] in FLASH_KERNELS
    eager = eager_half.run_with_hooks(ids, fwd_hooks=hooks).logits
    expected = ref.run_with_hooks(ids, fwd_hooks=hooks).logits
    check_logits(got.flatten(0, 1), expected.flatten(0, 1), dtype)
    assert rel(got.float(), eager.float()) < 2 * REL_U * U[dtype]


@HALVES
def test_scores_hook_emptying_a_row_attends_to_nothing_on_flash(dtype):
    """A knockout setting every key of a query row to -inf gives that head zero output there, no NaN."""
    cfg = PRESETS["pythia-14m"].replace(num_hidden_layers=2, vocab_size=512)
    _, half = models(cfg, 2, dtype)
    ids = torch.randint(0, 512, (2, 24), device=DEVICE)

    def knock_out(scores, *, hook):
        scores = scores.clone()
        scores[:, 1, 5, :] = float("-inf")
        return scores

    seen = {}
    with pytest.warns(UserWarning, match="layer 0"):
        logits = half.run_with_hooks(ids, fwd_hooks=[
            ("blocks.0.attn.hook_attn_scores", knock_out),
            ("blocks.0.attn.hook_z", lambda z, *, hook: seen.__setitem__("z", z))]).logits
    assert half.attn_kernels()[0] == "eager (fallback)"
    assert torch.isfinite(logits).all()
    assert (seen["z"][:, 5, 1] == 0).all()


@HALVES
def test_every_hook_but_scores_and_pattern_fires_on_flash(dtype):
    cfg = PRESETS["pythia-14m"].replace(num_hidden_layers=2, vocab_size=512, use_parallel_residual=False)
    ref, half = models(cfg, 1, dtype)
    ids = torch.randint(0, 512, (2, 40), device=DEVICE)
    wanted = [n for n in half.hook_names() if "attn_scores" not in n and "pattern" not in n]
    _, cache = half.run_with_cache(ids, names_filter=wanted)
    _, ref_cache = ref.run_with_cache(ids, names_filter=wanted)
    assert all(k in FLASH_KERNELS for k in half.attn_kernels())  # nothing fell back
    assert sorted(cache.keys()) == sorted(wanted)
    for name in wanted:
        assert cache[name].dtype == dtype and cache[name].shape == ref_cache[name].shape, name
        assert rel(cache[name].float(), ref_cache[name]) < 2 * REL_U * U[dtype], name


@HALVES
def test_stream_flags_on_flash(dtype):
    """TransformerLens' per-head input streams on the flash path (left padding, so the unpadded kernel
    runs): flagged hooks hold the fp32 reference's values, an edit of one head's copy gives its logits,
    and nothing falls back to eager."""
    cfg = PRESETS["pythia-14m"].replace(num_hidden_layers=2, vocab_size=512)
    ref, half = models(cfg, 3, dtype)
    for model in (ref, half):
        for flag in ("use_attn_in", "use_split_qkv_input", "use_hook_mlp_in"):
            getattr(model, f"set_{flag}")(True)
    ids = torch.randint(0, 512, (2, 40), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    flagged = [n for n in half.hook_names() if n.endswith(("_input", "attn_in", "mlp_in"))]
    _, cache = half.run_with_cache(ids, attention_mask=mask, names_filter=flagged)
    _, ref_cache = ref.run_with_cache(ids, attention_mask=mask, names_filter=flagged)
    assert all(k in FLASH_KERNELS for k in half.attn_kernels())
    live = mask.bool()
    for name in flagged:
        assert rel(cache[name][live].float(), ref_cache[name][live]) < 2 * REL_U * U[dtype], name

    def edit(x, *, hook):
        x[:, :, 1, ::2] *= -2.0

    hooks = [("blocks.1.hook_q_input", edit), ("blocks.0.hook_v_input", edit)]
    got = half.run_with_hooks(ids, attention_mask=mask, fwd_hooks=hooks).logits
    expected = ref.run_with_hooks(ids, attention_mask=mask, fwd_hooks=hooks).logits
    check_logits(got[live], expected[live], dtype)


# ----------------------------------------------------------------------------------- numerics, kernels
@pytest.mark.parametrize("preset", ["pythia-410m", "pythia-1.4b"])
def test_no_nan_or_inf_at_2048_tokens_in_fp16(preset):
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = NeoXForCausalLM(PRESETS[preset], attn_backend="flash").half().eval()
    ids = torch.randint(0, PRESETS[preset].vocab_size, (1, 2048), device=DEVICE)
    with torch.no_grad():
        for backend in ("flash", "eager"):  # eager is what a pattern hook falls back to
            model.set_attn_backend(backend)
            out = model(ids, output_hidden_states=True)
            assert torch.isfinite(out.logits).all(), backend
            assert all(torch.isfinite(h).all() for h in out.hidden_states), backend
    del model
    torch.cuda.empty_cache()


@pytest.mark.parametrize("preset", ["pythia-410m", "pythia-1.4b"])
def test_half_logits_at_2048_tokens_within_the_depth_bound(preset):
    """Pythia shapes at their full context, fp16 and bf16: not only finite, within the bound against fp32
    eager."""
    check_at_depth(PRESETS[preset], (torch.float16, torch.bfloat16), seq=2048)
    torch.cuda.empty_cache()


def test_flash_kernel_last_names_the_kernel_that_ran():
    cfg = PRESETS["pythia-14m"].replace(num_hidden_layers=1, vocab_size=512)
    _, half = models(cfg, 0, torch.float16)
    ids = torch.randint(0, 512, (2, 32), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        half(ids)
        plain = half.attn_kernels()[0]
        half(ids, attention_mask=mask)
        padded = half.attn_kernels()[0]
    assert half.model.blocks[0].attn.flash.last == padded
    if HAVE_FLASH_ATTN:
        assert (plain, padded) == ("flash_attn.func", "flash_attn.varlen")
    else:
        assert plain in {"sdpa.flash", "sdpa.cudnn"} and padded in {"sdpa.cudnn", "sdpa.efficient"}


def test_flash_in_fp32_on_cuda_raises():
    torch.manual_seed(0)
    model = NeoXForCausalLM(PRESETS["pythia-14m"].replace(num_hidden_layers=1), attn_backend="flash").to(DEVICE)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        model(torch.zeros(1, 4, dtype=torch.long, device=DEVICE))


@HALVES
def test_autocast_on_an_fp32_model_runs_flash(dtype):
    """"auto" picks flash under CUDA autocast (compute_dtype); rotary keeps q/k in the autocast dtype."""
    cfg = PRESETS["pythia-14m"].replace(num_hidden_layers=2, vocab_size=512)
    ref, _ = models(cfg, 3, dtype)
    ref.set_attn_backend("auto")
    ids = torch.randint(0, 512, (2, 48), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        assert ref.attn_kernels() == ["eager"] * 2  # fp32: auto means eager
        with torch.autocast(DEVICE, dtype=dtype):
            got = ref(ids, attention_mask=mask).logits
    assert all(k in FLASH_KERNELS for k in ref.attn_kernels())
    real = mask.bool()
    check_logits(got[real], expected[real], dtype)


# --------------------------------------------------------------------------------- CUDA-graph decoding
@pytest.mark.parametrize("backend", ["flash", "sdpa"])
def test_compiled_decoding_picks_the_argmax_of_a_full_forward(backend):
    cfg = PRESETS["pythia-14m"].replace(num_hidden_layers=2, vocab_size=512, initializer_range=0.2)
    _, half = models(cfg, 2, torch.float16, backend)
    ids = torch.randint(0, 512, (3, 12), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    plain = half.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None)
    for _ in range(2):  # the second call replays the captured graph
        out = half.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None, compile=True)
    decoder = decoder_of(half)
    assert decoder.failed is None and (decoder.graph is not None or not CAPTURES)
    full_mask = torch.cat([mask, torch.ones(3, 16, dtype=mask.dtype, device=DEVICE)], 1)
    with torch.no_grad():
        logits = half(out, attention_mask=full_mask).logits[:, 11:-1].float()
    chosen = logits.gather(-1, out[:, 12:, None]).squeeze(-1)
    # Each token is the argmax of a full forward over what came before, up to a half-precision tie
    # (comparing with `plain` token for token would fail on the first near-tie, after which rows differ).
    assert bool((chosen >= logits.max(-1).values - 20 * U[torch.float16] * logits.abs().max()).all())
    assert torch.equal(out[:, :12], plain[:, :12]) and out.shape == plain.shape
