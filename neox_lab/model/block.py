"""One NeoX transformer block, parallel or sequential residual."""

from __future__ import annotations

import torch
from einops import repeat
from torch import nn

from .. import axes
from ..config import NeoXConfig
from ..hooks.points import HookPoint
from ..hooks.registry import unavailable_reason
from .attention import Attention
from .layernorm import LayerNorm
from .mlp import MLP


class Block(nn.Module):
    """ln1 -> attention and ln2 -> MLP, combined by the parallel or the sequential residual.

    TransformerLens' stream flags (the model's `set_use_attn_in`, `set_use_split_qkv_input`,
    `set_use_hook_mlp_in`) switch on hook points here: `hook_attn_in` / `hook_q_input`, `hook_k_input`,
    `hook_v_input`, each head's own copy of resid_pre, which ln1 then normalises copy by copy and the
    attention projects head by head (so an edit to head h's copy reaches only head h); and `hook_mlp_in`,
    the MLP's input before ln2. A flag that is off costs one attribute test per block and forward.
    """

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
        self.hook_attn_in = HookPoint(axes.HEAD_READS)
        self.hook_q_input = HookPoint(axes.HEAD_READS)
        self.hook_k_input = HookPoint(axes.HEAD_READS)
        self.hook_v_input = HookPoint(axes.HEAD_READS)
        self.hook_mlp_in = HookPoint(axes.RESID)
        # Born off, as TransformerLens' flags are: the model's set_use_... switches them on.
        for name in ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in"):
            getattr(self, name).unavailable = unavailable_reason(name, ())
        self.hook_attn_out = HookPoint(axes.RESID)
        self.hook_mlp_out = HookPoint(axes.RESID)
        self.hook_resid_post = HookPoint(axes.RESID)
        if not self.parallel:
            # Only here is there a stream between attention and MLP.
            self.hook_resid_mid = HookPoint(axes.RESID)

    def forward(self, resid_pre, rotary, cos, sin, mask, **attn_kwargs):
        resid_pre = self.hook_resid_pre(resid_pre)
        if self.hook_attn_in.available or self.hook_q_input.available:
            attn_in = self.per_head_inputs(resid_pre)
        else:
            attn_in = self.ln1(resid_pre)
        attn_out, pattern = self.attn(attn_in, cos=cos, sin=sin, mask=mask, rotary=rotary, **attn_kwargs)
        # Dropout is skipped outright in eval: a module call per stream is overhead that small-batch
        # decoding, bound by per-op cost, would pay for nothing.
        attn_out = self.hook_attn_out(self.attn_dropout(attn_out) if self.training else attn_out)
        if self.parallel:
            # resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre)); summed in transformers' order.
            mlp_out = self.mlp(self.ln2(self.mlp_input(resid_pre)))
            mlp_out = self.hook_mlp_out(self.mlp_dropout(mlp_out) if self.training else mlp_out)
            resid_post = mlp_out + attn_out + resid_pre
        else:
            resid_mid = self.hook_resid_mid(attn_out + resid_pre)
            mlp_out = self.mlp(self.ln2(self.mlp_input(resid_mid)))
            mlp_out = self.hook_mlp_out(self.mlp_dropout(mlp_out) if self.training else mlp_out)
            resid_post = mlp_out + resid_mid
        return self.hook_resid_post(resid_post), pattern

    def per_head_inputs(self, resid_pre: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """ln1 of each head's own copy of resid_pre, [batch pos n_heads d_model]: one for q, k and v alike
        (use_attn_in alone) or a (q, k, v) triple (use_split_qkv_input), as TransformerLens computes them.

        A hooked copy is materialised, so an in-place edit of one head's copy touches only that head; an
        unhooked one stays a broadcast view. With both flags on, the q/k/v copies are copies of
        hook_attn_in's output (edits there reach all three)."""
        source = repeat(resid_pre, axes.REPEAT_HEADS, n_heads=self.attn.n_heads)
        if self.hook_attn_in.available:
            source = self.hook_attn_in(source.clone() if self.hook_attn_in.active else source)
            if not self.hook_q_input.available:
                return self.ln1(source)
        return tuple(self.ln1(hook(source.clone() if hook.active else source))
                     for hook in (self.hook_q_input, self.hook_k_input, self.hook_v_input))

    def mlp_input(self, x: torch.Tensor) -> torch.Tensor:
        """What ln2 reads: x, through hook_mlp_in when it is hooked (as a copy, since x is also summed
        into resid_post: an in-place edit there must change the MLP's input only, as in TransformerLens)."""
        return self.hook_mlp_in(x.clone()) if self.hook_mlp_in.active else x
