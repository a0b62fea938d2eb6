"""The CUDA-graph decoder's step, run uncaptured on CPU (graph=False): it must compute what a full
forward computes (slot writes, key mask, positions, left padding, buffer reuse), and generate(compile=True)
must fall back with a warning where it cannot run. Capture itself is tested in test_gpu.py.

Bound: fp32, the step attends over every slot of the buffer (unwritten ones masked) instead of the filled
prefix, a reordering of the same sums: ~10 u (u = 6e-8) expected, 1e-5 asserted (as test_backends.py).
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.model import fast_decode
from neox_lab.model.fast_decode import StaticDecoder, decoder_of, static_decoder

FP32_REL = 1e-5
TINY = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64, initializer_range=0.2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def model_for(seed: int, backend: str) -> NeoXForCausalLM:
    torch.manual_seed(seed)
    return NeoXForCausalLM(TINY, attn_backend=backend).eval()


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_static_decoder_step_equals_full_forward(backend):
    """What the CUDA graph captures, run uncaptured on CPU: slot writes, key mask, positions, reuse."""
    model = model_for(3, backend)
    ids = torch.randint(0, 97, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, :5] = 0
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=None)
    decoder = StaticDecoder(model, 3, 13, graph=False)
    for _ in range(2):  # a second generation reuses the buffers
        seq, seq_mask, step = ids, mask, ids
        for i in range(7):
            logits = decoder(step, seq_mask, prefill=i == 0)
            with torch.no_grad():
                full = model(seq, attention_mask=seq_mask).logits[:, -1]
            assert rel(logits, full) < FP32_REL
            step = logits.argmax(-1, keepdim=True)
            seq, seq_mask = torch.cat([seq, step], 1), torch.cat([seq_mask, torch.ones_like(step)], 1)
        assert torch.equal(seq, ref)
    assert model.attn_kernels() == [backend] * 2


def test_generate_compile_on_cpu_warns_and_decodes_as_usual():
    model = model_for(4, "eager")
    ids = torch.randint(0, 97, (2, 5))
    with pytest.warns(UserWarning, match="compile=True.*not on a CUDA device"):
        out = model.generate(ids, max_new_tokens=4, compile=True, eos_token_id=None)
    assert torch.equal(out, model.generate(ids, max_new_tokens=4, eos_token_id=None))


def test_decoders_live_beside_the_model_and_follow_its_lifetime(monkeypatch):
    """A decoder (on CUDA: a captured graph and a KV cache) must not travel with deepcopy or state_dict,
    must be rebuilt when inference mode changes (its buffers are inference tensors or not), and must not
    keep a deleted model alive."""
    monkeypatch.setattr(fast_decode, "unsupported_reason", lambda model, ids: None)  # CPU stand-in
    model = model_for(5, "eager")
    ids = torch.randint(0, 97, (2, 5))
    decoder = static_decoder(model, ids, 9, graph=False)
    assert decoder_of(model) is decoder and decoder.model is model
    assert static_decoder(model, ids, 9, graph=False) is decoder  # same shape: reused
    clone = copy.deepcopy(model)
    assert decoder_of(clone) is None and set(clone.state_dict()) == set(model.state_dict())
    with torch.inference_mode():
        inner = static_decoder(model, ids, 9, graph=False)
    assert inner is not decoder and decoder_of(model) is inner
    gone = weakref.ref(model)
    del model, decoder, inner
    gc.collect()
    assert gone() is None and len(fast_decode._DECODERS) == 0
