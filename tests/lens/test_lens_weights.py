"""TransformerLens-layout weights (W_Q, W_O, W_U, QK, OV ...) against the streams the model computes:
model-wide on HookedTransformer (lens/weights.py), per block on every class's modules (model/weights.py).

Each check recomputes a hooked stream from the TL-layout weights in fp64 and compares it with what
the forward pass cached: same expression, different association order, so the gap is a few units of
roundoff (u = 1.1e-16) times the stream's norm; 1e-12 relative leaves 10^4 u of margin while a wrong
head split, a transposed weight or a q/k/v mix-up is O(1).
"""

from __future__ import annotations

import pytest
import torch
from einops import einsum
from hypothesis import given
from hypothesis import strategies as st

from neox_lab import (
    FactoredMatrix,
    HookedTransformer,
    NeoXForCausalLM,
    NeoXForQuestionAnswering,
    NeoXForSequenceClassification,
    NeoXForTokenClassification,
    NeoXModel,
    NeoXTokenizer,
)
from neox_lab.testing.pairs import tiny_config
from neox_lab.testing.strategies import neox_configs

REL = 1e-12


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


def random_model(cfg, seed):
    torch.manual_seed(seed)
    model = NeoXForCausalLM(cfg, attn_backend="eager").double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("ln1.weight") else torch.randn_like(p) * 0.3)
    return HookedTransformer(model)


@given(cfg=neox_configs(max_layers=2, scaling=False), seed=st.integers(0, 2**16))
def test_tl_weights_reproduce_the_hooked_streams(cfg, seed):
    model = random_model(cfg, seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    n_layers, n_heads, d_model, d_head = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size,
                                          cfg.head_dim)
    assert model.W_Q.shape == model.W_K.shape == model.W_V.shape == (n_layers, n_heads, d_model, d_head)
    assert model.W_O.shape == (n_layers, n_heads, d_head, d_model)
    assert model.b_Q.shape == (n_layers, n_heads, d_head) and model.b_O.shape == (n_layers, d_model)
    assert model.W_in.shape == (n_layers, d_model, cfg.intermediate_size)
    assert model.W_out.shape == (n_layers, cfg.intermediate_size, d_model)
    assert model.W_E.shape == (cfg.vocab_size, d_model) and model.W_U.shape == (d_model, cfg.vocab_size)
    assert torch.equal(model.b_U, torch.zeros(cfg.vocab_size, dtype=torch.float64))
    assert torch.equal(cache["hook_embed"], model.W_E[ids])
    for layer, block in enumerate(model.blocks):
        x = block.ln1(cache[f"blocks.{layer}.hook_resid_pre"])
        for name, w, b in (("q", model.W_Q, model.b_Q), ("k", model.W_K, model.b_K), ("v", model.W_V, model.b_V)):
            ours = einsum(x, w[layer], "b p d, h d e -> b p h e") + b[layer]
            assert rel(ours, cache[f"blocks.{layer}.attn.hook_{name}"]) < REL, name
        attn_out = einsum(cache[f"blocks.{layer}.attn.hook_z"], model.W_O[layer], "b p h e, h e d -> b p d")
        assert rel(attn_out + model.b_O[layer], cache[f"blocks.{layer}.hook_attn_out"]) < REL
        pre = einsum(block.ln2(cache[f"blocks.{layer}.hook_resid_pre" if cfg.use_parallel_residual
                                     else f"blocks.{layer}.hook_resid_mid"]), model.W_in[layer], "b p d, d m -> b p m")
        assert rel(pre + model.b_in[layer], cache[f"blocks.{layer}.mlp.hook_pre"]) < REL
        mlp_out = einsum(cache[f"blocks.{layer}.mlp.hook_post"], model.W_out[layer], "b p m, m d -> b p d")
        assert rel(mlp_out + model.b_out[layer], cache[f"blocks.{layer}.hook_mlp_out"]) < REL
        # Per block: the same numbers.
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            assert torch.equal(getattr(block.attn, name), getattr(model, name)[layer]), name
        for name in ("W_in", "W_out", "b_in", "b_out"):
            assert torch.equal(getattr(block.mlp, name), getattr(model, name)[layer]), name
    logits = einsum(model.ln_final(cache[f"blocks.{n_layers - 1}.hook_resid_post"]), model.W_U,
                    "b p d, d v -> b p v") + model.b_U
    assert rel(logits, cache["hook_logits"]) < REL
    # The circuits: QK's bilinear form on the *unrotated* q and k inputs, OV's map from value input to output.
    qk, ov = model.QK, model.OV
    assert isinstance(qk, FactoredMatrix) and qk.shape == (n_layers, n_heads, d_model, d_model)
    assert rel(qk.AB, model.W_Q @ model.W_K.transpose(-2, -1)) < REL
    assert rel(ov.AB, model.W_V @ model.W_O) < REL
    assert rel(model.blocks[0].attn.OV.AB, ov[0].AB) < REL and rel(qk[0, 0].AB, model.blocks[0].attn.QK[0].AB) < REL


def test_per_block_weights_are_views_that_write_through():
    model = random_model(tiny_config(), 0)
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    with torch.no_grad():
        attn.W_Q[2].zero_()
        attn.b_V[1].fill_(7.0)
        attn.W_O[0].mul_(0)
        mlp.W_in[:, 3].fill_(2.0)
        model.W_E[5].fill_(1.5)
        model.W_U[:, 4].fill_(-1.0)
    assert torch.equal(model.W_Q[1, 2], torch.zeros_like(model.W_Q[1, 2]))
    assert torch.equal(model.b_V[1, 1], torch.full_like(model.b_V[1, 1], 7.0))
    assert float(model.W_O[1, 0].abs().max()) == 0.0
    assert torch.equal(model.blocks[1].mlp.fc_in.weight[3], torch.full_like(mlp.fc_in.weight[3], 2.0))
    assert float(model.hf().model.embed.weight[5].sub(1.5).abs().max()) == 0.0
    assert float(model.unembed.weight[4].add(1.0).abs().max()) == 0.0
    # Model-wide stacks are copies, as TransformerLens' torch.stack makes them.
    stacked = model.W_K
    with torch.no_grad():
        stacked.zero_()
    assert float(model.W_K.abs().max()) > 0


@pytest.mark.parametrize("cls", [NeoXModel, NeoXForCausalLM, NeoXForSequenceClassification,
                                 NeoXForTokenClassification, NeoXForQuestionAnswering])
def test_every_class_has_per_block_weights_and_sends_model_wide_names_to_hooked(cls):
    model = cls(tiny_config())
    assert len(model.blocks) == 2 and model.blocks[0].attn.W_Q.shape == (4, 32, 8)
    assert model.blocks[1].mlp.W_in.shape == (32, 64)
    for name in ("W_in", "W_U", "W_pos", "QK"):
        with pytest.raises(AttributeError, match="HookedTransformer"):
            getattr(model, name)
    with pytest.raises(AttributeError, match="W_nonsense"):
        _ = model.W_nonsense


def test_hooked_transformer_weights():
    model = HookedTransformer(NeoXForCausalLM(tiny_config()))
    assert model.W_in.shape == (2, 32, 64) and model.W_U.shape == (32, 97)
    with pytest.raises(AttributeError, match="rotary"):
        _ = model.W_pos
    assert not hasattr(model, "W_pos")
    with pytest.raises(AttributeError, match="W_nonsense"):
        _ = model.W_nonsense
    assert model.all_head_labels()[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    with pytest.raises(TypeError, match="views a NeoXForCausalLM"):
        HookedTransformer(NeoXForSequenceClassification(tiny_config()))


def test_no_attention_bias_reports_zero_biases():
    model = HookedTransformer(NeoXForCausalLM(tiny_config(attention_bias=False)))
    assert torch.equal(model.b_Q, torch.zeros(2, 4, 8)) and torch.equal(model.b_O, torch.zeros(2, 32))


def test_token_helpers():
    model = random_model(tiny_config(vocab_size=50304, hidden_size=16, num_attention_heads=2), 0)
    model.tokenizer = NeoXTokenizer.default()
    mary = model.to_single_token(" Mary")
    assert model.to_str_tokens([mary]) == [" Mary"] and model.to_single_str_token(mary) == " Mary"
    with pytest.raises(ValueError, match="not a single token"):
        model.to_single_token(" Maryland is a state")
    with pytest.raises(ValueError, match="0 tokens"):
        model.to_single_token("")
    text = "When Mary and John went to the store, John gave a drink to Mary"
    tokens = model.to_tokens(text, prepend_bos=False)[0]
    assert model.get_token_position(" Mary", text, prepend_bos=False) == 1
    assert model.get_token_position(" Mary", text, mode="last", prepend_bos=False) == len(tokens) - 1
    assert model.get_token_position(" Mary", text, prepend_bos=True) == 2
    assert model.get_token_position(mary, tokens[None], mode="last") == len(tokens) - 1
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position(" Bob", text)
    with pytest.raises(ValueError, match="mode"):
        model.get_token_position(" Mary", text, mode="middle")
    with pytest.raises(ValueError, match="one sequence"):
        model.get_token_position(" Mary", torch.stack([tokens, tokens]))
    assert torch.equal(model.tokens_to_residual_directions(" Mary"), model.W_U[:, mary])
    assert torch.equal(model.tokens_to_residual_directions(mary), model.W_U[:, mary])
    batch = torch.tensor([[mary, 3], [4, 5]])
    dirs = model.tokens_to_residual_directions(batch)
    assert dirs.shape == (2, 2, 16) and torch.equal(dirs[0, 0], model.W_U[:, mary])
