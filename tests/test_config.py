"""NeoXConfig: validation names the field, HF 4.x and 5.x config.json both read, to_hf round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given

from neox_lab import PRESETS, NeoXConfig
from neox_lab.testing.strategies import neox_configs

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 30),  # not divisible by 4 heads
        ("num_attention_heads", 0),
        ("vocab_size", -1),
        ("num_hidden_layers", 1.5),
        ("rotary_pct", 1.5),
        ("rotary_pct", -0.1),
        ("rotary_emb_base", 0),
        ("hidden_act", "gelu_magic"),
        ("layer_norm_eps", 0.0),
        ("attention_dropout", 2.0),
        ("eos_token_id", 64),
        ("problem_type", "ranking"),
        ("rope_scaling", {"type": "yarn", "factor": 2.0}),
        ("rope_scaling", {"type": "linear", "factor": 1.0}),
        ("rope_scaling", {"type": "dynamic", "factor": 0.5}),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"NeoXConfig.{field}"):
        NeoXConfig(**{**SMALL, field: value})


def test_dynamic_scaling_needs_more_than_two_rotary_channels():
    with pytest.raises(ValueError, match="rope_scaling.*rotary_dim > 2"):
        NeoXConfig(**SMALL, rotary_pct=0.25, rope_scaling={"type": "dynamic", "factor": 2.0})


def test_derived_sizes_follow_transformers():
    cfg = NeoXConfig(**{**SMALL, "hidden_size": 40, "num_attention_heads": 4}, rotary_pct=0.35)
    assert cfg.head_dim == 10
    assert cfg.rotary_dim == 3  # int(10 * 0.35)
    assert cfg.rotary_channels == 4  # ceil(3 / 2) frequencies, each used twice
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 8


def test_reads_transformers_4x_config_json(tmp_path):
    old = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "torch_dtype": "float16",
           "transformers_version": "4.24.0", "rotary_pct": 0.25, "rotary_emb_base": 10000,
           "rope_scaling": {"type": "linear", "factor": 2.0}, **SMALL, "hidden_act": "gelu",
           "use_parallel_residual": True, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = NeoXConfig.from_hf(tmp_path)
    assert (cfg.rotary_pct, cfg.rotary_emb_base, cfg.rope_scaling) == (0.25, 10000, {"type": "linear", "factor": 2.0})


def test_reads_transformers_5x_rope_parameters():
    new = {**SMALL, "model_type": "gpt_neox", "dtype": "float32",
           "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 500.0,
                               "partial_rotary_factor": 0.5}}
    cfg = NeoXConfig.from_hf(new)
    assert (cfg.rotary_pct, cfg.rotary_emb_base) == (0.5, 500.0)
    assert cfg.rope_scaling == {"type": "dynamic", "factor": 4.0}
    default = NeoXConfig.from_hf({**SMALL, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                               "partial_rotary_factor": 1.0}})
    assert default.rope_scaling is None and default.rotary_pct == 1.0


def test_conflicting_spellings_and_unhonourable_keys_are_refused():
    with pytest.raises(ValueError, match="rotary_pct"):
        NeoXConfig.from_hf({**SMALL, "rotary_pct": 0.25, "rope_parameters": {"partial_rotary_factor": 0.5}})
    for key, value in [("model_type", "llama"), ("num_key_value_heads", 2), ("is_encoder_decoder", True),
                       ("sliding_window", 128), ("head_dim", 16)]:
        with pytest.raises(ValueError, match=key):
            NeoXConfig.from_hf({**SMALL, key: value})


def test_unknown_keys_warn_and_bookkeeping_is_silent():
    with pytest.warns(UserWarning, match="mystery_knob"):
        NeoXConfig.from_hf({**SMALL, "mystery_knob": 3})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NeoXConfig.from_hf({**SMALL, "architectures": ["x"], "transformers_version": "5", "id2label": {0: "a"}})


@given(neox_configs())
def test_to_hf_is_accepted_by_transformers_and_round_trips(cfg):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPTNeoXConfig(**cfg.to_hf())
    assert NeoXConfig.from_hf(hf.to_dict()) == cfg
    assert NeoXConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


def test_presets_have_the_published_shapes():
    p = PRESETS["pythia-160m"]
    assert (p.num_hidden_layers, p.hidden_size, p.num_attention_heads, p.vocab_size) == (12, 768, 12, 50304)
    assert PRESETS["gpt-neox-20b"].num_hidden_layers == 44 and PRESETS["gpt-neox-20b"].head_dim == 96
    assert PRESETS["pythia-1.4b"].rotary_dim == 32
    assert len(PRESETS) == 11
