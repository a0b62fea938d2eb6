"""Text in, text out on every model class, in TransformerLens' style: to_tokens, to_string, to_str_tokens.

All three use `model.tokenizer` (a `NeoXTokenizer`; `from_pretrained` attaches the checkpoint's when
its directory has a tokenizer.json).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def no_tokenizer_error() -> RuntimeError:
    """What every text convenience (and `generate(prompt=...)`) raises on a model without a tokenizer."""
    return RuntimeError("model.tokenizer is None; attach one: model.tokenizer = NeoXTokenizer.default()")


class TextMixin:
    """Tokenizer conveniences for a model with a `tokenizer` attribute and parameters on one device."""

    tokenizer: object

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise no_tokenizer_error()
        return self.tokenizer

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool = False,
                  padding_side: str = "left") -> torch.Tensor:
        """Token ids ``[batch pos]`` (int64, on the model's device) of a string or a list of strings.

        No special tokens are added except the bos token when `prepend_bos`. Rows of a batch are padded
        to the longest with the tokenizer's pad token on `padding_side` ("left" suits generation); the
        padding mask is not returned, so for batched generation prefer ``model.generate(prompt=[...])``
        or ``model.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")``.
        """
        tok = self._require_tokenizer()
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"to_tokens takes a str or a list of str, got {type(text).__name__}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [tok.encode(t, add_special_tokens=False) for t in texts]
        if prepend_bos:
            if tok.bos_token_id is None:
                raise ValueError("prepend_bos=True but the tokenizer has no bos_token")
            rows = [[tok.bos_token_id] + row for row in rows]
        width = max(map(len, rows), default=0)
        if any(len(row) != width for row in rows) and tok.pad_token_id is None:
            raise ValueError("rows differ in length and the tokenizer has no pad_token to pad them with")
        pad = [tok.pad_token_id]
        padded = [pad * (width - len(r)) + r if padding_side == "left" else r + pad * (width - len(r))
                  for r in rows]
        return torch.tensor(padded, dtype=torch.long, device=self._text_device()).reshape(len(rows), width)

    def to_string(self, ids) -> str | list[str]:
        """Decoded text, special tokens kept: a str for one sequence (an int, a list of ints or ``[pos]``),
        a list of str for a batch (a list of id lists or ``[batch pos]``, even when batch is 1)."""
        tok = self._require_tokenizer()
        ids = _as_lists(ids)
        if isinstance(ids, int) or all(isinstance(i, int) for i in ids):
            return tok.decode(ids)
        return tok.batch_decode(ids)

    def to_str_tokens(self, text_or_ids, prepend_bos: bool = False) -> list[str] | list[list[str]]:
        """Each token decoded on its own, e.g. "Hello world" -> ["Hello", " world"].

        Takes a str (tokenized as `to_tokens` does), or ids: an int, a list of ints, ``[pos]`` or
        ``[1 pos]`` give a list of str; a list of str, a list of id lists or ``[batch pos]`` with
        batch > 1 give one list per row. A character split across tokens shows as U+FFFD pieces.
        """
        tok = self._require_tokenizer()
        if isinstance(text_or_ids, str) or (isinstance(text_or_ids, (list, tuple)) and text_or_ids
                                            and all(isinstance(t, str) for t in text_or_ids)):
            if isinstance(text_or_ids, str):
                return self.to_str_tokens(self.to_tokens(text_or_ids, prepend_bos=prepend_bos)[0])
            return [self.to_str_tokens(t, prepend_bos=prepend_bos) for t in text_or_ids]
        ids = _as_lists(text_or_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and not all(isinstance(i, int) for i in ids):
            if len(ids) == 1 and torch.is_tensor(text_or_ids):
                ids = ids[0]  # [1 pos] -> one row, as TransformerLens does
            else:
                return [self.to_str_tokens(row) for row in ids]
        return [tok.decode([i]) for i in ids]

    def _text_device(self) -> torch.device:
        return self.input_device  # type: ignore[attr-defined]


def _as_lists(ids):
    if hasattr(ids, "tolist"):
        return ids.tolist()
    if isinstance(ids, int):
        return ids
    return [_as_lists(i) if not isinstance(i, int) else i for i in ids]
