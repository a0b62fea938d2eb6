"""Per-module weight views in TransformerLens' layout: `attn.W_Q` [n_heads d_model d_head], `W_O`, `b_V`,
`QK`, `OV`, `mlp.W_in`...

neox_lab keeps transformers' storage (a fused, head-interleaved `qkv` Linear, `[out in]` weights) so
checkpoints load as-is; these properties show the same numbers the way TransformerLens lays them out.
They live on the core's modules because the core reads them (attention's per-head `hook_result` is
z @ W_O) and both conventions' classes share those modules; the model-wide stacks (`model.W_Q`
[n_layers ...], `W_U`, ...) are the TransformerLens class's, in `neox_lab/lens/weights.py`.

Every weight and bias here is a **view** of the parameter it comes from: an in-place edit under
`torch.no_grad()` writes through to the model, as editing TransformerLens' parameters does. A layer
without attention biases (`attention_bias=False`) reports zero b_Q/b_K/b_V/b_O copies, as
TransformerLens does.

QK and OV circuits are `FactoredMatrix` objects (`W_Q @ W_K^T` and `W_V @ W_O`). Like TransformerLens, the
QK circuit ignores rotary: it is the bilinear form between residual directions *before* the rotation, so
for rotary heads it is the position-independent part only (exact for the `d_head - rotary_dim`
unrotated channels, and for the rotated ones at relative distance 0).
"""

from __future__ import annotations

import torch
from einops import rearrange

from .. import axes
from ..factored_matrix import FactoredMatrix


def zeros_like_weight(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """Zeros of `shape` in `like`'s dtype and device: the bias a layer without one reports."""
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
            return zeros_like_weight(self.qkv.weight, self.n_heads, self.qkv.weight.shape[0] // (3 * self.n_heads))
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
            return zeros_like_weight(self.out.weight, self.out.weight.shape[0])
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
