"""Text in, text out on every model class, in TransformerLens' style: to_tokens, to_string, to_str_tokens.

All three use `model.tokenizer` (a `NeoXTokenizer`; `from_pretrained` attaches the checkpoint's when
its directory has a tokenizer.json).
"""

from __future__ import annotations

import os
import sys
import warnings
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

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool = True,
                  padding_side: str = "right") -> torch.Tensor:
        """Token ids ``[batch pos]`` (int64, on the model's device) of a string or a list of strings, as
        TransformerLens makes them: the bos token first (`prepend_bos`, default True), no other special
        tokens, rows of a batch padded to the longest with the pad token on the **right**. Causal
        attention then keeps every real position exact without a mask; pass `padding_side="left"` to
        line prompts up for generation, and then the attention mask (`to_tokens_and_mask`) too: a
        forward of a left-padded batch without one warns.
        """
        return self.to_tokens_and_mask(text, prepend_bos, padding_side)[0]

    def to_tokens_and_mask(self, text: str | Sequence[str], prepend_bos: bool = True,
                           padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
        """`to_tokens` and its attention mask ``[batch pos]`` (1 = real token, 0 = padding)."""
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
        padded, masks = [], []
        for r in rows:
            fill = width - len(r)
            padded.append(pad * fill + r if padding_side == "left" else r + pad * fill)
            masks.append([0] * fill + [1] * len(r) if padding_side == "left" else [1] * len(r) + [0] * fill)
        device = self._text_device()
        ids = torch.tensor(padded, dtype=torch.long, device=device).reshape(len(rows), width)
        return ids, torch.tensor(masks, dtype=torch.long, device=device).reshape(len(rows), width)

    def to_string(self, ids) -> str | list[str]:
        """Decoded text, special tokens kept: a str for one sequence (an int, a list of ints or ``[pos]``),
        a list of str for a batch (a list of id lists or ``[batch pos]``, even when batch is 1)."""
        tok = self._require_tokenizer()
        ids = _as_lists(ids)
        if isinstance(ids, int) or all(isinstance(i, int) for i in ids):
            return tok.decode(ids)
        return tok.batch_decode(ids)

    def to_str_tokens(self, text_or_ids, prepend_bos: bool = True) -> list[str] | list[list[str]]:
        """Each token decoded on its own, e.g. "Hello world" -> ["Hello", " world"].

        Takes a str (tokenized as `to_tokens` does, bos first unless `prepend_bos=False`), or ids: an
        int, a list of ints, ``[pos]`` or ``[1 pos]`` give a list of str; a list of str, a list of id
        lists or ``[batch pos]`` with batch > 1 give one list per row. A character split across
        tokens shows as U+FFFD pieces.
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

    def warn_if_left_padded(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                            past_key_values=None) -> None:
        """Warn when a batch looks left-padded and no attention mask says so: its rows begin with
        different numbers of pad tokens (a bos equal to the pad token counts once in every row, so
        it does not trigger this). The padding would be read as text and shift every later position.
        A step after a KV cache is not a prompt: a row that just emitted eos (often the pad id) is fine."""
        # Anything but an integer id tensor is left to forward's input checks, which name the problem.
        if attention_mask is not None or not torch.is_tensor(input_ids) or input_ids.is_floating_point():
            return
        if input_ids.dim() != 2 or input_ids.shape[0] < 2 or input_ids.shape[1] < 2 or past_key_values is not None:
            return
        pads = {getattr(self.tokenizer, "pad_token_id", None), getattr(self.cfg, "pad_token_id", None)}  # type: ignore[attr-defined]
        for pad in pads - {None}:
            leading = (input_ids == pad).long().cumprod(-1).sum(-1)
            if bool((leading != leading[:1]).any()):  # one host sync
                warnings.warn(f"input_ids look left-padded (rows start with different numbers of the pad token "
                              f"{pad}) but no attention_mask was given, so the padding is attended to as text "
                              "and shifts every later position of those rows; pass attention_mask (e.g. from "
                              "model.to_tokens_and_mask(..., padding_side='left')) or pad on the right",
                              stacklevel=_outside_stacklevel())
                return

    def _text_device(self) -> torch.device:
        return self.input_device  # type: ignore[attr-defined]


def _outside_stacklevel() -> int:
    """The `stacklevel` that points a warning at the first frame outside neox_lab and torch."""
    internal = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def _as_lists(ids):
    if hasattr(ids, "tolist"):
        return ids.tolist()
    if isinstance(ids, int):
        return ids
    return [_as_lists(i) if not isinstance(i, int) else i for i in ids]
