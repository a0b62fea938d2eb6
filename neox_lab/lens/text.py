"""Text in, text out as TransformerLens 3.x does it: to_tokens, to_str_tokens, to_string.

`prepend_bos` defaults to `cfg.default_prepend_bos` (False for GPT-NeoX checkpoints, as TransformerLens'
loader sets it) and `padding_side` to `model.tokenizer.padding_side` ("right"); None means "use the
default" in both, as TransformerLens' `USE_DEFAULT_VALUE` is None. Rows are cut to `cfg.n_ctx` tokens
the way TransformerLens' tokenizer call cuts them: with the BOS counted, then the BOS dropped when it
was not asked for (so a row without BOS keeps at most n_ctx - 1 tokens, as there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.generation import no_tokenizer_error


def is_text(value) -> bool:
    """A str, or a non-empty list / tuple of str: what TransformerLens treats as text input."""
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and len(value) > 0
                                      and all(isinstance(t, str) for t in value))


def attention_mask_for(tokens: torch.Tensor, pad_id: int | None, bos_id: int | None, prepend_bos: bool,
                       padding_side: str) -> torch.Tensor:
    """TransformerLens' `get_attention_mask`: 0 on the trailing run of pad tokens (right padding) or the
    leading run (left padding, where a BOS equal to the pad token is unmasked again when `prepend_bos`)."""
    mask = torch.ones_like(tokens)
    if pad_id is None:
        return mask
    real = tokens.ne(pad_id).long()
    if padding_side == "right":
        mask[real.flip(-1).cumsum(-1).flip(-1) == 0] = 0
        return mask
    leading = real.cumsum(-1) == 0
    mask[leading] = 0
    if prepend_bos and bos_id == pad_id:
        rows = torch.arange(mask.shape[0], device=mask.device)
        mask[rows, leading.sum(-1) - 1] = 1
    return mask


class TextMixin:
    """TransformerLens' tokenizer conveniences, for a model with `tokenizer`, `cfg` (n_ctx,
    default_prepend_bos) and `input_device`."""

    tokenizer: object

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise no_tokenizer_error()
        return self.tokenizer

    def resolve_prepend_bos(self, prepend_bos: bool | None) -> bool:
        """`prepend_bos`, or `cfg.default_prepend_bos` when None (TransformerLens' USE_DEFAULT_VALUE)."""
        if prepend_bos is None:
            return bool(self.cfg.default_prepend_bos)  # type: ignore[attr-defined]
        if not isinstance(prepend_bos, bool):
            raise TypeError(f"prepend_bos must be True, False or None (the config's default), got {prepend_bos!r}")
        return prepend_bos

    def resolve_padding_side(self, padding_side: str | None) -> str:
        """`padding_side`, or the tokenizer's `padding_side` ("right" unless changed) when None."""
        side = getattr(self.tokenizer, "padding_side", "right") if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None (the tokenizer's), got {padding_side!r}")
        return side

    def to_tokens(self, input: str | Sequence[str], prepend_bos: bool | None = None,
                  padding_side: str | None = None, move_to_device: bool = True,
                  truncate: bool = True) -> torch.Tensor:
        """Token ids ``[batch pos]`` (int64) of a string or a list of strings, as TransformerLens makes them:
        a BOS first only with `prepend_bos` (default `cfg.default_prepend_bos`: False for GPT-NeoX), no
        other special tokens, rows padded to the longest with the pad token on `padding_side` (default the
        tokenizer's, "right"), cut to `cfg.n_ctx` when `truncate`; on the model's device when
        `move_to_device`. Pass `prepend_bos=False` for a fragment of a longer prompt."""
        return self.to_tokens_and_mask(input, prepend_bos, padding_side, move_to_device, truncate)[0]

    def to_tokens_and_mask(self, input: str | Sequence[str], prepend_bos: bool | None = None,
                           padding_side: str | None = None, move_to_device: bool = True,
                           truncate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """`to_tokens` and its attention mask ``[batch pos]`` (1 = real token, 0 = padding): neox_lab's,
        TransformerLens has no such method."""
        tok = self._require_tokenizer()
        texts = [input] if isinstance(input, str) else input
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"to_tokens takes a str or a list of str, got {type(input).__name__}")
        bos = self.resolve_prepend_bos(prepend_bos)
        side = self.resolve_padding_side(padding_side)
        if tok.bos_token_id is None:
            raise ValueError("the tokenizer has no bos_token, which to_tokens needs (TransformerLens sets it "
                             "to the eos token: tokenizer.bos_token = tokenizer.eos_token)")
        n_ctx = self.cfg.n_ctx  # type: ignore[attr-defined]
        rows = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) for t in texts]
        if truncate:
            rows = [row[:n_ctx] for row in rows]
        if not bos:
            rows = [row[1:] for row in rows]
        width = max(map(len, rows), default=0)
        if any(len(row) != width for row in rows) and tok.pad_token_id is None:
            raise ValueError("rows differ in length and the tokenizer has no pad_token to pad them with")
        pad = [tok.pad_token_id]
        padded, masks = [], []
        for r in rows:
            fill = width - len(r)
            padded.append(pad * fill + r if side == "left" else r + pad * fill)
            masks.append([0] * fill + [1] * len(r) if side == "left" else [1] * len(r) + [0] * fill)
        device = self.input_device if move_to_device else None  # type: ignore[attr-defined]
        ids = torch.tensor(padded, dtype=torch.long, device=device).reshape(len(rows), width)
        return ids, torch.tensor(masks, dtype=torch.long, device=device).reshape(len(rows), width)

    def to_string(self, tokens) -> str | list[str]:
        """Decoded text, special tokens kept (TransformerLens): a str for ``[pos]``, a 0-d tensor, an int or
        a list of ints; a list of str for ``[batch pos]`` or a list of id lists (batch 1 included)."""
        tok = self._require_tokenizer()
        ids = torch.as_tensor(tokens.tolist() if hasattr(tokens, "tolist") else tokens)
        if ids.ndim == 2:
            return tok.batch_decode(ids)
        if ids.ndim <= 1:
            return tok.decode(ids)
        raise ValueError(f"to_string takes ids [pos] or [batch pos], got shape {tuple(ids.shape)}")

    def to_str_tokens(self, input, prepend_bos: bool | None = None,
                      padding_side: str | None = None) -> list[str] | list[list[str]]:
        """Each token decoded on its own, e.g. "Hello world" -> ["Hello", " world"].

        A str is tokenized as `to_tokens` does (so BOS first only with `prepend_bos`, default
        `cfg.default_prepend_bos`); ids ``[pos]`` / ``[1 pos]`` (tensor, numpy or a list of ints) give a
        list of str; a list of str gives one list per string. A character split across tokens shows as
        U+FFFD pieces."""
        tok = self._require_tokenizer()
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        elif isinstance(input, (list, tuple)) and not all(isinstance(t, int) for t in input):
            # TransformerLens maps over a list: of strings, or of id rows
            return [self.to_str_tokens(t, prepend_bos, padding_side) for t in input]
        else:
            ids = torch.as_tensor(input.tolist() if hasattr(input, "tolist") else input)
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise TypeError(f"to_str_tokens takes a str, a list of str or integer token ids, got {ids.dtype}")
            if ids.ndim == 2 and ids.shape[0] > 1:
                return [self.to_str_tokens(row) for row in ids]
            ids = ids.reshape(-1)
        return [tok.decode([i]) for i in ids.tolist()]
