"""HookedTransformer's calling convention (TransformerLens 3.9's, lens/hooked_transformer.py): text and token
inputs, return_type, start_at_layer / stop_at_layer, loss_fn, run_with_cache / run_with_hooks returns,
generate's defaults and return types; and the transformers-convention class refusing those calls.

fp64 model, so differences in the padded-row checks are rounding (1e-12) or an error (1e-1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neox_lab import HookedTransformer, NeoXConfig, NeoXForCausalLM, NeoXModel, NeoXOutput
from neox_lab.lens.hooked_transformer import Output
from neox_lab.tokenizer import NeoXTokenizer

EOT = 0
CFG = NeoXConfig(vocab_size=50304, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, rotary_pct=0.5, max_position_embeddings=64)
FP64 = dict(atol=1e-12, rtol=1e-12)


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    m = NeoXForCausalLM(CFG, attn_backend="eager").eval().double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    m.tokenizer = NeoXTokenizer.default()
    return m


@pytest.fixture(scope="module")
def model(hf):
    return HookedTransformer(hf)


def test_model_tokens_returns_logits_and_row_zero_is_batch_row_zero(model, hf):
    """The silent difference the issue found: `model(tokens)[0][-1].argmax()` is the last position of row 0."""
    tokens = model.to_tokens(["The cat sat on the", "A dog ran to"])
    with torch.no_grad():
        logits = model(tokens)
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, tokens.shape[1], CFG.vocab_size)
        ref = hf(tokens).logits
        torch.testing.assert_close(logits, ref, **FP64)
        assert model(tokens)[0][-1].argmax() == ref[0, -1].argmax()
        out = model.run_with_hooks(tokens, fwd_hooks=[])
        assert isinstance(out, torch.Tensor) and torch.equal(out, logits)
        with model.hooks(fwd_hooks=[]):
            assert isinstance(model(tokens), torch.Tensor)


def test_return_types_and_text_inputs(model, hf):
    text = ["The cat sat", "A dog"]
    tokens = model.to_tokens(text)
    assert tokens[1, -1] == EOT  # right-padded with the pad (= eos) token, no bos
    with torch.no_grad():
        logits = model(text)
        # TransformerLens makes no attention mask for right padding: every position is computed as is
        torch.testing.assert_close(logits, hf(tokens).logits, **FP64)
        assert model(text, return_type=None) is None
        loss = model(text, return_type="loss")
        # ... and a loss over right-padded text counts the pad positions too, as TransformerLens does
        want = F.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1))
        torch.testing.assert_close(loss, want, **FP64)
        per_token = model(text, return_type="loss", loss_per_token=True)
        assert per_token.shape == (2, tokens.shape[1] - 1)
        both = model(tokens, return_type="both")
        assert isinstance(both, Output) and torch.equal(both.logits, logits) and torch.equal(both.loss, loss)
        # an explicit mask counts only real next tokens, as TransformerLens' loss does
        mask = (tokens != EOT).long()
        masked = model(tokens, return_type="loss", attention_mask=mask)
        torch.testing.assert_close(masked, hf(tokens, mask, labels=tokens.masked_fill(mask == 0, -100)).loss, **FP64)
        one = model("The cat sat", prepend_bos=True)
        torch.testing.assert_close(one, hf(model.to_tokens("The cat sat", prepend_bos=True)).logits, **FP64)
        _, cache = model.run_with_cache("The cat sat")
        assert cache["resid_pre", 0].shape == (1, 3, 16)


def test_left_padded_text_gets_transformerlens_mask(model, hf):
    text = ["The cat sat", "A dog"]
    tokens = model.to_tokens(text, padding_side="left")
    assert tokens[1, 0] == EOT
    with torch.no_grad():
        logits = model(text, padding_side="left")
        mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
        torch.testing.assert_close(logits, hf(tokens, mask).logits, **FP64)
        # the unpadded row alone computes what its padded copy computes
        torch.testing.assert_close(logits[1, 1:], model("A dog")[0], **FP64)


def test_loss_fn_is_transformerlens_cross_entropy(model):
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    with torch.no_grad():
        logits = model(ids)
        want = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
        torch.testing.assert_close(model.loss_fn(logits, ids, per_token=True)[0], want, **FP64)
        torch.testing.assert_close(model(ids, return_type="loss", loss_per_token=True)[0], want, **FP64)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        per = model.loss_fn(logits, ids, mask, per_token=True)
        assert (per[0, 2:] == 0).all()
        torch.testing.assert_close(model.loss_fn(logits, ids, mask), per.sum() / 6, **FP64)
        # int32 ids give the same loss as int64 (cross-entropy wants int64)
        assert torch.equal(model(ids.int(), return_type="loss"), model(ids, return_type="loss"))


def test_start_and_stop_at_layer(model, hf):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        full = model(ids)
        _, cache = model.run_with_cache(ids)
        resid = model(ids, stop_at_layer=1)
        assert isinstance(resid, torch.Tensor) and resid.shape == (1, 4, 16)
        torch.testing.assert_close(resid, cache["resid_pre", 1], **FP64)
        torch.testing.assert_close(model(resid, start_at_layer=1), full, **FP64)
        torch.testing.assert_close(model(ids, stop_at_layer=-1), cache["resid_pre", 1], **FP64)  # all but the last
        torch.testing.assert_close(model(ids, stop_at_layer=0), cache["hook_embed"], **FP64)
        torch.testing.assert_close(model(ids, stop_at_layer=2), cache["resid_post", 1], **FP64)  # no ln_final
        loss = model(resid, start_at_layer=1, tokens=ids, return_type="loss")
        torch.testing.assert_close(loss, model(ids, return_type="loss"), **FP64)
        with pytest.raises(ValueError, match="needs tokens="):
            model(resid, start_at_layer=1, return_type="loss")
        stream, early = model.run_with_cache(ids, stop_at_layer=-1)
        torch.testing.assert_close(stream, cache["resid_pre", 1], **FP64)
        assert "blocks.0.hook_resid_post" in early and "blocks.1.hook_resid_pre" not in early


@pytest.mark.parametrize("bad, error, match", [(3, ValueError, r"outside \[-2, 2\]"), (-3, ValueError, "outside"),
                                               (1.5, TypeError, "must be an int"), (True, TypeError, "must be an int")])
def test_stop_at_layer_out_of_range_or_not_an_int_raises_on_both_classes(model, hf, bad, error, match):
    """Issue 28 item 13: -1 is all but the last layer; out-of-range and non-int values are clear errors."""
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        for call in (lambda: model(ids, stop_at_layer=bad), lambda: hf(ids, stop_at_layer=bad),
                     lambda: model.run_with_cache(ids, stop_at_layer=bad), lambda: hf.body(ids, stop_at_layer=bad)):
            with pytest.raises(error, match=match):
                call()


def test_stop_at_layer_minus_one_on_the_transformers_class(hf):
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = hf(ids, stop_at_layer=-1)
        _, cache = hf.run_with_cache(ids)
        assert isinstance(out, NeoXOutput) and out.logits is None
        torch.testing.assert_close(out.last_hidden_state, cache["resid_pre", 1], **FP64)
        body = NeoXModel(CFG).double()
        mid = body(ids, stop_at_layer=-1).last_hidden_state
        torch.testing.assert_close(body(inputs_embeds=mid, start_at_layer=-1).last_hidden_state,
                                   body(ids).last_hidden_state, **FP64)


def test_run_with_cache_int_pos_slice_keeps_the_position_axis(model):
    """TransformerLens' run_with_cache turns an int pos_slice into [int] (Slice.unwrap); the cache methods'
    int pos_slice drops the axis."""
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        _, full = model.run_with_cache(ids)
        _, last = model.run_with_cache(ids, pos_slice=-1)
    assert last["resid_post", 1].shape == (1, 1, 16)
    assert last["z", 0].shape == (1, 1, 2, 8) and last["pattern", 0].shape == (1, 2, 1, 4)
    torch.testing.assert_close(last["resid_post", 1][:, 0], full["resid_post", 1][:, -1], **FP64)
    assert full.decompose_resid(pos_slice=-1).shape[1:] == (1, 16)  # [component batch d_model]: dropped


def test_transformers_class_refuses_transformerlens_calls(hf):
    ids = torch.tensor([[5, 6, 7]])
    for call in (lambda: hf(ids, return_type="logits"), lambda: hf("The cat"), lambda: hf(["a", "b"]),
                 lambda: hf(ids, "loss"), lambda: hf(ids, prepend_bos=False), lambda: hf(ids, loss_per_token=True),
                 lambda: hf(torch.zeros(1, 3, 16, dtype=torch.float64), start_at_layer=1),
                 lambda: hf.generate("Hello", max_new_tokens=2), lambda: hf.generate(ids, return_type="str"),
                 lambda: hf.generate(ids, max_new_tokens=2, verbose=False),
                 lambda: NeoXForCausalLM.from_pretrained("unused", fold_ln=True)):
        with pytest.raises(TypeError, match="HookedTransformer"):
            call()
    for name in ("to_tokens", "W_Q", "W_U", "process_weights_", "loss_fn", "QK"):
        with pytest.raises(AttributeError, match="HookedTransformer"):
            getattr(hf, name)
    # What stays: transformers' convention, with neox_lab's hook API
    out = hf(ids, labels=ids)
    assert isinstance(out, NeoXOutput) and out[1] is out.logits
    with pytest.raises(TypeError, match="out.logits"):
        out[0, -1]


def test_hf_output_unpacks_like_a_model_output(hf):
    ids = torch.tensor([[5, 6, 7]])
    out = hf(ids, labels=ids)
    loss, logits = out[0], out[1]
    assert loss is out.loss and logits is out.logits
    a, b = out
    assert a is out.loss and b is out.logits
    assert out.to_tuple() == (out.loss, out.logits)


def test_perma_hooks(model, hf):
    ids = torch.tensor([[5, 6, 7]])
    seen = []
    model.add_perma_hook("blocks.0.hook_resid_pre", lambda x, hook: seen.append(1))
    model.reset_hooks()
    model(ids)
    assert seen == [1]
    model.reset_hooks(including_permanent=True)
    model(ids)
    assert seen == [1]
    assert model.mod_dict["blocks.0.attn"] is hf.model.blocks[0].attn


def test_generate_defaults_and_return_types(model):
    """TransformerLens' generate: samples by default, str in -> str out (a one-prompt list too), no bos
    added unless asked (cfg.default_prepend_bos is False for GPT-NeoX)."""
    text = model.generate("Hello", max_new_tokens=3, do_sample=False, verbose=False)
    assert isinstance(text, str) and text.startswith("Hello")
    toks = model.generate("Hello", max_new_tokens=3, do_sample=False, return_type="tokens", verbose=False)
    assert toks.shape == (1, 4) and toks[0, 0] != EOT and model.to_string(toks[0]) == text
    assert model.generate(["Hello"], max_new_tokens=3, do_sample=False, verbose=False) == text  # one row: a str
    both = model.generate(["Hello", "A b c"], max_new_tokens=2, do_sample=False, verbose=False)
    assert isinstance(both, list) and both[0].startswith("Hello") and both[1].startswith("A b c")
    assert torch.equal(model.generate(toks, max_new_tokens=1, do_sample=False, verbose=False)[:, :4], toks)
    # sampling is the default and draws from the global RNG as TransformerLens' Categorical does
    torch.manual_seed(0)
    a = model.generate("Hello", max_new_tokens=6, verbose=False, stop_at_eos=False)
    torch.manual_seed(0)
    assert model.generate("Hello", max_new_tokens=6, verbose=False, stop_at_eos=False) == a
    greedy = model.generate("Hello", max_new_tokens=6, do_sample=False, verbose=False, stop_at_eos=False)
    assert model.generate("Hello", max_new_tokens=6, temperature=0.0, verbose=False, stop_at_eos=False) == greedy
    with pytest.raises(ValueError, match="return_type"):
        model.generate("Hello", max_new_tokens=1, return_type="embeds", verbose=False)
    with pytest.raises(TypeError, match="output_logits"):
        model.generate("Hello", max_new_tokens=1, output_logits=True, verbose=False)


def test_generate_finished_rows_get_eos_and_match_the_transformers_loop(model, hf):
    prompt = model.to_tokens("Hello there")
    with torch.no_grad():
        first = hf(prompt).logits[0, -1].argmax().item()
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=first, verbose=False)
    assert out.shape == (1, prompt.shape[1] + 1) and out[0, -1] == first  # stopped at its eos
    free = model.generate(prompt, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(free, hf.generate(prompt, max_new_tokens=4, eos_token_id=None))


def test_a_cached_decoding_step_is_not_taken_for_left_padding(hf, recwarn):
    """After a KV cache, a row whose next token is the pad id (a finished row, or eos == pad) is not a
    left-padded prompt: no warning."""
    pad = hf.tokenizer.pad_token_id
    with torch.no_grad():
        out = hf(torch.tensor([[5, 6, 7], [8, 9, 10]]), use_cache=True)
        hf(torch.tensor([[pad], [7]]), past_key_values=out.past_key_values)
    assert not [w for w in recwarn if "left-padded" in str(w.message)]
    with pytest.warns(UserWarning, match="left-padded"):  # a prompt batch still warns
        hf(torch.tensor([[pad, 5, 6], [7, 8, 9]]))
    bare = NeoXModel(CFG.replace(pad_token_id=7))
    with pytest.warns(UserWarning, match="left-padded"):
        bare(torch.tensor([[7, 7, 5], [5, 6, 8]]))
