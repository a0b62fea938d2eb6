"""HookedTransformer is a view: the same modules, parameters, buffers, hook points, tokenizer, attention
backend and switches as the NeoXForCausalLM it wraps, so switching costs nothing and copies nothing; and
its `cfg` answers TransformerLens' config fields."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import neox_lab
from neox_lab import HookedTransformer, LensConfig, NeoXConfig, NeoXForCausalLM, NeoXTokenizer
from neox_lab.lens.config import FIELDS
from neox_lab.testing.pairs import make_trained_like, tiny_config


@pytest.fixture()
def pair():
    hf = make_trained_like(NeoXForCausalLM(tiny_config(), attn_backend="eager"), 0).eval()
    hf.tokenizer = NeoXTokenizer.default()
    return hf, HookedTransformer(hf)


def test_the_view_shares_every_parameter_buffer_and_hook_point(pair):
    hf, hooked = pair
    assert hooked.hf() is hf and not isinstance(hooked, NeoXForCausalLM)
    assert [id(p) for p in hooked.parameters()] == [id(p) for p in hf.parameters()]
    ours = dict(hooked.named_buffers())
    assert ours and all(any(b is o for o in hf.buffers()) for b in ours.values())
    assert hooked.hook_dict.keys() == hf.hook_dict.keys()
    assert all(hooked.hook_dict[n] is hf.hook_dict[n] for n in hf.hook_dict)
    assert hooked.blocks is hf.model.blocks and hooked.unembed is hf.unembed and hooked.config is hf.cfg
    theirs = hf.state_dict()
    mine = hooked.state_dict()
    assert {k.removeprefix("model."): v for k, v in theirs.items()}.keys() == mine.keys()
    assert all(mine[k.removeprefix("model.")].data_ptr() == v.data_ptr() for k, v in theirs.items())


def test_a_hook_added_through_one_view_fires_when_the_other_runs(pair):
    hf, hooked = pair
    ids = torch.tensor([[3, 4, 5, 6]])
    seen = []
    hooked.add_hook("blocks.1.attn.hook_z", lambda z, hook: seen.append(("hooked", hook.name)))
    hf.add_hook("blocks.0.hook_resid_post", lambda x, hook: seen.append(("hf", hook.name)))
    with torch.no_grad():
        hf(ids)
        assert seen == [("hf", "blocks.0.hook_resid_post"), ("hooked", "blocks.1.attn.hook_z")]
        seen.clear()
        hooked(ids)
    assert seen == [("hf", "blocks.0.hook_resid_post"), ("hooked", "blocks.1.attn.hook_z")]
    hooked.reset_hooks()  # removes the hooks added through either view
    assert not any(hp.active for hp in hf.hook_dict.values())


def test_state_is_shared_both_ways(pair):
    hf, hooked = pair
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        hooked.blocks[0].attn.W_O[1].zero_()  # an in-place edit through one view
        torch.testing.assert_close(hooked(ids), hf(ids).logits, atol=0, rtol=0)
    hooked.set_attn_backend("sdpa")
    assert hf.attn_backend == "sdpa"
    hf.set_use_attn_result(True)
    assert hooked.use_attn_result and hooked.cfg.use_attn_result
    hooked.cfg.use_attn_result = False
    assert not hf.use_attn_result
    hooked.train()
    assert hf.training and hf.model.blocks[0].training
    hf.eval()
    assert not hooked.training
    tok = NeoXTokenizer.default(pad_token="<|padding|>")
    hooked.tokenizer = tok
    assert hf.tokenizer is tok
    hooked.double()
    assert hf.unembed.weight.dtype == torch.float64 and hooked.cfg.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(hooked(ids), hf(ids).logits, atol=0, rtol=0)  # rotary tables moved too
    # Making the view leaves the viewed model's mode alone.
    hf.eval()
    HookedTransformer(hf)
    assert not hf.training


def test_a_config_builds_a_fresh_model():
    hooked = HookedTransformer(tiny_config())
    assert isinstance(hooked.hf(), NeoXForCausalLM) and not hooked.training
    assert hooked(torch.tensor([[1, 2, 3]])).shape == (1, 3, 97)


def test_cfg_has_transformerlens_fields(pair):
    hf, hooked = pair
    cfg = hooked.cfg
    assert isinstance(cfg, LensConfig)
    c = hf.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab, cfg.d_vocab_out, cfg.n_ctx) == \
        (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size,
         c.vocab_size, c.vocab_size, c.max_position_embeddings)
    assert cfg.device == "cpu" and cfg.original_architecture == "GPTNeoXForCausalLM"
    assert cfg.normalization_type == "LN" and cfg.default_prepend_bos is False and cfg.n_key_value_heads is None
    assert cfg.positional_embedding_type == "rotary" and cfg.parallel_attn_mlp == c.use_parallel_residual
    assert cfg.n_params == c.num_hidden_layers * (4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size)
    assert cfg.attn_scale == c.head_dim**0.5 and cfg.rotary_dim == c.rotary_dim
    assert cfg.tokenizer_prepends_bos is False  # the checkpoint's tokenizer adds no bos
    assert set(cfg.to_dict()) == set(FIELDS) and len(FIELDS) == 87
    with pytest.raises(AttributeError, match="read-only"):
        cfg.d_model = 3
    with pytest.raises(AttributeError, match="model.config"):
        _ = cfg.num_hidden_layers


def test_transformers_config_keeps_transformers_names_only():
    """NeoXConfig no longer claims TransformerLens' names (normalization_type said "LN" after fold_ln);
    those are LensConfig's."""
    names = {f.name for f in dataclasses.fields(NeoXConfig)}
    assert "n_layers" not in names
    for name in ("n_layers", "d_model", "normalization_type", "d_vocab", "act_fn", "device"):
        with pytest.raises(AttributeError, match="HookedTransformer"):
            getattr(NeoXConfig(), name)


def test_top_level_exports():
    assert neox_lab.HookedTransformer is HookedTransformer and neox_lab.LensConfig is LensConfig


def test_making_a_view_keeps_the_models_stream_flags(pair):
    """A view made after a stream flag was switched on must not switch it off (nor drop hooks on its points)."""
    hf, _ = pair
    hf.set_use_split_qkv_input(True)
    hf.add_hook("blocks.0.hook_k_input", lambda x, hook: None)
    hooked = HookedTransformer(hf)
    assert hf.use_split_qkv_input and hooked.use_split_qkv_input and hooked.cfg.use_split_qkv_input
    assert "blocks.0.hook_q_input" in hooked.hook_dict and hf.hook_dict["blocks.0.hook_k_input"].active
    # switching through either view is shared
    hf.reset_hooks()
    hooked.set_use_split_qkv_input(False)
    assert not hf.use_split_qkv_input and "blocks.0.hook_q_input" not in hf.hook_dict
