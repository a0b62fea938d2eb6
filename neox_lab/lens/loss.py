"""TransformerLens' next-token loss (`utils.lm_cross_entropy_loss`), what `return_type="loss"` returns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dtypes import widen


def lm_cross_entropy_loss(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          per_token: bool = False) -> torch.Tensor:
    """Cross-entropy of each next token: ``[batch pos-1]`` with `per_token` (0 where the token or the next
    one is masked out), else the mean over the positions counted (every position when there is no
    `attention_mask`, pad positions included, as TransformerLens). Taken in at least fp32."""
    tokens = tokens.to(logits.device)
    log_probs = F.log_softmax(widen(logits[..., :-1, :]), dim=-1)
    predicted = log_probs.gather(dim=-1, index=tokens[..., 1:, None].long())[..., 0]
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the tokens' shape "
                             f"{tuple(tokens.shape)}")
        mask = attention_mask.to(logits.device).bool()
        counted = mask[:, :-1] & mask[:, 1:]
        predicted = predicted.masked_fill(~counted, 0.0)
        n_tokens = counted.sum()
    else:
        n_tokens = predicted.numel()
    if per_token:
        return -predicted
    return -predicted.sum() / n_tokens
