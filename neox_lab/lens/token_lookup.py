"""TransformerLens' token lookups: `to_single_token`, `to_single_str_token`, `get_token_position`."""

from __future__ import annotations

import torch


class TokenLookup:
    """Needs `to_tokens` and `to_str_tokens` (lens.text.TextMixin) on the same model."""

    def to_single_token(self, string: str) -> int:
        """The id of the one token `string` encodes to (no bos), e.g. ``model.to_single_token(" Mary")``.

        Raises ValueError, listing the pieces, when `string` is not exactly one token."""
        if not isinstance(string, str):
            raise TypeError(f"to_single_token takes a str, got {type(string).__name__}")
        ids = self.to_tokens(string, prepend_bos=False)[0]
        if ids.numel() != 1:
            pieces = self.to_str_tokens(ids) if ids.numel() else []
            raise ValueError(f"{string!r} is {ids.numel()} tokens ({pieces}), not a single token; "
                             "a leading space is often part of a token (' Mary' vs 'Mary')")
        return int(ids.item())

    def to_single_str_token(self, int_token: int) -> str:
        """The text of one token id, e.g. ``model.to_single_str_token(12092)`` -> "Hello"."""
        if not isinstance(int_token, int) or isinstance(int_token, bool):
            raise TypeError(f"to_single_str_token takes an int token id, got {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(self, single_token: str | int, input: str | torch.Tensor, mode: str = "first",
                           prepend_bos: bool | None = None, padding_side: str | None = None) -> int:
        """Index in `input` of the first (`mode="first"`) or last (`mode="last"`) occurrence of `single_token`.

        `single_token`: a str of exactly one token, or a token id. `input`: a str (tokenized with
        `to_tokens(input, prepend_bos, padding_side)`, None meaning the defaults as there) or token ids
        ``[pos]`` or ``[1 pos]``. Raises ValueError when the token does not occur."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        elif torch.is_tensor(input):
            tokens = input
        else:
            raise TypeError(f"get_token_position takes a str or a tensor of token ids as input, got "
                            f"{type(input).__name__}")
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"get_token_position needs one sequence, got a batch of {tokens.shape[0]} "
                                 f"(tokens {tuple(tokens.shape)}); pass one row")
            tokens = tokens[0]
        elif tokens.ndim != 1:
            raise ValueError(f"tokens must be [pos] or [1 pos], got {tuple(tokens.shape)}")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        hits = (tokens == token).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(f"token {single_token!r} (id {token}) does not occur in the input")
        return int(hits[0] if mode == "first" else hits[-1])
