"""Absurd configs are refused before anything is allocated, naming the sizes that make them absurd."""

from __future__ import annotations

import json
import time

import pytest
import torch

from neox_lab import PRESETS, NeoXConfig, NeoXForCausalLM, NeoXForSequenceClassification
from neox_lab.model.memory import BLOCK_OBJECT_BYTES, available_bytes, check_fits


def small(**changes) -> NeoXConfig:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return NeoXConfig(**{**base, **changes})


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_million_layers_are_refused_at_once(device):
    """n_layers=10**6 used to build for 97 s and take over 4 GB before a SystemError."""
    start = time.perf_counter()
    with torch.device(device), pytest.raises(ValueError, match=r"num_hidden_layers=1,000,000.*blocks need ~.* GiB "
                                                               r"of host memory for their modules alone"):
        NeoXForCausalLM(small(num_hidden_layers=10**6))
    assert time.perf_counter() - start < 5  # refused before building a block (each takes ~10-30 ms)


def test_a_billion_wide_model_is_refused_naming_its_sizes():
    """hidden_size=10**9 overflowed inside torch's allocator (RuntimeError)."""
    with pytest.raises(ValueError, match=r"hidden_size=1,000,000,000.* makes [\d,]+ parameters, .* GiB in float32 "
                                         r"on cpu, but .* GiB is available"):
        NeoXForSequenceClassification(small(hidden_size=10**9, num_attention_heads=8))


def test_the_estimate_is_the_exact_parameter_count_and_real_models_pass():
    for cfg in (small(), small(tie_word_embeddings=True, attention_bias=False), PRESETS["pythia-160m"]):
        with torch.device("meta"):
            model = NeoXForCausalLM(cfg)
        assert cfg.parameter_count() == sum(p.numel() for p in model.parameters())
    check_fits(PRESETS["gpt-neox-20b"], torch.float16, "meta")  # 44 blocks of objects: fine anywhere
    host = available_bytes(torch.device("cpu"))
    assert host is not None and host > 0
    assert 44 * BLOCK_OBJECT_BYTES < host


def test_from_pretrained_refuses_absurd_config_json_before_building(tmp_path):
    model = NeoXForCausalLM(small())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in ((dict(num_attention_heads=0), r"num_attention_heads = 0: must be a positive integer"),
                            (dict(num_attention_heads="4"), r"num_attention_heads = '4': must be a positive"),
                            (dict(num_hidden_layers=10**6), r"num_hidden_layers=1,000,000.*blocks need"),
                            (dict(hidden_size=10**9, num_attention_heads=8), r"hidden_size=1,000,000,000.* makes")):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            NeoXForCausalLM.from_pretrained(tmp_path)
