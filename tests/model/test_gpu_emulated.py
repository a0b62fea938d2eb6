"""tests/model/test_gpu.py's bodies on CPU, so CI exercises the "flash" path's integration in fp16/bf16 (masks,
padding, the KV cache, hooks, the eager fallback, autocast, the static decoding step) without a GPU.

What is emulated, and what that leaves for the GPU run: "flash" is allowed on CPU half precision (the
resolver's device check is lifted), flash-attn's three functions are test_flash_kernel.py's stand-ins
(written from its documented semantics, fp32 accumulation like the real kernels), and the CUDA-graph
decoder runs its step uncaptured. The kernels themselves, CUDA graph capture, cuDNN/torch kernel choice
and speed are only tested by test_gpu.py on a GPU; the 2048-token Pythia-shape test is left out (hours
of fp16 matmul on a CPU). The bounds are test_gpu.py's own, unchanged.
"""

from __future__ import annotations

import pytest
import test_gpu as gpu
import torch
from test_flash_kernel import fake_func, fake_kvcache, fake_varlen
from test_gpu import (  # noqa: F401 - collected here as the emulated runs
    test_autocast_on_an_fp32_model_runs_flash,
    test_compiled_decoding_picks_the_argmax_of_a_full_forward,
    test_every_hook_but_scores_and_pattern_fires_on_flash,
    test_flash_fp16_matches_transformers_sdpa_fp16,
    test_flash_in_fp32_on_cuda_raises,
    test_flash_kernel_last_names_the_kernel_that_ran,
    test_half_backends_match_fp32_eager,
    test_kv_cache_decoding_equals_full_forward,
    test_left_padded_rows_equal_the_rows_alone,
    test_pattern_hook_falls_back_to_eager_for_that_layer_and_matches_eager,
    test_scores_hook_emptying_a_row_attends_to_nothing_on_flash,
    test_stream_flags_on_flash,
)

from neox_lab import PRESETS
from neox_lab.dtypes import HALF
from neox_lab.model import base as model_module
from neox_lab.model import fast_decode
from neox_lab.model import flash as flash_kernel
from neox_lab.model.flash import FlashKernel


def resolve_on_cpu(name: str, x: torch.Tensor) -> str:
    """backends.resolve_backend with "CUDA" read as "CPU" (CPU autocast included)."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if name == "auto":
        return "flash" if dtype in HALF else "eager"
    if name == "flash" and dtype not in HALF:
        raise ValueError(f"attn_backend 'flash' needs float16/bfloat16 (emulated on CPU), got {dtype}")
    return name


@pytest.fixture(autouse=True)
def emulated_gpu(monkeypatch):
    for module in (flash_kernel, fast_decode, gpu):
        monkeypatch.setattr(module, "HAVE_FLASH_ATTN", True)
        monkeypatch.setattr(module, "FLASH_KVCACHE_LEFTPAD", True)
    monkeypatch.setattr(flash_kernel, "flash_attn_func", fake_func)
    monkeypatch.setattr(flash_kernel, "flash_attn_varlen_func", fake_varlen)
    monkeypatch.setattr(flash_kernel, "flash_attn_with_kvcache", fake_kvcache)
    monkeypatch.setattr(FlashKernel, "__call__", FlashKernel.dispatch)  # no CUDA check
    monkeypatch.setattr(model_module, "resolve_backend", resolve_on_cpu)
    monkeypatch.setattr(fast_decode, "resolve_backend", resolve_on_cpu)
    monkeypatch.setattr(fast_decode, "unsupported_reason", lambda model, ids: None)
    real_init = fast_decode.StaticDecoder.__init__
    monkeypatch.setattr(fast_decode.StaticDecoder, "__init__",
                        lambda self, model, batch, total, *, graph=True: real_init(self, model, batch, total,
                                                                                   graph=False))
    monkeypatch.setattr(gpu, "DEVICE", "cpu")
    monkeypatch.setattr(gpu, "CAPTURES", False)


@gpu.HALVES
def test_half_logits_at_depth_within_the_bound(dtype):
    """test_gpu.py's 2048-token Pythia check at Pythia's depth (24 blocks) on a narrow model and 256 tokens:
    the depth bound holds on the emulated flash path too (width and length do not enter it)."""
    narrow = PRESETS["pythia-410m"].replace(hidden_size=128, intermediate_size=512, num_attention_heads=2,
                                            vocab_size=1024)
    gpu.check_at_depth(narrow, (dtype,), seq=256)
