"""LayerNorm with its scale and both normalised streams exposed as hook points."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import axes
from ..dtypes import widen
from ..hooks.points import HookPoint


class LayerNorm(nn.Module):
    """`nn.LayerNorm` semantics (statistics in fp32 or wider), decomposed so every stream can be hooked.

    hook_scale        [batch pos 1]        sqrt(var + eps)
    hook_standardized [batch pos d_model]  (x - mean) / scale, before the affine weight and bias
    hook_normalized   [batch pos d_model]  standardized * weight + bias: the output (TransformerLens'
                                           hook_normalized of an unfolded LayerNorm)

    On CUDA with no hook attached, the fused kernel runs instead: the decomposed form costs extra
    memory passes there, while on CPU it is cheap and keeps hooked and unhooked runs bit-identical.
    """

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint(axes.LN_SCALE)
        self.hook_standardized = HookPoint(axes.RESID)
        self.hook_normalized = HookPoint(axes.RESID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not (self.hook_scale.active or self.hook_standardized.active
                              or self.hook_normalized.active):
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        dtype = x.dtype
        xf = widen(x)
        centered = xf - xf.mean(-1, keepdim=True)
        scale = (centered.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        if self.hook_scale.active:
            scale = self.hook_scale(scale.to(dtype)).to(xf.dtype)
        standardized = self.hook_standardized((centered / scale).to(dtype))
        out = standardized.to(xf.dtype) * self.weight.to(xf.dtype) + self.bias.to(xf.dtype)
        return self.hook_normalized(out.to(dtype))
