"""The property behind `compare`: for random NeoX configs with trained-like weights (random biases and
LayerNorms, attention-score rms ~3-10) and random padded inputs,
- legitimate variants always pass: eager vs sdpa in fp64 and fp32, fp16 vs fp32, neox_lab vs
  transformers in fp32 and fp64;
- every injected bug class always fails and the report names its place: the config field, or the
  tensor with its layer, heads and q/k/v part (and, for a head permutation, the activations name the
  same heads at hook_q);
- every code bug of `code_bugs` (injected into the live model, weights and config untouched) always
  fails in fp32 at compare's defaults, named at its first stream (in the left-padded batch or the long
  probe for the input-dependent ones) or its decoding step.
Runs under the "fast" hypothesis profile on models of at most 2-3 layers, d_model <= 128.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from neox_lab import NeoXForCausalLM
from neox_lab.testing import compare
from neox_lab.testing.code_bugs import CODE_BUGS, WINDOW
from neox_lab.testing.mutations import MUTATIONS, named_place
from neox_lab.testing.pairs import build_pair, make_trained_like
from neox_lab.testing.plain_port import PlainNeoX, port
from neox_lab.testing.strategies import neox_configs, token_batches

STD = 0.2  # trained-like attention sharpness (see tolerance.py's table)
VARIANTS = ("eager vs sdpa fp64", "eager vs sdpa fp32", "fp16 vs fp32", "transformers fp32", "transformers fp64",
            "plain port fp32", "plain port fp16 vs fp32")


def _model(cfg, seed):
    torch.manual_seed(seed)
    return make_trained_like(NeoXForCausalLM(cfg, attn_backend="eager").eval(), seed=seed, std=STD)


@given(cfg=neox_configs(max_layers=2, max_heads=4, head_dims=(8, 16), scaling=False), variant=st.sampled_from(VARIANTS),
       seed=st.integers(0, 2**16), data=st.data())
def test_legitimate_variants_always_pass(cfg, variant, seed, data):
    batch = data.draw(token_batches(cfg, max_batch=2, max_len=16))
    if variant.startswith("transformers"):
        pytest.importorskip("transformers")
        dtype = torch.float64 if variant.endswith("fp64") else torch.float32
        # fp64 through transformers' sdpa (neox-lab compare's default for it): its eager attention takes the
        # softmax in fp32 and gives NaN on left-padded rows in fp64 (test_testing_verdicts.py has that case)
        impl = "sdpa" if dtype == torch.float64 else "eager"
        hf, ours = build_pair(cfg, seed, dtype=dtype, trained_like=STD, attn_implementation=impl)
        a, b = ours, hf
    elif variant.startswith("plain port"):
        b = _model(cfg, seed)
        plain = PlainNeoX.from_neox(b)
        a = port(plain.half() if variant.endswith("vs fp32") else plain)
    else:
        b = _model(cfg, seed)
        if variant == "fp16 vs fp32":
            a = copy.deepcopy(b).half()
        else:
            dtype = torch.float64 if variant.endswith("fp64") else torch.float32
            b = b.to(dtype)
            a = copy.deepcopy(b)
            a.set_attn_backend("sdpa")
    report = compare(a, b, batch)
    assert report.equivalent, f"{variant}\n{report.table()}"


@given(cfg=neox_configs(max_layers=3, max_heads=4, head_dims=(8, 16), scaling=False),
       bug=st.sampled_from(sorted(MUTATIONS)), seed=st.integers(0, 2**16), data=st.data())
def test_every_injected_bug_fails_and_is_named(cfg, bug, seed, data):
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    kwargs = {}
    if bug == "head_permutation":
        assume(n_heads >= 2)
        i, j = sorted(data.draw(st.lists(st.integers(0, n_heads - 1), min_size=2, max_size=2, unique=True)))
        kwargs = {"layer": data.draw(st.integers(0, n_layers - 1)), "i": i, "j": j}
    elif bug in ("bias_zeroed", "one_weight_element"):
        cfg = cfg.replace(attention_bias=True)
        kwargs = {"layer": data.draw(st.integers(0, n_layers - 1))}
    elif bug == "layer_swap":
        cfg = cfg.replace(num_hidden_layers=max(n_layers, 2))
        kwargs = {"i": 0, "j": cfg.num_hidden_layers - 1}
    elif bug == "unembed_transposed":
        cfg = cfg.replace(vocab_size=cfg.hidden_size, tie_word_embeddings=False)
    elif bug == "unembed_tied":
        cfg = cfg.replace(tie_word_embeddings=False)
    elif bug == "rotary_base":
        assume(int(cfg.head_dim * cfg.rotary_pct) > 0)  # with nothing rotated the base changes nothing
    good = _model(cfg, seed)
    bad, expected = MUTATIONS[bug](good, **kwargs)
    batch = data.draw(token_batches(cfg, max_batch=2, max_len=16))
    report = compare(bad, good, batch)
    assert not report.equivalent, f"{bug} passed\n{report.table()}"
    assert named_place(report, expected), f"{bug}: expected {expected}\n{report.table()}"
    if bug == "head_permutation" and report.first_divergence is not None:
        first = report.first_divergence
        assert first.name == f"blocks.{kwargs['layer']}.attn.hook_q" and sorted(first.heads) == [i, j]


@given(cfg=neox_configs(max_layers=3, max_heads=4, head_dims=(8, 16), scaling=False),
       bug=st.sampled_from(sorted(CODE_BUGS)), seed=st.integers(0, 2**16), data=st.data())
def test_every_code_bug_fails_in_fp32_and_is_named(cfg, bug, seed, data):
    heads, channels = cfg.num_attention_heads, cfg.rotary_channels
    kwargs, padding = {}, ("none", "left", "right")
    if bug == "gelu_tanh":
        cfg = cfg.replace(hidden_act="gelu")
    elif bug == "attn_bias_dropped":
        cfg = cfg.replace(attention_bias=True)
    elif bug == "residual_sequential":
        cfg = cfg.replace(use_parallel_residual=True)
    elif bug == "sliding_window":
        cfg = cfg.replace(max_position_embeddings=WINDOW + 64)  # room for the probe to pass the window
    elif bug == "pad_keys_attended":
        padding = ("none",)  # compare's own left-padded batch is where it must show
    if bug in ("mlp_bias_dropped", "attn_bias_dropped"):
        kwargs = {"layer": data.draw(st.integers(0, cfg.num_hidden_layers - 1))}
    assume(bug != "qkv_layout" or heads >= 2)
    # two rotated channels are one pair in either convention; with none rotated, positions change nothing
    assume(bug != "rotary_interleaved" or channels >= 4)
    assume(bug != "rotary_last_channels" or 0 < channels < cfg.head_dim)
    assume(bug != "decode_position_off_by_one" or channels > 0)
    good = _model(cfg, seed)
    bad, expected = CODE_BUGS[bug](good, **kwargs)
    batch = data.draw(token_batches(cfg, max_batch=2, max_len=16, padding=padding))
    report = compare(bad, good, batch)
    assert not report.equivalent, f"{bug} passed\n{report.table()}"
    assert named_place(report, expected), f"{bug}: expected {expected}\n{report.table()}"
