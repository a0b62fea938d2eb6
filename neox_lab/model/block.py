"""One NeoX transformer block, parallel or sequential residual."""

from __future__ import annotations

from torch import nn

from .. import axes
from ..config import NeoXConfig
from ..hooks.points import HookPoint
from .attention import Attention
from .layernorm import LayerNorm
from .mlp import MLP


class Block(nn.Module):
    """ln1 -> attention and ln2 -> MLP, combined by the parallel or the sequential residual."""

    def __init__(self, cfg: NeoXConfig, layer: int):
        super().__init__()
        self.parallel = cfg.use_parallel_residual
        self.ln1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.ln2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.attn_dropout = nn.Dropout(cfg.hidden_dropout)
        self.mlp_dropout = nn.Dropout(cfg.hidden_dropout)
        self.hook_resid_pre = HookPoint(axes.RESID)
        self.hook_attn_out = HookPoint(axes.RESID)
        self.hook_mlp_out = HookPoint(axes.RESID)
        self.hook_resid_post = HookPoint(axes.RESID)
        if not self.parallel:
            # Only here is there a stream between attention and MLP.
            self.hook_resid_mid = HookPoint(axes.RESID)

    def forward(self, resid_pre, rotary, cos, sin, mask, **attn_kwargs):
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out, pattern = self.attn(self.ln1(resid_pre), cos=cos, sin=sin, mask=mask, rotary=rotary,
                                      **attn_kwargs)
        # Dropout is skipped outright in eval: a module call per stream is overhead that small-batch
        # decoding, bound by per-op cost, would pay for nothing.
        attn_out = self.hook_attn_out(self.attn_dropout(attn_out) if self.training else attn_out)
        if self.parallel:
            # resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre)); summed in transformers' order.
            mlp_out = self.mlp(self.ln2(resid_pre))
            mlp_out = self.hook_mlp_out(self.mlp_dropout(mlp_out) if self.training else mlp_out)
            resid_post = mlp_out + attn_out + resid_pre
        else:
            resid_mid = self.hook_resid_mid(attn_out + resid_pre)
            mlp_out = self.mlp(self.ln2(resid_mid))
            mlp_out = self.hook_mlp_out(self.mlp_dropout(mlp_out) if self.training else mlp_out)
            resid_post = mlp_out + resid_mid
        return self.hook_resid_post(resid_post), pattern
