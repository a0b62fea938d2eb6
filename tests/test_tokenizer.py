"""NeoXTokenizer against transformers' GPTNeoXTokenizerFast on the bundled GPT-NeoX-20B tokenizer."""

import hashlib
import json
import shutil
import string
import unicodedata
from importlib import resources

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neox_lab.tokenizer import DEFAULT_TOKENIZER_FILE, BatchEncoding, NeoXTokenizer

transformers = pytest.importorskip("transformers")
# transformers warns when max_length is given without a strategy that uses it; the tests do that on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored:UserWarning")

EOT, PAD = "<|endoftext|>", "<|padding|>"
# Guards the vendored file against accidental edits (it must stay byte-identical to EleutherAI's).
TOKENIZER_SHA256 = "503a6edd4ed5739c5ef9b1af11e9b724d5140f803dc7fcf1e71ea3fb8a1e73e4"

prop = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------------------------- strategies
whitespace = st.text(alphabet=" \t\n\r\u00a0\u2009\u3000\x0b\x0c", max_size=40)
code = st.text(alphabet=string.printable, max_size=80)
emoji = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
        st.sampled_from(["\u200d", "\ufe0f", "\U0001f3fb", "\U0001f1fa", "\U0001f1f8"]),
    ),
    max_size=12,
)
snippets = st.sampled_from(
    [
        "def f(x):\n    return x ** 2\n",
        "\tif (a && b) { return -1; }\n",
        "    ",
        "  \n\n  ",
        EOT,
        PAD,
        "Hello world",
        " the",
        "naïve café",
        "e\u0301",  # decomposed é: NFC changes it
        "日本語のテキスト",
        "Ελληνικά",
        "👩\u200d💻",
        "",
    ]
)
mixed = st.lists(st.one_of(snippets, whitespace, code, emoji, st.text(max_size=20)), max_size=8).map("".join)
texts = st.one_of(st.text(max_size=60), whitespace, code, emoji, mixed)
batches = st.lists(texts, min_size=1, max_size=5)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok_file():
    with resources.as_file(resources.files("neox_lab") / "data" / DEFAULT_TOKENIZER_FILE) as path:
        yield path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok_file):
    path = tmp_path_factory.mktemp("neox_tok")
    shutil.copyfile(tok_file, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def ours():
    return NeoXTokenizer.default()


@pytest.fixture(scope="module")
def ours_prefix():
    return NeoXTokenizer.default(add_prefix_space=True)


@pytest.fixture(scope="module")
def hf(tok_file):
    return transformers.GPTNeoXTokenizerFast(tokenizer_file=str(tok_file))


@pytest.fixture(scope="module")
def hf_eos_pad(tok_file):
    # transformers 5.x pads with <|padding|> by default; ours falls back to eos, so compare like with like.
    return transformers.GPTNeoXTokenizerFast(tokenizer_file=str(tok_file), pad_token=EOT)


@pytest.fixture(scope="module")
def hf_prefix(tok_dir):
    # The tokenizer_file= constructor ignores add_prefix_space in 5.x; from_pretrained honours it.
    return transformers.GPTNeoXTokenizerFast.from_pretrained(str(tok_dir), add_prefix_space=True)


# ---------------------------------------------------------------------------------------------- basics
def test_vendored_file_is_unmodified(tok_file):
    assert hashlib.sha256(tok_file.read_bytes()).hexdigest() == TOKENIZER_SHA256


def test_hello_world(ours, hf):
    assert ours.encode("Hello world") == [12092, 1533]
    enc = ours("Hello world")
    assert enc.input_ids == [12092, 1533] and enc.attention_mask == [1, 1]
    assert hf.encode("Hello world") == [12092, 1533]
    assert ours.decode([12092, 1533]) == "Hello world"


def test_vocab_matches_hf(ours, hf):
    assert ours.vocab_size == hf.vocab_size == 50254
    assert len(ours) == len(hf) == 50281
    assert ours.get_vocab() == hf.get_vocab()


def test_special_tokens_match_hf(ours, hf):
    for name in ("bos_token", "eos_token", "unk_token"):
        assert getattr(ours, name) == getattr(hf, name) == EOT
        assert getattr(ours, name + "_id") == getattr(hf, name + "_id") == 0
    assert ours.pad_token == EOT and ours.pad_token_id == 0  # eos fallback while unset
    assert hf.pad_token == PAD  # transformers 5.x's class default, recorded here on purpose


def test_pad_token_is_settable(tok_file):
    tok = NeoXTokenizer.default()
    tok.pad_token = PAD
    assert tok.pad_token_id == 1
    tok.pad_token = None
    assert tok.pad_token == EOT
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.pad_token = "<|no such token|>"
    assert NeoXTokenizer.from_pretrained(tok_file, pad_token=PAD).pad_token_id == 1


def test_add_special_tokens_adds_nothing_like_hf(ours, hf):
    for text in ["Hello world", "", EOT + "x"]:
        expected = hf(text, add_special_tokens=True)["input_ids"]
        assert expected == hf(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ours.encode(text, add_special_tokens=False) == expected
        assert ours(text, add_special_tokens=False).input_ids == expected
    assert ours.encode(EOT + "x" + PAD) == [0, 89, 1]


# -------------------------------------------------------------------------------------- property tests
@prop
@given(text=texts)
def test_encode_matches_hf(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours(text).input_ids == ids
    assert ours.tokenize(text) == hf.tokenize(text)
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_tokens_to_ids(ours.tokenize(text)) == ids


@prop
@given(text=texts)
def test_decode_inverts_encode_on_nfc_text(ours, text):
    text = unicodedata.normalize("NFC", text)
    assert ours.decode(ours.encode(text)) == text


@prop
@given(ids=st.lists(st.integers(0, 50280), max_size=30), skip=st.booleans())
def test_decode_matches_hf(ours, hf, ids, skip):
    assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@prop
@given(
    batch=batches,
    padding=st.sampled_from([False, True, "longest", "max_length"]),
    side=st.sampled_from(["left", "right"]),
    truncation=st.booleans(),
    max_length=st.integers(1, 24),
)
def test_padding_and_truncation_match_hf(ours, hf_eos_pad, batch, padding, side, truncation, max_length):
    kwargs = dict(padding=padding, padding_side=side, truncation=truncation, max_length=max_length)
    got, want = ours(batch, **kwargs), hf_eos_pad(batch, **kwargs)
    assert got.input_ids == want["input_ids"]
    assert got.attention_mask == want["attention_mask"]
    single, single_hf = ours(batch[0], **kwargs), hf_eos_pad(batch[0], **kwargs)
    assert single.input_ids == single_hf["input_ids"] and single.attention_mask == single_hf["attention_mask"]


@prop
@given(text=texts)
def test_add_prefix_space_matches_hf(ours_prefix, hf_prefix, text):
    ids = ours_prefix.encode(text)
    assert ids == hf_prefix.encode(text)
    assert ours_prefix.decode(ids) == hf_prefix.decode(ids)


# ---------------------------------------------------------------------------------------- example tests
@pytest.mark.parametrize("padding", [True, "max_length"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_with_padding_token_matches_hf_default(tok_file, hf, padding, side):
    tok = NeoXTokenizer.from_pretrained(tok_file, pad_token=PAD, padding_side=side)
    batch = ["a b c d e f g", "x", ""]
    got = tok(batch, padding=padding, max_length=5, truncation=True, return_tensors="pt")
    want = hf(batch, padding=padding, max_length=5, truncation=True, padding_side=side, return_tensors="pt")
    assert torch.equal(got.input_ids, want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert got.input_ids.dtype == torch.long


def test_add_prefix_space(ours, ours_prefix):
    assert ours_prefix.add_prefix_space and not ours.add_prefix_space
    assert ours_prefix.encode("Hello world") == ours.encode(" Hello world") == [24387, 1533]
    assert ours_prefix.decode(ours_prefix.encode("Hello world")) == " Hello world"  # HF keeps the space too
    assert NeoXTokenizer.default(add_prefix_space=False).encode("Hello world") == [12092, 1533]


def test_return_tensors_shapes(ours):
    single = ours("Hello world", return_tensors="pt")
    assert single.input_ids.tolist() == [[12092, 1533]] and single.attention_mask.shape == (1, 2)
    assert ours("", return_tensors="pt").input_ids.shape == (1, 0)
    assert ours([], return_tensors="pt").input_ids.shape == (0, 0)
    assert ours([]) == {"input_ids": [], "attention_mask": []}
    batch = ours(["Hello world", "Hello"], padding=True, return_tensors="pt")
    assert batch.input_ids.tolist() == [[12092, 1533], [12092, 0]]
    assert batch.to("cpu") is batch


def test_batch_encoding_is_a_dict():
    enc = BatchEncoding(input_ids=[1], attention_mask=[1])
    assert isinstance(enc, dict) and enc.input_ids == [1] and list(enc) == ["input_ids", "attention_mask"]
    with pytest.raises(AttributeError):
        _ = enc.token_type_ids


def test_decode_accepts_tensors_and_ints(ours, hf):
    assert ours.decode(torch.tensor(12092)) == ours.decode(12092) == "Hello"
    assert ours.decode(torch.tensor([12092, 1533])) == "Hello world"
    assert ours.convert_ids_to_tokens(1533) == hf.convert_ids_to_tokens(1533) == "Ġworld"
    assert ours.convert_ids_to_tokens(torch.tensor(1533)) == "Ġworld"


def test_batch_decode_matches_hf(ours, hf):
    ids = [[0, 12092, 1533, 1], [1, 1, 12092, 0]]
    for skip in (False, True):
        want = hf.batch_decode(ids, skip_special_tokens=skip)
        assert ours.batch_decode(ids, skip_special_tokens=skip) == want
        assert ours.batch_decode(torch.tensor(ids), skip_special_tokens=skip) == want
    assert ours.batch_decode(ids, skip_special_tokens=True) == ["Hello world", "Hello"]


def test_convert_tokens_to_ids_matches_hf(ours, hf):
    tokens = ["Hello", "Ġworld", EOT, "<|not a token|>"]
    assert ours.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens) == [12092, 1533, 0, 0]
    assert ours.convert_tokens_to_ids("Hello") == 12092


@pytest.mark.parametrize("truncation_side", ["left", "right"])
def test_add_bos_eos_tokens_match_hf(tok_dir, truncation_side):
    flags = dict(add_bos_token=True, add_eos_token=True)
    tok = NeoXTokenizer.from_pretrained(tok_dir, truncation_side=truncation_side, **flags)
    hf = transformers.GPTNeoXTokenizerFast.from_pretrained(str(tok_dir), **flags)
    hf.truncation_side = truncation_side
    for text in ["a b c d e f", "", "Hello world"]:
        for kwargs in ({}, dict(truncation=True, max_length=4), dict(add_special_tokens=False)):
            assert tok(text, **kwargs).input_ids == hf(text, **kwargs)["input_ids"], (text, kwargs)
    assert tok.encode("x") == [0, 89, 0]
    with pytest.raises(ValueError, match="no room"):
        tok("x", truncation=True, max_length=1)


def test_from_pretrained_reads_configs(tmp_path, tok_file):
    shutil.copyfile(tok_file, tmp_path / "tokenizer.json")
    config = {
        "add_prefix_space": True,
        "model_max_length": 4,
        "padding_side": "left",
        "tokenizer_class": "GPTNeoXTokenizer",
        "bos_token": {"__type": "AddedToken", "content": EOT, "lstrip": False},
        "pad_token": EOT,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": PAD, "eos_token": EOT}))
    tok = NeoXTokenizer.from_pretrained(tmp_path)
    hf = transformers.GPTNeoXTokenizerFast.from_pretrained(str(tmp_path))
    assert (tok.add_prefix_space, tok.model_max_length, tok.padding_side) == (True, 4, "left")
    assert tok.pad_token == PAD and tok.bos_token == EOT  # special_tokens_map wins over tokenizer_config
    assert (hf.model_max_length, hf.padding_side, hf.pad_token) == (4, "left", PAD)
    batch = ["one two three four five six", "Hello"]
    got = tok(batch, padding=True, truncation=True)
    want = hf(batch, padding=True, truncation=True)
    assert got.input_ids == want["input_ids"] and got.attention_mask == want["attention_mask"]
    assert got.input_ids[1] == [1, 1, 1, 24387]
    assert NeoXTokenizer.from_pretrained(tmp_path, padding_side="right").padding_side == "right"


@pytest.mark.parametrize("prefix", [False, True])
def test_save_pretrained_round_trips_for_us_and_hf(tmp_path, prefix):
    tok = NeoXTokenizer.default(add_prefix_space=prefix, padding_side="left", model_max_length=5,
                                truncation_side="left", add_eos_token=True)
    tok.pad_token = PAD
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": EOT}))  # stale: overwritten
    tok.save_pretrained(tmp_path)
    back = NeoXTokenizer.from_pretrained(tmp_path)
    names = ("add_prefix_space padding_side truncation_side model_max_length add_bos_token add_eos_token "
             "bos_token eos_token unk_token pad_token").split()
    settings_of = lambda t: tuple(getattr(t, name) for name in names)
    want_settings = (prefix, "left", "left", 5, False, True, EOT, EOT, EOT, PAD)
    assert settings_of(back) == settings_of(tok) == want_settings
    batch = ["Hello world", " one two three four five", ""]
    want = tok(batch, padding=True, truncation=True)
    got = back(batch, padding=True, truncation=True)
    assert got.input_ids == want.input_ids and got.attention_mask == want.attention_mask
    # transformers 5.x ignores add_bos_token/add_eos_token read from tokenizer_config.json (it honours them
    # only as from_pretrained keyword arguments), so compare with it on the eos-free encoding.
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok.add_eos_token = False
    want = tok(batch, padding=True, truncation=True)
    got = hf(batch, padding=True, truncation=True)
    assert got["input_ids"] == want.input_ids and got["attention_mask"] == want.attention_mask
    # An unset pad token is saved resolved, so transformers (whose class default is <|padding|>) agrees.
    NeoXTokenizer.default().save_pretrained(tmp_path / "plain")
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "plain")).pad_token == EOT


# ----------------------------------------------------------------------------------------------- errors
def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        NeoXTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        NeoXTokenizer.from_pretrained(tmp_path)


def test_malformed_files_are_reported(tmp_path, tok_file):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        NeoXTokenizer.from_pretrained(bad)
    shutil.copyfile(tok_file, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        NeoXTokenizer.from_pretrained(tmp_path)


def test_call_argument_errors(ours):
    with pytest.raises(ValueError, match="padding=True"):
        ours(["Hello world", "Hello"], return_tensors="pt")
    with pytest.raises(ValueError, match="padding strategy"):
        ours("x", padding="shortest")
    with pytest.raises(ValueError, match="truncation strategy"):
        ours("x", truncation="middle")
    with pytest.raises(ValueError, match="padding_side"):
        ours(["x"], padding=True, padding_side="center")
    with pytest.raises(ValueError, match="return_tensors"):
        ours("x", return_tensors="np")
    with pytest.raises(ValueError, match="max_length"):
        ours(["x"], padding="max_length")
    with pytest.raises(ValueError, match="max_length"):
        ours("x", truncation=True, max_length=-1)
    with pytest.raises(TypeError):
        ours(123)
    with pytest.raises(TypeError):
        ours(["ok", None])
    with pytest.raises(TypeError):
        ours.encode(["a list"])


def test_decode_errors(ours):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([12092, 60000])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([-100])
    with pytest.raises(TypeError, match="batch_decode"):
        ours.decode([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.convert_ids_to_tokens(len(ours))


def test_constructor_errors(tok_file):
    from tokenizers import Tokenizer, pre_tokenizers

    with pytest.raises(ValueError, match="bos_token"):
        NeoXTokenizer.from_pretrained(tok_file, bos_token="<s>")
    with pytest.raises(ValueError, match="padding_side"):
        NeoXTokenizer.from_pretrained(tok_file, padding_side="middle")
    backend = Tokenizer.from_file(str(tok_file))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="ByteLevel"):
        NeoXTokenizer(backend, add_prefix_space=True)
