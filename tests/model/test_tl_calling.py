"""TransformerLens' calling conventions on neox_lab models (issue 13): text and token inputs,
return_type, to_tokens padding, config aliases, start_at_layer, generate's return_type.

fp64 model so differences in the padded-row checks are rounding (1e-12) or an error (1e-1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neox_lab import NeoXConfig, NeoXForCausalLM, NeoXModel, NeoXOutput
from neox_lab.tokenizer import NeoXTokenizer

EOT = 0
CFG = NeoXConfig(vocab_size=50304, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, rotary_pct=0.5, max_position_embeddings=64)
FP64 = dict(atol=1e-12, rtol=1e-12)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = NeoXForCausalLM(CFG, attn_backend="eager").eval().double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    m.tokenizer = NeoXTokenizer.default()
    return m


def test_batched_to_tokens_pads_right_and_keeps_every_prompt_exact(model):
    short, long = "Hello", "Hello world, again"
    batch = model.to_tokens([short, long])
    pad = model.tokenizer.pad_token_id
    assert batch[0, 0] == EOT and batch[0, -1] == pad       # bos prepended, padding on the right
    alone = model.to_tokens(short)
    n = alone.shape[1]
    assert torch.equal(batch[0, :n], alone[0])
    with torch.no_grad():
        together = model(batch).logits[0, :n]
        torch.testing.assert_close(together, model(alone).logits[0], **FP64)
    left = model.to_tokens([short, long], padding_side="left")
    assert left[0, 0] == pad and left[0, -1] != pad
    with pytest.warns(UserWarning, match="left-padded.*attention_mask"):
        model(left)
    bare = NeoXModel(CFG.replace(pad_token_id=7))
    with pytest.warns(UserWarning, match="left-padded"):
        bare(torch.tensor([[7, 7, 5], [5, 6, 8]]))


def test_return_types_and_text_inputs(model):
    text = ["The cat sat", "A dog"]
    tokens = model.to_tokens(text)
    mask = (torch.arange(tokens.shape[1])[None] < torch.tensor([[4], [3]])).long()
    with torch.no_grad():
        logits = model(text)                                   # TransformerLens: logits by default
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, tokens.shape[1], CFG.vocab_size)
        ref = model(tokens, attention_mask=mask).logits
        torch.testing.assert_close(logits, ref, **FP64)
        assert model(text, return_type=None) is None
        loss = model(text, return_type="loss")
        per_token = model(text, return_type="loss", loss_per_token=True)
        assert per_token.shape == (2, tokens.shape[1] - 1)
        both = model(tokens, return_type="both", attention_mask=mask)
        assert isinstance(both, tuple) and torch.equal(both[0], ref)
        # the loss is the mean over real next tokens, as TransformerLens and as labels= with -100 padding
        labels = tokens.masked_fill(mask == 0, -100)
        torch.testing.assert_close(loss, model(tokens, attention_mask=mask, labels=labels).loss, **FP64)
        torch.testing.assert_close(per_token[mask[:, 1:] == 1].mean(), loss, **FP64)
        one = model("The cat sat", prepend_bos=False)
        torch.testing.assert_close(one[0], model(tokens[:1, 1:4]).logits[0], **FP64)
        _, cache = model.run_with_cache("The cat sat", return_type="logits")
        assert cache["resid_pre", 0].shape == (1, 4, 16)
        out = model.run_with_hooks(text, return_type="logits", fwd_hooks=[])
        torch.testing.assert_close(out, logits, **FP64)


def test_hf_output_unpacks_like_a_model_output(model):
    ids = torch.tensor([[5, 6, 7]])
    out = model(ids, labels=ids)
    assert isinstance(out, NeoXOutput)
    loss, logits = out[0], out[1]
    assert loss is out.loss and logits is out.logits
    a, b = out
    assert a is out.loss and b is out.logits
    assert out.to_tuple() == (out.loss, out.logits)
    with pytest.raises(TypeError, match="return_type='logits'"):
        out[0, -1]


def test_config_aliases():
    cfg = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64, hidden_act="gelu")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab, cfg.n_ctx) == \
        (3, 32, 4, 8, 64, 97, 64)
    assert (cfg.act_fn, cfg.normalization_type, cfg.positional_embedding_type) == ("gelu", "LN", "rotary")
    assert cfg.rotary_dim == 2 and cfg.parallel_attn_mlp is True


def test_start_and_stop_at_layer(model):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        full = model(ids).logits
        resid = model(ids, stop_at_layer=1, return_type="logits")
        assert resid.shape == (1, 4, 16)
        torch.testing.assert_close(model(resid, start_at_layer=1), full, **FP64)
        _, cache = model.run_with_cache(ids)
        torch.testing.assert_close(resid, cache["resid_pre", 1], **FP64)
        body = NeoXModel(CFG).double()
        mid = body(ids, stop_at_layer=1).last_hidden_state
        torch.testing.assert_close(body(inputs_embeds=mid, start_at_layer=1).last_hidden_state,
                                   body(ids).last_hidden_state, **FP64)


def test_perma_hooks(model):
    ids = torch.tensor([[5, 6, 7]])
    seen = []
    model.add_perma_hook("blocks.0.hook_resid_pre", lambda x, hook: seen.append(1))
    model.reset_hooks()
    model(ids)
    assert seen == [1]
    model.reset_hooks(including_permanent=True)
    model(ids)
    assert seen == [1]
    assert model.mod_dict["blocks.0.attn"] is model.model.blocks[0].attn


def test_generate_return_types(model):
    text = model.generate("Hello", max_new_tokens=3, return_type="str", verbose=False)
    # As TransformerLens: the bos that prepend_bos added is not part of the text returned.
    assert isinstance(text, str) and text.startswith("Hello") and "<|endoftext|>" not in text[:13]
    ids = model.generate("Hello", max_new_tokens=3, verbose=False)           # "input": str in, str out
    assert ids == text
    toks = model.generate("Hello", max_new_tokens=3, return_type="tokens", verbose=False)
    assert toks.shape == (1, 5) and model.to_string(toks[0, 1:]) == text
    both = model.generate(["Hello", "A b c"], max_new_tokens=2, return_type="str", verbose=False)
    assert isinstance(both, list) and len(both) == 2
    # The short prompt was left-padded to decode: its text carries neither the padding nor the bos.
    assert both[0].startswith("Hello") and both[1].startswith("A b c") and "<|padding|>" not in both[0]
    one = model.generate(["Hello"], max_new_tokens=2, verbose=False)          # a list in, a list out
    assert isinstance(one, list) and len(one) == 1
    assert torch.equal(model.generate(toks, max_new_tokens=1, verbose=False)[:, :5], toks)


def test_loss_per_token_matches_cross_entropy(model):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        logits = model(ids).logits
        want = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
        torch.testing.assert_close(model(ids, return_type="loss", loss_per_token=True)[0], want, **FP64)


def test_int32_ids_give_the_same_loss_as_int64(model):
    """int32 ids are accepted as input; the losses must accept them too (cross-entropy wants int64)."""
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    with torch.no_grad():
        want = model(ids, return_type="loss")
        assert torch.equal(model(ids.int(), return_type="loss"), want)
        assert torch.equal(model(ids.int(), labels=ids.int()).loss, model(ids, labels=ids).loss)


def test_a_cached_decoding_step_is_not_taken_for_left_padding(model, recwarn):
    """After a KV cache, a row whose next token is the pad id (a finished row, or eos == pad) is not a
    left-padded prompt: no warning."""
    pad = model.tokenizer.pad_token_id
    with torch.no_grad():
        out = model(torch.tensor([[5, 6, 7], [8, 9, 10]]), use_cache=True)
        model(torch.tensor([[pad], [7]]), past_key_values=out.past_key_values)
    assert not [w for w in recwarn if "left-padded" in str(w.message)]
    with pytest.warns(UserWarning, match="left-padded"):  # a prompt batch still warns
        model(torch.tensor([[pad, 5, 6], [7, 8, 9]]))
