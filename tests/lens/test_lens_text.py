"""HookedTransformer's text conveniences (lens/text.py): to_tokens / to_string / to_str_tokens with
TransformerLens 3.9's defaults for a GPT-NeoX checkpoint (no BOS unless asked, right padding, rows cut
to n_ctx), and the tokenizer's round trip through save_pretrained / from_pretrained."""

import pytest
import torch

from neox_lab import HookedTransformer, NeoXConfig, NeoXForCausalLM
from neox_lab.model.tasks import MODEL_CLASSES
from neox_lab.tokenizer import NeoXTokenizer

EOT, PAD = 0, 1  # ids of <|endoftext|> and <|padding|>
CFG = NeoXConfig(vocab_size=50304, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, rotary_pct=0.5, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tok():
    return NeoXTokenizer.default()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = NeoXForCausalLM(CFG).eval()
    m.tokenizer = tok
    return HookedTransformer(m)


def test_the_transformers_classes_send_text_methods_to_hooked_transformer():
    for cls in MODEL_CLASSES.values():
        m = cls(CFG.replace(vocab_size=64))
        for name in ("to_tokens", "to_string", "to_str_tokens", "to_single_token"):
            with pytest.raises(AttributeError, match="HookedTransformer"):
                getattr(m, name)


def test_to_tokens(model):
    # TransformerLens 3.9's defaults for a GPT-NeoX checkpoint: no bos, batches padded on the right
    assert model.cfg.default_prepend_bos is False
    assert model.to_tokens("Hello world").tolist() == [[12092, 1533]]
    assert model.to_tokens("Hello world", prepend_bos=True).tolist() == [[EOT, 12092, 1533]]
    assert model.to_tokens("Hello world", prepend_bos=False).tolist() == [[12092, 1533]]
    batch = model.to_tokens(["Hello world", "Hello"], prepend_bos=False)
    assert batch.dtype == torch.long and batch.device == model.unembed.weight.device
    assert batch.tolist() == [[12092, 1533], [12092, EOT]]  # right padding with the pad (= eos) token
    assert model.to_tokens(["Hello world", "Hello"], prepend_bos=False, padding_side="left").tolist() == [
        [12092, 1533], [EOT, 12092]]
    ids, mask = model.to_tokens_and_mask(["Hello world", "Hello"], padding_side="left", prepend_bos=True)
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]] and ids[1].tolist() == [EOT, EOT, 12092]
    assert model.to_tokens("", prepend_bos=False).shape == (1, 0)
    with pytest.raises(ValueError, match="padding_side"):
        model.to_tokens("x", padding_side="middle")
    with pytest.raises(TypeError, match="str or a list of str"):
        model.to_tokens(3)


def test_defaults_follow_the_config_and_the_tokenizer(model):
    model.cfg.default_prepend_bos = True
    try:
        assert model.to_tokens("Hello").tolist() == [[EOT, 12092]]
        assert model.to_str_tokens("Hello") == ["<|endoftext|>", "Hello"]
    finally:
        model.cfg.default_prepend_bos = False
    model.tokenizer.padding_side = "left"
    try:
        assert model.to_tokens(["Hello world", "Hello"]).tolist() == [[12092, 1533], [EOT, 12092]]
    finally:
        model.tokenizer.padding_side = "right"
    with pytest.raises(TypeError, match="True or False"):
        model.cfg.default_prepend_bos = None


def test_rows_are_cut_to_n_ctx_as_transformerlens_cuts_them(model):
    """TransformerLens tokenizes with the bos, cuts to n_ctx, then drops the bos it did not want: a row
    without bos keeps n_ctx - 1 tokens."""
    long = " a" * 100
    assert model.to_tokens(long, prepend_bos=True).shape == (1, CFG.max_position_embeddings)
    assert model.to_tokens(long).shape == (1, CFG.max_position_embeddings - 1)
    assert model.to_tokens(long, truncate=False).shape == (1, 100)


def test_to_tokens_pads_with_the_tokenizers_pad_token():
    m = HookedTransformer(NeoXForCausalLM(CFG))
    m.tokenizer = NeoXTokenizer.default(pad_token="<|padding|>")
    assert m.to_tokens(["Hello world", "Hello"], prepend_bos=False).tolist() == [[12092, 1533], [12092, PAD]]


def test_to_string(model):
    assert model.to_string([12092, 1533]) == "Hello world"
    assert model.to_string(torch.tensor([12092, 1533])) == "Hello world"
    assert model.to_string(1533) == " world"
    batch = torch.tensor([[12092, 1533], [EOT, 12092]])
    assert model.to_string(batch) == ["Hello world", "<|endoftext|>Hello"]
    assert model.to_string([[12092], [1533]]) == ["Hello", " world"]
    assert model.to_string(model.to_tokens(["a b", "c"], prepend_bos=False)) == ["a b", "c<|endoftext|>"]


def test_to_str_tokens(model):
    assert model.to_str_tokens("Hello world", prepend_bos=False) == ["Hello", " world"]
    assert model.to_str_tokens("Hello world") == ["Hello", " world"]
    assert model.to_str_tokens("Hello world", prepend_bos=True) == ["<|endoftext|>", "Hello", " world"]
    assert model.to_str_tokens([12092, 1533]) == ["Hello", " world"]
    assert model.to_str_tokens(torch.tensor([12092, 1533])) == ["Hello", " world"]
    assert model.to_str_tokens(torch.tensor([[12092, 1533]])) == ["Hello", " world"]  # [1 pos] -> one row
    assert model.to_str_tokens(1533) == [" world"]
    assert model.to_str_tokens(torch.tensor([[12092, 1533], [EOT, 1533]])) == [["Hello", " world"],
                                                                              ["<|endoftext|>", " world"]]
    assert model.to_str_tokens(["Hello", "Hello world"], prepend_bos=False) == [["Hello"], ["Hello", " world"]]
    assert model.to_str_tokens("", prepend_bos=False) == []


@pytest.mark.parametrize("call", [lambda m: m.to_tokens("x"), lambda m: m.to_string([1]),
                                  lambda m: m.to_str_tokens("x")])
def test_missing_tokenizer_says_how_to_attach_one(call):
    m = HookedTransformer(NeoXForCausalLM(CFG.replace(vocab_size=64)))
    with pytest.raises(RuntimeError, match=r"model.tokenizer = NeoXTokenizer.default\(\)"):
        call(m)


def test_save_pretrained_round_trips_the_tokenizer(model, tmp_path):
    hf = model.hf()
    hf.tokenizer = NeoXTokenizer.default(add_prefix_space=True)
    try:
        hf.save_pretrained(tmp_path)
    finally:
        hf.tokenizer = NeoXTokenizer.default()
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    loaded = HookedTransformer.from_pretrained_no_processing(tmp_path)
    assert isinstance(loaded.tokenizer, NeoXTokenizer) and loaded.tokenizer.add_prefix_space
    assert loaded.to_tokens("Hello").tolist() == [[24387]]  # " Hello": the prefix space survived
    assert NeoXForCausalLM.from_pretrained(_without_tokenizer(hf, tmp_path / "bare")).tokenizer is None


def _without_tokenizer(model, path):
    tok, model.tokenizer = model.tokenizer, None
    try:
        model.save_pretrained(path)
    finally:
        model.tokenizer = tok
    return path
