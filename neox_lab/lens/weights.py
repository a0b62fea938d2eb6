"""TransformerLens' model-wide weight names on `HookedTransformer`: W_E, W_U, b_U, the per-layer stacks
W_Q [n_layers n_heads d_model d_head], ..., and the QK / OV circuits of every head.

Views or copies, as TransformerLens has them:
- Model-wide stacks (`model.W_Q`, ...) are **copies** (TransformerLens builds them with `torch.stack`
  too): edit the per-block views (`model.blocks[L].attn.W_Q`, neox_lab/model/weights.py) instead.
- `W_E` and `W_U` are views of the embedding and unembedding; `b_U` is a zero vector (a copy) unless
  `fold_ln` gave the unembedding a bias, then that bias. NeoX has no unembedding bias and TransformerLens
  reports zeros for it too.
- `W_pos` does not exist: NeoX encodes positions by rotary, inside attention. Asking for it raises an
  AttributeError saying so (TransformerLens' rotary models have no meaningful W_pos either).
"""

from __future__ import annotations

import torch
from torch import nn

from ..factored_matrix import FactoredMatrix
from ..model.weights import zeros_like_weight

#: Names a NeoX does not have, with the reason (raised as AttributeError by `HookedTransformer`).
ABSENT_WEIGHTS = {
    "W_pos": "NeoX has no positional embedding matrix: positions enter through rotary embeddings "
             "inside attention (rotary_pct of each head), so there is no W_pos (nor W_E_pos)",
    "W_E_pos": "NeoX has no positional embedding matrix: positions enter through rotary embeddings "
               "inside attention, so W_E_pos would be W_E alone; use W_E",
}


def stack_layers(blocks: nn.ModuleList, part: str, name: str) -> torch.Tensor:
    """``[n_layers ...]``: weight `name` of each block's `part` ("attn" or "mlp"), stacked (a copy)."""
    parts = [getattr(getattr(block, part), name) for block in blocks]
    # Layers of a model split across devices are gathered on the first layer's device.
    return torch.stack([p.to(parts[0].device) for p in parts], dim=0)


def _stacked(part: str, name: str, shape: str) -> property:
    return property(lambda self: stack_layers(self.blocks, part, name), doc=f"``[{shape}]`` (a copy)")


class ModelWeights:
    """TransformerLens' model-wide weight names, for a model with `embed`, `blocks` and `unembed` modules."""

    embed: nn.Embedding
    blocks: nn.ModuleList
    unembed: nn.Linear

    @property
    def W_E(self) -> torch.Tensor:
        """The embedding ``[d_vocab d_model]`` (the parameter itself)."""
        return self.embed.weight

    @property
    def W_U(self) -> torch.Tensor:
        """The unembedding ``[d_model d_vocab]``, a view of `unembed.weight`."""
        return self.unembed.weight.T

    @property
    def b_U(self) -> torch.Tensor:
        """The unembedding bias ``[d_vocab]``: zeros (NeoX has none), or the final LayerNorm's bias
        folded in by `process_weights_(fold_ln=True)`."""
        if self.unembed.bias is None:
            return zeros_like_weight(self.unembed.weight, self.unembed.weight.shape[0])
        return self.unembed.bias

    # Stacked per-layer weights, [n_layers ...], as TransformerLens' HookedTransformer has them.
    W_Q = _stacked("attn", "W_Q", "n_layers n_heads d_model d_head")
    W_K = _stacked("attn", "W_K", "n_layers n_heads d_model d_head")
    W_V = _stacked("attn", "W_V", "n_layers n_heads d_model d_head")
    W_O = _stacked("attn", "W_O", "n_layers n_heads d_head d_model")
    b_Q = _stacked("attn", "b_Q", "n_layers n_heads d_head")
    b_K = _stacked("attn", "b_K", "n_layers n_heads d_head")
    b_V = _stacked("attn", "b_V", "n_layers n_heads d_head")
    b_O = _stacked("attn", "b_O", "n_layers d_model")
    W_in = _stacked("mlp", "W_in", "n_layers d_model d_mlp")
    W_out = _stacked("mlp", "W_out", "n_layers d_mlp d_model")
    b_in = _stacked("mlp", "b_in", "n_layers d_mlp")
    b_out = _stacked("mlp", "b_out", "n_layers d_model")

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K^T`` for every layer and head, ``[n_layers n_heads d_model d_model]``; rotary is ignored,
        as in TransformerLens (neox_lab/model/weights.py says what that leaves)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` for every layer and head, ``[n_layers n_heads d_model d_model]``."""
        return FactoredMatrix(self.W_V, self.W_O)

    def all_head_labels(self) -> list[str]:
        """"L0H0", "L0H1", ... in layer-major order, as TransformerLens labels heads."""
        n_heads = self.blocks[0].attn.n_heads
        return [f"L{layer}H{head}" for layer in range(len(self.blocks)) for head in range(n_heads)]

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """Each token's unembedding column: the residual direction that raises its logit.

        `tokens`: a str (must be one token), an int, or an integer tensor ``[...]``; returns ``[d_model]``
        for a single token (a view of W_U), else ``[... d_model]`` (a copy), as TransformerLens."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)  # type: ignore[attr-defined]
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        if not torch.is_tensor(tokens) or tokens.dtype.is_floating_point:
            raise TypeError(f"tokens_to_residual_directions takes a str, an int or an integer tensor, got "
                            f"{type(tokens).__name__}")
        tokens = tokens.to(self.W_U.device)
        if tokens.ndim == 0:
            return self.W_U[:, tokens]
        return self.W_U[:, tokens].movedim(0, -1)
