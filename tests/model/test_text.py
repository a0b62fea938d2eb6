"""TextMixin: to_tokens / to_string / to_str_tokens on every model class, and the tokenizer's round trip
through model.save_pretrained / from_pretrained."""

import pytest
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM
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
    return m


def test_every_model_class_has_the_text_methods():
    for cls in MODEL_CLASSES.values():
        for name in ("to_tokens", "to_string", "to_str_tokens"):
            assert callable(getattr(cls, name)), (cls.__name__, name)


def test_to_tokens(model):
    # TransformerLens' defaults: bos first, batches padded on the right
    assert model.to_tokens("Hello world").tolist() == [[EOT, 12092, 1533]]
    assert model.to_tokens("Hello world", prepend_bos=False).tolist() == [[12092, 1533]]
    batch = model.to_tokens(["Hello world", "Hello"], prepend_bos=False)
    assert batch.dtype == torch.long and batch.device == model.unembed.weight.device
    assert batch.tolist() == [[12092, 1533], [12092, EOT]]  # right padding with the pad (= eos) token
    assert model.to_tokens(["Hello world", "Hello"], prepend_bos=False, padding_side="left").tolist() == [
        [12092, 1533], [EOT, 12092]]
    ids, mask = model.to_tokens_and_mask(["Hello world", "Hello"], padding_side="left")
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]] and ids[1].tolist() == [EOT, EOT, 12092]
    assert model.to_tokens("", prepend_bos=False).shape == (1, 0)
    with pytest.raises(ValueError, match="padding_side"):
        model.to_tokens("x", padding_side="middle")
    with pytest.raises(TypeError, match="str or a list of str"):
        model.to_tokens(3)


def test_to_tokens_pads_with_the_tokenizers_pad_token():
    m = NeoXForCausalLM(CFG)
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
    assert model.to_str_tokens("Hello world") == ["<|endoftext|>", "Hello", " world"]
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
    for cls in MODEL_CLASSES.values():
        m = cls(CFG.replace(vocab_size=64))
        with pytest.raises(RuntimeError, match=r"model.tokenizer = NeoXTokenizer.default\(\)"):
            call(m)


def test_save_pretrained_round_trips_the_tokenizer(model, tmp_path):
    model.tokenizer = NeoXTokenizer.default(add_prefix_space=True)
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.tokenizer = NeoXTokenizer.default()
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    loaded = NeoXForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.tokenizer, NeoXTokenizer) and loaded.tokenizer.add_prefix_space
    assert loaded.to_tokens("Hello", prepend_bos=False).tolist() == [[24387]]  # " Hello": the prefix space survived
    assert NeoXForCausalLM.from_pretrained(_without_tokenizer(model, tmp_path / "bare")).tokenizer is None


def _without_tokenizer(model, path):
    tok, model.tokenizer = model.tokenizer, None
    try:
        model.save_pretrained(path)
    finally:
        model.tokenizer = tok
    return path
