"""NeoX self-attention: fused QKV, partial rotary, a pluggable kernel, per-head hook points."""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from torch import nn

from .. import axes
from ..config import NeoXConfig
from ..hooks.points import HookPoint
from .flash import FlashKernel
from .kernels import AttnMask, eager_attention, sdpa_attention
from .rotary import Rotary
from .weights import AttentionWeights

#: `last_kernel` of a layer that left a fast backend for one call, because scores or the pattern were asked for.
EAGER_FALLBACK = "eager (fallback)"


class Attention(nn.Module, AttentionWeights):
    """One attention layer. `qkv` and `out` keep transformers' fused layout, so weights load as-is;
    `W_Q`, `W_O`, `b_V`, `QK`, `OV`... show them in TransformerLens' layout (views, see weights.py)."""

    def __init__(self, cfg: NeoXConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.scale = cfg.head_dim**-0.5
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.flash = FlashKernel()
        self.last_kernel: str | None = None  # what the latest forward ran; see NeoXPreTrained.attn_kernels
        self._fallback_reported = False
        self.hook_q, self.hook_k, self.hook_v = HookPoint(axes.HEADS), HookPoint(axes.HEADS), HookPoint(axes.HEADS)
        self.hook_rot_q, self.hook_rot_k = HookPoint(axes.HEADS), HookPoint(axes.HEADS)
        self.hook_attn_scores = HookPoint(axes.PATTERN)
        self.hook_pattern = HookPoint(axes.PATTERN)
        self.hook_z = HookPoint(axes.HEADS)
        self.hook_result = HookPoint(axes.HEAD_WRITES)

    def needs_eager(self, output_attentions: bool) -> bool:
        """Scores and pattern exist only in the eager kernel: any consumer of them forces it."""
        return output_attentions or self.hook_attn_scores.active or self.hook_pattern.active

    def report_fallback(self) -> bool:
        """True when the latest forward fell back to the eager kernel and no warning has said so yet
        for this layer; marks it said, so each layer is reported once."""
        if self.last_kernel != EAGER_FALLBACK or self._fallback_reported:
            return False
        self._fallback_reported = True
        return True

    def project_per_head(self, x) -> list[torch.Tensor]:
        """q, k, v [batch pos n_heads d_head] from per-head inputs [batch pos n_heads d_model], one for all
        three or a (q, k, v) triple: head h's q reads only head h's copy (TransformerLens' split inputs)."""
        inputs = x if isinstance(x, tuple) else (x, x, x)
        weights = rearrange(self.qkv.weight, axes.QKV_WEIGHT_PER_HEAD, qkv=3, n_heads=self.n_heads)
        out = [einsum(inp, w, axes.HEAD_PROJECT) for inp, w in zip(inputs, weights, strict=True)]
        if self.qkv.bias is not None:
            biases = rearrange(self.qkv.bias, axes.QKV_BIAS_PER_HEAD, qkv=3, n_heads=self.n_heads)
            out = [o + b.to(o.dtype) for o, b in zip(out, biases, strict=True)]  # autocast: o may be half
        return out

    def forward(self, x, rotary: Rotary, cos, sin, mask: AttnMask, *, backend: str, kv_cache=None,
                head_mask=None, output_attentions: bool = False):
        """x -> (attn_out [batch pos d_model], pattern or None).

        x is ln1's output [batch pos d_model], or per head (the stream flags, see Block.per_head_inputs):
        one [batch pos n_heads d_model] read by q, k and v alike, or a (q, k, v) triple of them."""
        qkv = None
        if isinstance(x, tuple) or x.dim() == 4:
            q, k, v = self.project_per_head(x)
        else:
            qkv = rearrange(self.qkv(x), axes.QKV_SPLIT, qkv=3, n_heads=self.n_heads)
            # Three separate views (not `unbind`, whose outputs autograd forbids editing in place).
            q, k, v = qkv[0], qkv[1], qkv[2]
        if self.hook_q.active or self.hook_k.active or self.hook_v.active or self.hook_rot_q.active \
                or self.hook_rot_k.active:
            # A hooked stream may be cached, replaced or watched backward, and autograd drops a tensor hook
            # registered on a view once its base is written in place, even through another view (q's write
            # would silence a backward hook on v): every stream is rotated into a new tensor.
            q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
            q = self.hook_rot_q(rotary.rotate(q, cos, sin))
            k = self.hook_rot_k(rotary.rotate(k, cos, sin))
        elif qkv is not None:
            # Nothing watches these streams: rotate q and k where the projection wrote them (Rotary.rotate
            # says why), both in one pass: [2 batch pos n_heads d_head] under the same tables.
            rotary.rotate(qkv[:2], cos, sin, in_place=True)
        else:
            q, k = rotary.rotate(q, cos, sin, in_place=True), rotary.rotate(k, cos, sin, in_place=True)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        dropout_p = self.cfg.attention_dropout if self.training else 0.0
        pattern = None
        kernel_name = backend
        if backend != "eager" and self.needs_eager(output_attentions):
            # Only this layer leaves the fast kernel, for this call; NeoXModel.forward warns once per layer.
            kernel_name = EAGER_FALLBACK
            backend = "eager"
        if backend == "eager":
            z, pattern = eager_attention(
                q, k, v, mask, scale=self.scale, head_mask=head_mask, dropout_p=dropout_p,
                hook_scores=self.hook_attn_scores if self.hook_attn_scores.active else None,
                hook_pattern=self.hook_pattern if self.hook_pattern.active else None,
            )
        else:
            kernel = sdpa_attention if backend == "sdpa" else self.flash
            z = kernel(q, k, v, mask, scale=self.scale, head_mask=head_mask, dropout_p=dropout_p)
            if backend == "flash":
                kernel_name = self.flash.last
        if self.last_kernel != kernel_name:  # a module's setattr is slow, and this runs per layer and token
            self.last_kernel = kernel_name
        z = self.hook_z(z)
        if self.hook_result.active:
            # Each head's write into the residual stream; large, so only built when someone asks.
            result = einsum(z, self.W_O.to(z.dtype), axes.HEAD_RESULT)
            hooked, untouched = self.hook_result.fire_checked(result)
            # Hooks that only read (run_with_cache) leave `result` untouched: keep the fused projection
            # so logits stay bit-identical. A replacement, an in-place edit or a backward hook makes the
            # heads' sum the output.
            if not untouched:
                out = hooked.sum(-2)
                if self.out.bias is not None:
                    out = out + self.out.bias
                return out, (pattern if output_attentions else None)
        out = self.out(rearrange(z, axes.MERGE_HEADS))
        return out, (pattern if output_attentions else None)
