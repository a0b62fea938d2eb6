"""The weights in TransformerLens' layout and names: W_Q [n_heads d_model d_head], W_O, W_in, W_U, QK, OV...

neox_lab keeps transformers' storage (a fused, head-interleaved `qkv` Linear, `[out in]` weights) so
checkpoints load as-is; these properties show the same numbers the way TransformerLens lays them out.

Views or copies:
- Per block (`model.blocks[L].attn.W_Q`, `.mlp.W_in`, ...) every weight and bias is a **view** of the
  parameter it comes from: an in-place edit under `torch.no_grad()` writes through to the model, as
  editing TransformerLens' parameters does.
- Model-wide stacks (`model.W_Q` [n_layers n_heads d_model d_head], ...) are **copies**, as
  TransformerLens builds them with `torch.stack` too: edit the per-block views instead.
- `W_E` and `W_U` are views of the embedding and unembedding; `b_U` is a zero vector (a copy) unless
  `fold_ln` gave the unembedding a bias, then a view of it. NeoX has no unembedding bias and TransformerLens
  reports zeros for it too. A layer without attention biases (`attention_bias=False`) reports zero b_Q/b_K/
  b_V/b_O copies, as TransformerLens does.
- `W_pos` does not exist: NeoX encodes positions by rotary, inside attention. Asking for it raises an
  AttributeError saying so (TransformerLens' rotary models have no meaningful W_pos either).

QK and OV circuits are `FactoredMatrix` objects (`W_Q @ W_K^T` and `W_V @ W_O`). Like TransformerLens, the
QK circuit ignores rotary: it is the bilinear form between residual directions *before* the rotation, so
for rotary heads it is the position-independent part only (exact for the `d_head - rotary_dim`
unrotated channels, and for the rotated ones at relative distance 0).
"""

from __future__ import annotations

import torch
from einops import rearrange

from .. import axes
from .factored_matrix import FactoredMatrix

#: Names a NeoX does not have, with the reason (raised as AttributeError by the models).
ABSENT_WEIGHTS = {
    "W_pos": "NeoX has no positional embedding matrix: positions enter through rotary embeddings "
             "inside attention (rotary_pct of each head), so there is no W_pos (nor W_E_pos)",
    "W_E_pos": "NeoX has no positional embedding matrix: positions enter through rotary embeddings "
               "inside attention, so W_E_pos would be W_E alone; use W_E",
}


def _zeros(like: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


class AttentionWeights:
    """TransformerLens' per-head weight names for an attention layer with `qkv`, `out` and `n_heads`."""

    qkv: torch.nn.Linear
    out: torch.nn.Linear
    n_heads: int

    def _qkv_weight(self, which: int) -> torch.Tensor:
        # einops returns views here (a reshape and a permute of a contiguous parameter).
        return rearrange(self.qkv.weight, axes.QKV_WEIGHT_PER_HEAD, qkv=3, n_heads=self.n_heads)[which]

    def _qkv_bias(self, which: int) -> torch.Tensor:
        if self.qkv.bias is None:
            return _zeros(self.qkv.weight, self.n_heads, self.qkv.weight.shape[0] // (3 * self.n_heads))
        return rearrange(self.qkv.bias, axes.QKV_BIAS_PER_HEAD, qkv=3, n_heads=self.n_heads)[which]

    @property
    def W_Q(self) -> torch.Tensor:
        """Query weights ``[n_heads d_model d_head]``, a view of the fused qkv weight."""
        return self._qkv_weight(0)

    @property
    def W_K(self) -> torch.Tensor:
        """Key weights ``[n_heads d_model d_head]``, a view of the fused qkv weight."""
        return self._qkv_weight(1)

    @property
    def W_V(self) -> torch.Tensor:
        """Value weights ``[n_heads d_model d_head]``, a view of the fused qkv weight."""
        return self._qkv_weight(2)

    @property
    def W_O(self) -> torch.Tensor:
        """Output weights ``[n_heads d_head d_model]``, a view of the output projection's weight."""
        return rearrange(self.out.weight, axes.W_O_PER_HEAD, n_heads=self.n_heads)

    @property
    def b_Q(self) -> torch.Tensor:
        """Query bias ``[n_heads d_head]``."""
        return self._qkv_bias(0)

    @property
    def b_K(self) -> torch.Tensor:
        """Key bias ``[n_heads d_head]``."""
        return self._qkv_bias(1)

    @property
    def b_V(self) -> torch.Tensor:
        """Value bias ``[n_heads d_head]``."""
        return self._qkv_bias(2)

    @property
    def b_O(self) -> torch.Tensor:
        """Output bias ``[d_model]``."""
        if self.out.bias is None:
            return _zeros(self.out.weight, self.out.weight.shape[0])
        return self.out.bias

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K^T`` per head, ``[n_heads d_model d_model]`` (rotary ignored, as in TransformerLens)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` per head, ``[n_heads d_model d_model]``."""
        return FactoredMatrix(self.W_V, self.W_O)


class MLPWeights:
    """TransformerLens' names for an MLP with `fc_in` and `fc_out`."""

    fc_in: torch.nn.Linear
    fc_out: torch.nn.Linear

    @property
    def W_in(self) -> torch.Tensor:
        """``[d_model d_mlp]``, a view of fc_in's weight."""
        return self.fc_in.weight.T

    @property
    def b_in(self) -> torch.Tensor:
        """``[d_mlp]``."""
        return self.fc_in.bias

    @property
    def W_out(self) -> torch.Tensor:
        """``[d_mlp d_model]``, a view of fc_out's weight."""
        return self.fc_out.weight.T

    @property
    def b_out(self) -> torch.Tensor:
        """``[d_model]``."""
        return self.fc_out.bias


def _stack(blocks, part: str, name: str) -> torch.Tensor:
    parts = [getattr(getattr(block, part), name) for block in blocks]
    # Layers of a model split across devices are gathered on the first layer's device.
    return torch.stack([p.to(parts[0].device) for p in parts], dim=0)


class ModelWeights:
    """TransformerLens' model-wide weight names, for a model with `body` (its NeoXModel) and maybe `unembed`.

    Stacks over layers are copies (see the module docstring); W_E and W_U are views.
    """

    @property
    def W_E(self) -> torch.Tensor:
        """The embedding ``[d_vocab d_model]`` (the parameter itself)."""
        return self.body.embed.weight

    def _unembed(self) -> torch.nn.Linear:
        unembed = self._modules.get("unembed")
        if unembed is None:
            raise AttributeError(missing_unembed(type(self).__name__))
        return unembed

    @property
    def W_U(self) -> torch.Tensor:
        """The unembedding ``[d_model d_vocab]``, a view of `unembed.weight` (causal LM only)."""
        return self._unembed().weight.T

    @property
    def b_U(self) -> torch.Tensor:
        """The unembedding bias ``[d_vocab]``: zeros (NeoX has none), or the final LayerNorm's bias
        folded in by `process_weights_(fold_ln=True)`."""
        unembed = self._unembed()
        if unembed.bias is None:
            return _zeros(unembed.weight, unembed.weight.shape[0])
        return unembed.bias

    # Stacked per-layer weights, [n_layers ...], as TransformerLens' HookedTransformer has them.
    W_Q = property(lambda self: _stack(self.body.blocks, "attn", "W_Q"),
                   doc="``[n_layers n_heads d_model d_head]`` (a copy)")
    W_K = property(lambda self: _stack(self.body.blocks, "attn", "W_K"),
                   doc="``[n_layers n_heads d_model d_head]`` (a copy)")
    W_V = property(lambda self: _stack(self.body.blocks, "attn", "W_V"),
                   doc="``[n_layers n_heads d_model d_head]`` (a copy)")
    W_O = property(lambda self: _stack(self.body.blocks, "attn", "W_O"),
                   doc="``[n_layers n_heads d_head d_model]`` (a copy)")
    b_Q = property(lambda self: _stack(self.body.blocks, "attn", "b_Q"), doc="``[n_layers n_heads d_head]``")
    b_K = property(lambda self: _stack(self.body.blocks, "attn", "b_K"), doc="``[n_layers n_heads d_head]``")
    b_V = property(lambda self: _stack(self.body.blocks, "attn", "b_V"), doc="``[n_layers n_heads d_head]``")
    b_O = property(lambda self: _stack(self.body.blocks, "attn", "b_O"), doc="``[n_layers d_model]``")
    W_in = property(lambda self: _stack(self.body.blocks, "mlp", "W_in"), doc="``[n_layers d_model d_mlp]``")
    W_out = property(lambda self: _stack(self.body.blocks, "mlp", "W_out"), doc="``[n_layers d_mlp d_model]``")
    b_in = property(lambda self: _stack(self.body.blocks, "mlp", "b_in"), doc="``[n_layers d_mlp]``")
    b_out = property(lambda self: _stack(self.body.blocks, "mlp", "b_out"), doc="``[n_layers d_model]``")

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K^T`` for every layer and head, ``[n_layers n_heads d_model d_model]``; rotary is ignored,
        as in TransformerLens (see the module docstring)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` for every layer and head, ``[n_layers n_heads d_model d_model]``."""
        return FactoredMatrix(self.W_V, self.W_O)

    def all_head_labels(self) -> list[str]:
        """"L0H0", "L0H1", ... in layer-major order, as TransformerLens labels heads."""
        return [f"L{layer}H{head}" for layer in range(self.cfg.num_hidden_layers)
                for head in range(self.cfg.num_attention_heads)]

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """Each token's unembedding column: the residual direction that raises its logit.

        `tokens`: a str (must be one token), an int, or an integer tensor ``[...]``; returns ``[d_model]``
        for a single token (a view of W_U), else ``[... d_model]`` (a copy), as TransformerLens."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        if not torch.is_tensor(tokens) or tokens.dtype.is_floating_point:
            raise TypeError(f"tokens_to_residual_directions takes a str, an int or an integer tensor, got "
                            f"{type(tokens).__name__}")
        tokens = tokens.to(self.W_U.device)
        if tokens.ndim == 0:
            return self.W_U[:, tokens]
        return self.W_U[:, tokens].movedim(0, -1)


def missing_unembed(cls_name: str) -> str:
    return (f"{cls_name} has no unembedding, so no W_U / b_U; they belong to NeoXForCausalLM "
            "(load the checkpoint with it to read them)")


def absent_attribute_message(model, name: str) -> str | None:
    """Why `name` does not exist on `model`, for a TransformerLens name NeoX lacks; None otherwise."""
    if name in ABSENT_WEIGHTS:
        return ABSENT_WEIGHTS[name]
    if name in ("W_U", "b_U") and "unembed" not in model._modules:
        return missing_unembed(type(model).__name__)
    return None
