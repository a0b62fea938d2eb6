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

    def to_tuple(self) -> tuple:
        """The fields that are set, in transformers' ModelOutput order (loss first)."""
        split = self.start_logits is not None
        order = (("loss", "start_logits", "end_logits") if split else ("loss", "logits", "last_hidden_state"))
        if self.logits is not None and not split:
            order = ("loss", "logits")
        names = (*order, "past_key_values", "hidden_states", "attentions")
        return tuple(getattr(self, n) for n in names if getattr(self, n) is not None)

    def __getitem__(self, key):
        """``out["logits"]`` by field name, ``out[0]`` / ``out[:2]`` by position in `to_tuple()`, as a
        transformers ModelOutput. Anything else is a tensor index meant for the logits: refused."""
        if isinstance(key, str):
            return getattr(self, key)
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        raise TypeError(f"NeoXOutput[{key!r}]: this is the transformers-style output object, not a tensor; "
                        "use out.logits, or call the model TransformerLens-style, model(tokens, "
                        "return_type='logits'), to get the logits tensor")

    def __getattr__(self, name: str):
        # Only reached for a missing attribute: most likely a tensor method on what was taken for logits.
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(f"NeoXOutput has no attribute {name!r}: it is the transformers-style output "
                             "object, not a tensor; use out.logits, or call the model TransformerLens-style, "
                             "model(tokens, return_type='logits'), to get the logits tensor")

    def __iter__(self):
        """Unpacks like ``loss, logits = out`` (the set fields, in `to_tuple()` order)."""
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())
