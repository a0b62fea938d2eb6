"""LayerNorm with its scale, its standardised stream and its output exposed as hook points."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import axes
from ..dtypes import widen
from ..hooks.points import HookPoint


class LayerNorm(nn.Module):
    """`nn.LayerNorm` semantics (statistics in fp32 or wider), decomposed so every stream can be hooked.

    hook_scale       [batch pos 1]        sqrt(var + eps)
    hook_normalized  [batch pos d_model]  (x - mean) / scale, before the affine weight and bias
                                          (TransformerLens 3.x's hook_normalized)
    hook_ln_out      [batch pos d_model]  normalized * weight + bias: the output, what attention /
                                          MLP / unembedding read (TransformerLens has no such hook
                                          on an unfolded LayerNorm, hence a name it does not use)

    On CUDA with no hook attached, the fused kernel runs instead: the decomposed form costs extra
    memory passes there, while on CPU it is cheap and keeps hooked and unhooked runs bit-identical.
    """

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint(axes.LN_SCALE)
        self.hook_normalized = HookPoint(axes.RESID)
        self.hook_ln_out = HookPoint(axes.RESID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not (self.hook_scale.active or self.hook_normalized.active
                              or self.hook_ln_out.active):
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        dtype = x.dtype
        xf = widen(x)
        centered = xf - xf.mean(-1, keepdim=True)
        scale = (centered.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        if self.hook_scale.active:
            scale = self.hook_scale(scale.to(dtype)).to(xf.dtype)
        normalized = self.hook_normalized((centered / scale).to(dtype))
        out = normalized.to(xf.dtype) * self.weight.to(xf.dtype) + self.bias.to(xf.dtype)
        return self.hook_ln_out(out.to(dtype))
