"""Induction heads: repeated random-token sequences, per-head induction scores, loss per copy.

An induction head attends from a token to the token that *followed* that token's previous occurrence
(and copies it). On ``[bos, r_1 .. r_n, r_1 .. r_n]`` the token at position ``i`` of the second copy
repeats position ``i - n``, so an induction head's query at ``i`` attends to key ``i - n + 1``: the
diagonal ``n - 1`` below the main one (the "off-diagonal stripe" of its pattern).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..hooks.registry import block_hook

__all__ = ["InductionResult", "copy_losses", "induction_scores", "measure_induction", "repeated_tokens",
           "word_token_ids"]

# A space-prefixed run of lowercase letters ("Ġ" is the byte-level BPE's space): readable as a tick
# label, and common enough in code and prose that a trained model has seen most of them.
_WORD = re.compile(r"^Ġ[a-z]{3,10}$")


def word_token_ids(tokenizer) -> torch.Tensor:
    """Sorted ids of the tokenizer's " word"-like tokens (space + 3-10 lowercase letters)."""
    ids = sorted(i for tok, i in tokenizer.get_vocab().items() if _WORD.match(tok))
    if not ids:
        raise ValueError("the tokenizer has no ' word' tokens (Ġ + lowercase letters) to draw from")
    return torch.tensor(ids, dtype=torch.long)


def repeated_tokens(candidates: torch.Tensor, n: int, batch: int = 1, *, repeats: int = 2,
                    bos_token_id: int | None = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, (bos) + repeats * n] token ids: n distinct random draws from `candidates`, repeated.

    Tokens within one span are distinct, so every token of a later copy has exactly one earlier
    occurrence per copy and the induction target is unambiguous.
    """
    candidates = torch.as_tensor(candidates, dtype=torch.long).flatten()
    if n < 1 or repeats < 1 or batch < 1:
        raise ValueError(f"n, repeats and batch must be >= 1, got n={n} repeats={repeats} batch={batch}")
    if candidates.numel() < n:
        raise ValueError(f"need at least n={n} candidate tokens, got {candidates.numel()}")
    rows = [candidates[torch.randperm(candidates.numel(), generator=generator)[:n]] for _ in range(batch)]
    spans = torch.stack(rows)  # [batch n]
    tokens = spans.repeat(1, repeats)
    if bos_token_id is not None:
        tokens = torch.cat([torch.full((batch, 1), bos_token_id, dtype=torch.long), tokens], dim=1)
    return tokens


def _offset(tokens: torch.Tensor, n: int) -> int:
    """Positions before the first copy (1 with a BOS prefix), checked against the period."""
    extra = tokens.shape[-1] % n
    if tokens.shape[-1] < 2 * n or extra > 1:
        raise ValueError(f"tokens [batch pos={tokens.shape[-1]}] are not (bos +) k >= 2 copies of a span "
                         f"of n={n}")
    return extra


def induction_scores(pattern_by_layer: list[torch.Tensor], n: int, offset: int = 1) -> torch.Tensor:
    """[n_layers n_heads] mean attention from each later-copy token to the token after its previous
    occurrence, given each layer's pattern [batch n_heads query_pos key_pos] on a repeated sequence
    with period `n` whose first copy starts at `offset`."""
    scores = []
    for pattern in pattern_by_layer:
        # diagonal offset -(n-1): entries pattern[q, q - n + 1] for q = n - 1 .. pos - 1
        stripe = torch.diagonal(pattern.float(), offset=-(n - 1), dim1=-2, dim2=-1)
        first_query = offset + n  # first token of the second copy
        scores.append(stripe[..., first_query - (n - 1):].mean(dim=(0, -1)))
    return torch.stack(scores)


def copy_losses(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Mean next-token loss on each copy: [repeats], predicting tokens 2.. of each copy (the first
    token of a copy follows the previous copy's end, so it is left out of both)."""
    offset = _offset(tokens, n)
    repeats = (tokens.shape[-1] - offset) // n
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    loss = loss.view(tokens.shape[0], -1)  # loss[:, p] predicts tokens[:, p + 1]
    out = []
    for r in range(repeats):
        start = offset + r * n  # position of the copy's first token
        out.append(loss[:, start: start + n - 1].mean())
    return torch.stack(out)


@dataclass
class InductionResult:
    """What `measure_induction` found on one batch of repeated random tokens."""

    tokens: torch.Tensor  # [batch pos]
    n: int  # the span length (period)
    scores: torch.Tensor  # [n_layers n_heads]
    patterns: list  # per layer [batch n_heads query_pos key_pos]
    copy_loss: torch.Tensor  # [repeats]

    def top_heads(self, k: int = 3) -> list[tuple[int, int, float]]:
        """The k highest-scoring heads as (layer, head, score), best first."""
        flat = self.scores.flatten()
        order = flat.argsort(descending=True)[:k]
        n_heads = self.scores.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads, float(flat[i])) for i in order]


@torch.no_grad()
def measure_induction(model, tokens: torch.Tensor, n: int) -> InductionResult:
    """Run `model` (either convention's class) on repeated tokens once; return induction scores, patterns and
    per-copy loss."""
    model = model.hf()  # run through the transformers view: the same modules, its output convention
    offset = _offset(tokens, n)
    n_layers = model.cfg.num_hidden_layers
    names = [block_hook(layer, "attn.hook_pattern") for layer in range(n_layers)]
    device = model.input_device
    previous = model.attn_backend
    model.set_attn_backend("eager")  # patterns exist only in the eager kernel
    try:
        logits, cache = model.run_with_cache(tokens.to(device), names_filter=names)
    finally:
        model.set_attn_backend(previous)
    patterns = [cache[name].cpu() for name in names]
    return InductionResult(tokens=tokens.cpu(), n=n, scores=induction_scores(patterns, n, offset),
                           patterns=patterns, copy_loss=copy_losses(logits.cpu(), tokens.cpu(), n))
