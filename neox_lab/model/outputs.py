"""The output record every model class returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import KVCache


@dataclass
class NeoXOutput:
    """What a forward pass returns; fields a class does not produce stay None.

    logits: [batch pos d_vocab] (causal LM), [batch num_labels] (sequence classification, pooled),
    [batch pos num_labels] (token classification), [batch pos 2] (question answering, with
    start_logits / end_logits [batch pos] split out). hidden_states follows transformers: the input
    of every block, then the final LayerNorm's output (num_layers + 1 entries).
    """

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    last_hidden_state: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)
