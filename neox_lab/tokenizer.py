"""GPT-NeoX tokenizer built directly on the `tokenizers` library.

`NeoXTokenizer` reproduces what `transformers.GPTNeoXTokenizerFast` (5.x) returns for the ids, decoding,
special tokens, padding and truncation, without importing transformers.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, pre_tokenizers

DEFAULT_TOKENIZER_FILE = "gpt-neox-20b-tokenizer.json"
# transformers' "no limit" sentinel (VERY_LARGE_INTEGER); the same value keeps configs interchangeable.
NO_MAX_LENGTH = int(1e30)
_EOT = "<|endoftext|>"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_CONFIG_KEYS = _SPECIAL_KEYS + tuple(
    "add_prefix_space model_max_length padding_side truncation_side add_bos_token add_eos_token".split()
)


class BatchEncoding(dict):
    """Model inputs (`input_ids`, `attention_mask`) as a dict that also allows attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        """Move tensor values to `device` (lists are left alone); returns self."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self


def _token_str(value: Any) -> str | None:
    # transformers serialises special tokens either as plain strings or as AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _as_id_list(ids: Any) -> list:
    if hasattr(ids, "tolist"):  # torch / numpy; a 0-d tensor becomes a plain int
        ids = ids.tolist()
    return [ids] if isinstance(ids, int) else list(ids)


class NeoXTokenizer:
    """GPT-NeoX byte-level BPE tokenizer with the call conventions of Hugging Face tokenizers.

    Usually built with `NeoXTokenizer.default()` (the bundled GPT-NeoX-20B / Pythia tokenizer) or
    `NeoXTokenizer.from_pretrained(path)`. The wrapped `tokenizers.Tokenizer` is owned (and reconfigured)
    by this object. `pad_token` falls back to `eos_token` while unset.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str | None = _EOT,
        eos_token: str | None = _EOT,
        unk_token: str | None = _EOT,
        pad_token: str | None = None,
        add_prefix_space: bool | None = None,
        model_max_length: int = NO_MAX_LENGTH,
        padding_side: str = "right",
        truncation_side: str = "right",
        add_bos_token: bool = False,
        add_eos_token: bool = False,
    ):
        self._tok = tokenizer
        # Padding/truncation baked into a tokenizer.json would silently reshape every encoding; we do both
        # ourselves, per call, so the backend stays stateless and safe to share between threads.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        pre = tokenizer.pre_tokenizer
        if isinstance(pre, pre_tokenizers.ByteLevel):
            if add_prefix_space is None:
                add_prefix_space = pre.add_prefix_space
            # transformers rebuilds exactly this pair for GPT-NeoX; the ByteLevel decoder keeps the added
            # leading space, which is also what transformers returns.
            pre.add_prefix_space = bool(add_prefix_space)
            tokenizer.pre_tokenizer = pre
            tokenizer.decoder = decoders.ByteLevel()
        elif add_prefix_space:
            raise ValueError(f"add_prefix_space needs a ByteLevel pre-tokenizer, this one is {pre!r}")
        self.add_prefix_space = bool(add_prefix_space)
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("unk_token", unk_token)):
            self._check_token(name, token)
            setattr(self, name, token)
        self.pad_token = pad_token
        self.model_max_length = int(model_max_length)
        self.padding_side = self._check_side("padding_side", padding_side)
        self.truncation_side = self._check_side("truncation_side", truncation_side)
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> NeoXTokenizer:
        """Load from a directory holding `tokenizer.json`, or from a tokenizer.json file itself.

        In a directory, `tokenizer_config.json` and then `special_tokens_map.json` are honoured when
        present (special tokens, add_prefix_space, model_max_length, padding/truncation side,
        add_bos_token/add_eos_token); keyword arguments override both. Nothing is downloaded.
        """
        path = Path(path)
        options: dict[str, Any] = {}
        if path.is_dir():
            file = path / "tokenizer.json"
            if not file.is_file():
                raise FileNotFoundError(f"no tokenizer.json in directory {path}")
            config = _read_json(path / "tokenizer_config.json")
            options.update({k: config[k] for k in _CONFIG_KEYS if k in config})
            specials = _read_json(path / "special_tokens_map.json")
            options.update({k: specials[k] for k in _SPECIAL_KEYS if k in specials})
        elif path.is_file():
            file = path
        else:
            raise FileNotFoundError(
                f"tokenizer path {path} does not exist (expected a directory with tokenizer.json or the file "
                "itself; hub names are not downloaded)"
            )
        options.update(kwargs)
        for key in _SPECIAL_KEYS:
            if key in options:
                options[key] = _token_str(options[key])
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises plain Exception for malformed files
            raise ValueError(f"cannot read tokenizer file {file}: {err}") from err
        return cls(backend, **options)

    @classmethod
    def default(cls, **kwargs: Any) -> NeoXTokenizer:
        """The GPT-NeoX-20B tokenizer shipped with neox_lab (shared by all Pythia models)."""
        ref = resources.files("neox_lab") / "data" / DEFAULT_TOKENIZER_FILE
        # as_file: the package may live in a zip; the backend reads the whole file before this returns.
        with resources.as_file(ref) as file:
            return cls.from_pretrained(file, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to `directory`.

        `from_pretrained(directory)` (ours or transformers') rebuilds the same tokenizer. The pad token is
        written resolved (the eos token while unset), so transformers, whose own default differs, pads
        with the same token; every settings file is rewritten, so stale ones in `directory` cannot win.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        specials = {key: getattr(self, key) for key in _SPECIAL_KEYS if getattr(self, key) is not None}
        config = {
            **specials,
            "add_prefix_space": self.add_prefix_space,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "tokenizer_class": "GPTNeoXTokenizer",
        }
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
            (directory / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")

    @property
    def pad_token(self) -> str | None:
        """Padding token; the eos token while none was set (the usual choice for GPT-NeoX models)."""
        return self._pad_token if self._pad_token is not None else self.eos_token

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:
        self._check_token("pad_token", token)
        self._pad_token = token

    bos_token_id = property(lambda self: self._id_or_none(self.bos_token), doc="Id of `bos_token`.")
    eos_token_id = property(lambda self: self._id_or_none(self.eos_token), doc="Id of `eos_token`.")
    unk_token_id = property(lambda self: self._id_or_none(self.unk_token), doc="Id of `unk_token`.")
    pad_token_id = property(lambda self: self._id_or_none(self.pad_token), doc="Id of `pad_token`.")

    @property
    def vocab_size(self) -> int:
        """Size of the base BPE vocabulary, without added tokens (as transformers' `vocab_size`)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Full vocabulary size including added tokens (as `len()` of a transformers tokenizer)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def convert_ids_to_tokens(self, ids: Any) -> str | list[str]:
        """Byte-level token strings (e.g. 'Ġworld') for one id or a sequence/tensor of ids."""
        single = isinstance(ids, int) or getattr(ids, "ndim", None) == 0
        tokens = [self._tok.id_to_token(i) for i in self._checked_ids(ids)]
        return tokens[0] if single else tokens

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Ids for one token string or a list of them; unknown tokens map to `unk_token_id` (as HF)."""
        if isinstance(tokens, str):
            token_id = self._tok.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def tokenize(self, text: str) -> list[str]:
        """Token strings of `text`, without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of one string. Special tokens are added only if add_bos_token/add_eos_token are set."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._with_specials(self._tok.encode(text, add_special_tokens=False).ids, add_special_tokens)

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        padding_side: str | None = None,
        truncation: bool | str = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Tokenize a string or a batch of strings into `input_ids` and `attention_mask`.

        padding: False, True/"longest" (to the longest row) or "max_length" (to `max_length`, else
        `model_max_length`); rows are padded with `pad_token_id` and mask 0 on `padding_side`
        (default: the tokenizer's `padding_side`). Rows longer than the target are not shortened.
        truncation: True cuts rows to `max_length` (else `model_max_length`) on `truncation_side`,
        keeping room for any special tokens. return_tensors="pt" gives int64 tensors, [1, T] for a
        single string. A single string otherwise gives flat lists, a batch gives lists of lists.
        """
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a list/tuple of str")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if max_length is not None and max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        side = self._check_side("padding_side", padding_side or self.padding_side)

        if truncation in (False, None, "do_not_truncate"):
            limit = None
        elif truncation in (True, "longest_first", "only_first"):
            limit = self.model_max_length if max_length is None else max_length
        else:
            raise ValueError(f"unknown truncation strategy {truncation!r}")
        rows = [
            self._with_specials(enc.ids, add_special_tokens, limit)
            for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)
        ]
        masks = [[1] * len(row) for row in rows]

        if padding in (True, "longest"):
            target = max(map(len, rows), default=0)
        elif padding == "max_length":
            target = self.model_max_length if max_length is None else max_length
            if target >= NO_MAX_LENGTH:
                raise ValueError("padding='max_length' needs max_length (model_max_length is unbounded)")
        elif padding in (False, None, "do_not_pad"):
            target = None
        else:
            raise ValueError(f"unknown padding strategy {padding!r}")
        if target is not None:
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError("padding needs a pad_token (or an eos_token to fall back on)")
            for i, row in enumerate(rows):
                n = max(target - len(row), 0)
                if side == "right":
                    rows[i], masks[i] = row + [pad_id] * n, masks[i] + [0] * n
                else:
                    rows[i], masks[i] = [pad_id] * n + row, [0] * n + masks[i]

        if return_tensors == "pt":
            import torch  # lazy: plain tokenization should not pay for importing torch

            if len({len(r) for r in rows}) > 1:
                msg = (
                    "rows differ in length and cannot form a tensor: pass padding=True and/or truncation=True"
                )
                raise ValueError(msg)
            width = len(rows[0]) if rows else 0
            as_tensor = lambda x: torch.tensor(x, dtype=torch.long).reshape(len(rows), width)
            return BatchEncoding(input_ids=as_tensor(rows), attention_mask=as_tensor(masks))
        if single:
            return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=rows, attention_mask=masks)

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of one sequence of ids (list, int, or 0-d/1-d tensor)."""
        return self._tok.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """Texts of a batch of id sequences (list of lists or a 2-d tensor)."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        checked = [self._checked_ids(seq) for seq in sequences]
        return self._tok.decode_batch(checked, skip_special_tokens=skip_special_tokens)

    def _with_specials(self, ids: list[int], add_special_tokens: bool, limit: int | None = None) -> list[int]:
        # Like HF, a flag whose token is unset adds nothing.
        prefix = [self.bos_token_id] if add_special_tokens and self.add_bos_token and self.bos_token else []
        suffix = [self.eos_token_id] if add_special_tokens and self.add_eos_token and self.eos_token else []
        if limit is not None:
            # Special tokens survive truncation: the text is cut to make room for them, as HF does.
            room = limit - len(prefix) - len(suffix)
            if room < 0:
                raise ValueError(
                    f"max_length={limit} leaves no room for {len(prefix) + len(suffix)} special tokens"
                )
            if len(ids) > room:
                ids = ids[:room] if self.truncation_side == "right" else ids[len(ids) - room :]
        return prefix + ids + suffix

    def _checked_ids(self, ids: Any) -> list[int]:
        try:
            ids = [operator.index(i) for i in _as_id_list(ids)]
        except TypeError:
            raise TypeError("token ids must be a sequence of ints (use batch_decode for batches)") from None
        size = len(self)
        # The backend silently drops unknown ids; an out-of-range id is almost always a bug upstream.
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {size})")
        return ids

    def _check_token(self, name: str, token: str | None) -> None:
        if token is not None and self._tok.token_to_id(token) is None:
            raise ValueError(f"{name} {token!r} is not in the vocabulary (adding tokens is not supported)")

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @staticmethod
    def _check_side(name: str, side: str) -> str:
        if side not in ("left", "right"):
            raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        return side

    def __repr__(self) -> str:
        return (
            f"NeoXTokenizer(vocab_size={self.vocab_size}, len={len(self)}, "
            f"add_prefix_space={self.add_prefix_space}, padding_side={self.padding_side!r})"
        )
