"""Code bugs a porter really makes, injected into a live neox_lab model (not into its weights or config),
each with the place a comparison must name. For checking that an equivalence harness (`compare`, or
your own) catches them:

    for name, bug in CODE_BUGS.items():
        broken, expected = bug(model)          # a deep copy computing the bug; `model` is untouched
        report = compare(broken, model)
        assert not report.equivalent and named_place(report, expected)

Each takes a neox_lab causal LM and returns (the broken deep copy, `Expected`). The bugs live in the
copy's modules (a replaced activation, a LayerNorm forward, a forward pre-hook that edits the
attention mask or the positions), so the copy can be cast (`.half()`) and compared like any model.
Some need a config that can show them: a partial rotary for `rotary_last_channels`, the parallel
residual for `residual_sequential`, a context over 256 positions for `sliding_window` (ValueError
otherwise).
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from ..dtypes import widen
from ..model.kernels import AttnMask
from .mutations import Expected

#: The sliding window of `sliding_window` (a Mistral-style port applied to a NeoX).
WINDOW = 256


@dataclass
class EditedMask(AttnMask):
    """An attention mask whose allowed keys a bug edits: `window` keeps the last `window` keys of each
    query, `lookahead` lets a query see that many future keys, `ignore_padding` drops the key mask."""

    window: int | None = None
    lookahead: int = 0
    base_key_mask: torch.Tensor | None = field(default=None, repr=False)

    @property
    def plain_causal(self) -> bool:
        return False  # the kernels' built-in causal mask would undo the edit

    @cached_property
    def allowed(self) -> torch.Tensor:
        q_pos = torch.arange(self.k_len - self.q_len, self.k_len, device=self.device)
        k_pos = torch.arange(self.k_len, device=self.device)
        allowed = (k_pos[None, :] <= q_pos[:, None] + self.lookahead)
        if self.window is not None:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < self.window)
        allowed = allowed[None, None]
        if self.key_mask is not None:
            allowed = allowed & self.key_mask[:, None, None, :]
        return allowed


def _copy(model):
    if not hasattr(model, "hook_dict") or not hasattr(model, "model"):
        raise TypeError(f"code bugs are injected into a neox_lab model, got {type(model).__name__}")
    return copy.deepcopy(model).eval()


def _edit_mask(model, **edit):
    def pre(module, args, kwargs):
        mask = kwargs.get("mask")
        if isinstance(mask, AttnMask):
            key_mask = None if edit.get("ignore_padding") else mask.key_mask
            kwargs["mask"] = EditedMask(q_len=mask.q_len, k_len=mask.k_len, device=mask.device, key_mask=key_mask,
                                        window=edit.get("window"), lookahead=edit.get("lookahead", 0))
        return args, kwargs
    for block in model.model.blocks:
        block.attn.register_forward_pre_hook(pre, with_kwargs=True)


def _edit_positions(model, shift: int, from_column: bool):
    """A pre-hook on the body: position ids computed as a port with the bug would."""
    def pre(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None or kwargs.get("position_ids") is not None:
            return args, kwargs
        cache, mask = kwargs.get("past_key_values"), kwargs.get("attention_mask")
        past = cache.length if cache is not None else 0
        q_len = ids.shape[1]
        if shift and past == 0:
            return args, kwargs  # the prompt is right; only the cached steps are off
        if mask is not None and not from_column:
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        else:
            pos = torch.arange(past, past + q_len, device=ids.device)[None].expand(ids.shape[0], -1)
        kwargs["position_ids"] = pos + shift
        return args, kwargs
    model.model.register_forward_pre_hook(pre, with_kwargs=True)


def _bugged_layer_norm(module, x: torch.Tensor, *, eps_outside: bool = False, center: bool = True,
                       affine: bool = True) -> torch.Tensor:
    """LayerNorm.forward with one of its classic port bugs, every hook point still called."""
    dtype = x.dtype
    xf = widen(x)
    centered = xf - xf.mean(-1, keepdim=True) if center else xf
    var = centered.pow(2).mean(-1, keepdim=True)
    scale = var.sqrt() + module.eps if eps_outside else (var + module.eps).sqrt()
    scale = module.hook_scale(scale.to(dtype)).to(xf.dtype)
    normalized = module.hook_normalized((centered / scale).to(dtype))
    out = normalized.to(xf.dtype)
    if affine:
        out = out * module.weight.to(xf.dtype) + module.bias.to(xf.dtype)
    return module.hook_ln_out(out.to(dtype))


def _layer_norms(model):
    for block in model.model.blocks:
        yield block.ln1
        yield block.ln2
    yield model.model.ln_final


def _act(hook: str, layer: int = 0, batch: str | None = None) -> Expected:
    """The stream a bug must first show at: `hook` of block `layer`, or a hook outside the blocks."""
    if hook == "hook_embed" or hook.startswith("ln_final."):
        return Expected("activations", hook, batch=batch)
    return Expected("activations", f"blocks.{layer}.{hook}", layer=layer, batch=batch)


def gelu_tanh(model):
    """The MLP activation computed with GELU's tanh approximation (gelu_new) where the config says exact gelu."""
    if model.cfg.hidden_act != "gelu":
        raise ValueError(f"gelu_tanh needs hidden_act='gelu', the config has {model.cfg.hidden_act!r}")
    out = _copy(model)
    for block in out.model.blocks:
        block.mlp.act = _gelu_tanh
    return out, _act("mlp.hook_post")


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def ln_eps_outside_sqrt(model):
    """Every LayerNorm divides by sqrt(var) + eps instead of sqrt(var + eps)."""
    out = _copy(model)
    for ln in _layer_norms(out):
        ln.forward = types.MethodType(lambda self, x: _bugged_layer_norm(self, x, eps_outside=True), ln)
    return out, _act("ln1.hook_scale")


def ln_no_centering(model):
    """Every LayerNorm skips subtracting the mean (an RMSNorm with a bias)."""
    out = _copy(model)
    for ln in _layer_norms(out):
        ln.forward = types.MethodType(lambda self, x: _bugged_layer_norm(self, x, center=False), ln)
    return out, _act("ln1.hook_scale")


def ln_final_no_affine(model):
    """The final LayerNorm's weight and bias never applied."""
    out = _copy(model)
    ln = out.model.ln_final
    ln.forward = types.MethodType(lambda self, x: _bugged_layer_norm(self, x, affine=False), ln)
    return out, _act("ln_final.hook_ln_out")


def mlp_bias_dropped(model, layer: int = 0):
    """One layer's MLP output projection computed without its bias."""
    out = _copy(model)
    fc = out.model.blocks[layer].mlp.fc_out
    fc.forward = types.MethodType(lambda self, x: F.linear(x, self.weight), fc)
    return out, _act("hook_mlp_out", layer)


def attn_bias_dropped(model, layer: int = 0):
    """One layer's attention output projection computed without its bias (needs attention_bias)."""
    if not model.cfg.attention_bias:
        raise ValueError("attn_bias_dropped needs attention_bias=True (the config has no attention biases)")
    out = _copy(model)
    proj = out.model.blocks[layer].attn.out
    proj.forward = types.MethodType(lambda self, x: F.linear(x, self.weight), proj)
    return out, _act("hook_attn_out", layer)


def qkv_layout(model):
    """The fused QKV output split as (qkv n_heads d_head) instead of transformers' (n_heads qkv d_head)."""
    out = _copy(model)
    n_heads = model.cfg.num_attention_heads
    if n_heads == 1:
        raise ValueError("qkv_layout needs more than one head (with one head both layouts agree)")

    def regroup(module, args, qkv):
        # what the buggy split reads as head h's q/k/v is the true layout's (qkv, h) block
        return qkv.unflatten(-1, (3, n_heads, -1)).transpose(-3, -2).flatten(-3)
    for block in out.model.blocks:
        block.attn.qkv.register_forward_hook(regroup)
    return out, _act("attn.hook_q")


def attn_scale_per_dim(model):
    """Attention scores scaled by 1/d_head instead of 1/sqrt(d_head)."""
    out = _copy(model)
    for block in out.model.blocks:
        block.attn.scale = 1.0 / model.cfg.head_dim
    return out, _act("attn.hook_attn_scores")


def rotary_interleaved(model):
    """Rotary in GPT-J's interleaved-pairs convention instead of NeoX's rotate-half."""
    if model.cfg.rotary_channels < 2:
        raise ValueError("rotary_interleaved needs at least two rotated channels per head")
    out = _copy(model)
    out.model.rotary.rotate = types.MethodType(_rotate_interleaved, out.model.rotary)
    return out, _act("attn.hook_rot_q")


def _rotate_interleaved(self, x, cos, sin, *, in_place: bool = False):
    ch = self.channels - self.channels % 2
    rot = x[..., :ch]
    half_cos, half_sin = cos[..., : ch // 2], sin[..., : ch // 2]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    rotated = torch.stack((even * half_cos - odd * half_sin, even * half_sin + odd * half_cos), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., ch:]), dim=-1)


def rotary_last_channels(model):
    """The last rotary_dim channels of each head rotated instead of the first (needs a partial rotary)."""
    ch, d = model.cfg.rotary_channels, model.cfg.head_dim
    if not 0 < ch < d:
        raise ValueError(f"rotary_last_channels needs a partial rotary (0 < rotary channels {ch} < d_head {d})")
    out = _copy(model)
    out.model.rotary.rotate = types.MethodType(_rotate_last, out.model.rotary)
    return out, _act("attn.hook_rot_q")


def _rotate_last(self, x, cos, sin, *, in_place: bool = False):
    ch = self.channels
    rot = x[..., -ch:]
    half = ch // 2
    rotated = rot * cos + torch.cat((-rot[..., half:], rot[..., :half]), dim=-1) * sin
    return torch.cat((x[..., :-ch], rotated.to(x.dtype)), dim=-1)


def causal_lookahead(model):
    """The causal mask off by one: each query also sees the next key (a future token)."""
    out = _copy(model)
    _edit_mask(out, lookahead=1)
    return out, _act("attn.hook_attn_scores")


def pad_keys_attended(model):
    """The padding mask dropped in attention (positions still right): real tokens attend to pad keys."""
    out = _copy(model)
    _edit_mask(out, ignore_padding=True)
    return out, _act("attn.hook_attn_scores", batch="left-padded")


def sliding_window(model, window: int = WINDOW):
    """Attention limited to the last `window` keys (a sliding-window kernel applied to a NeoX)."""
    if model.cfg.max_position_embeddings <= window:
        raise ValueError(f"sliding_window({window}) shows only beyond {window} positions; the config allows "
                         f"{model.cfg.max_position_embeddings}")
    out = _copy(model)
    _edit_mask(out, window=window)
    return out, _act("attn.hook_z", batch="probe")


def decode_position_off_by_one(model):
    """With a KV cache, the new token's position is one too far (the prompt itself is right)."""
    out = _copy(model)
    _edit_positions(out, shift=1, from_column=False)
    return out, Expected("decoding", "step 1")


def residual_sequential(model):
    """A parallel-residual NeoX computed sequentially: the MLP reads resid_pre + attn_out."""
    if not model.cfg.use_parallel_residual:
        raise ValueError("residual_sequential needs a parallel-residual config")
    out = _copy(model)
    for block in out.model.blocks:
        seen = {}
        block.attn.register_forward_hook(lambda m, a, o, seen=seen: seen.__setitem__("attn", o[0]))
        block.ln2.register_forward_pre_hook(lambda m, a, seen=seen: (a[0] + seen.pop("attn"),))
    return out, _act("ln2.hook_scale")


def embed_scaled(model):
    """The token embedding multiplied by sqrt(d_model) (a habit of other architectures)."""
    out = _copy(model)
    factor = math.sqrt(model.cfg.hidden_size)
    out.model.embed.register_forward_hook(lambda m, a, o: o * factor)
    return out, _act("hook_embed")


#: Name -> code bug, each with its default arguments.
CODE_BUGS = {f.__name__: f for f in (
    gelu_tanh, ln_eps_outside_sqrt, ln_no_centering, ln_final_no_affine, mlp_bias_dropped, attn_bias_dropped,
    qkv_layout, attn_scale_per_dim, rotary_interleaved, rotary_last_channels, causal_lookahead,
    pad_keys_attended, sliding_window, decode_position_off_by_one,
    residual_sequential, embed_scaled)}
