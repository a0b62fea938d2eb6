"""A GPT-NeoX written in plain PyTorch, as a user's port looks: its own module names, separate q/k/v
projections, no hook points, a KV cache of its own. It is the example `compare` is built to read, and
a template for your own maps:

    plain = PlainNeoX.from_neox(reference)            # the same weights, in this port's layout
    report = compare(port(plain), reference)          # port(): a Port with its hook map, weight map, step

`hook_map()` and `weight_map(cfg)` are the maps a `Port` takes (see `side_port`); `from_neox` loads the
port's weights through the weight map, so the map is checked both ways.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import NeoXConfig
from ..model.mlp import ACT_FNS
from .side_port import Port, qkv_part
from .weight_diff import named_weights


class Activation(nn.Module):
    """The config's activation as a module, so a hook map can point at its output."""

    def __init__(self, name: str):
        super().__init__()
        self.fn = ACT_FNS[name]

    def forward(self, x):
        return self.fn(x)


class PlainAttention(nn.Module):
    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads, self.d_head, self.rot = cfg.num_attention_heads, cfg.head_dim, cfg.rotary_channels
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=cfg.attention_bias) for _ in range(3))
        self.o_proj = nn.Linear(d, d, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, allowed, past=None):
        b, p, _ = x.shape
        q, k, v = (proj(x).view(b, p, self.n_heads, self.d_head) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, cos, sin, self.rot), rotate(k, cos, sin, self.rot)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=1), torch.cat((past[1], v), dim=1)
        scores = torch.einsum("bqhd,bkhd->bhqk", q * self.d_head**-0.5, k).masked_fill(~allowed, float("-inf"))
        # A query with no key (a left-pad position) attends to nothing: zeros, not NaN.
        pattern = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1).nan_to_num(0.0).to(x.dtype)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v).reshape(b, p, -1)
        return self.o_proj(z), (k, v)


class PlainMLP(nn.Module):
    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = Activation(cfg.hidden_act)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PlainLayer(nn.Module):
    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.parallel = cfg.use_parallel_residual
        self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ln_mlp = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = PlainAttention(cfg)
        self.mlp = PlainMLP(cfg)

    def forward(self, x, cos, sin, allowed, past=None):
        attn, kv = self.attn(self.ln_attn(x), cos, sin, allowed, past)
        if self.parallel:
            return x + attn + self.mlp(self.ln_mlp(x)), kv
        mid = x + attn
        return mid + self.mlp(self.ln_mlp(mid)), kv


class PlainNeoX(nn.Module):
    """GPT-NeoX in plain PyTorch: `forward(input_ids, attention_mask=None) -> logits [batch pos vocab]` and
    `step(input_ids, past) -> (logits, past)`. No rope scaling (ValueError for such a config)."""

    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        if cfg.rope_scaling is not None:
            raise ValueError("PlainNeoX implements no rope scaling; the config has rope_scaling "
                             f"{cfg.rope_scaling}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(PlainLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # ceil(rotary_dim / 2) frequencies over rotary_dim (an odd rotary_dim rotates one channel more, as
        # transformers 5.x); fp32 whatever the model's dtype (not a buffer, which .half() would round)
        self.exponents = torch.arange(0, cfg.rotary_dim, 2, dtype=torch.int64).float() / max(cfg.rotary_dim, 1)

    @classmethod
    def from_neox(cls, model) -> PlainNeoX:
        """A PlainNeoX computing what the neox_lab (or transformers) `model` computes, loaded through
        `weight_map`: each port tensor is the map's transform of the model's tensors."""
        if hasattr(model, "hook_dict"):
            model = model.hf()  # a HookedTransformer: its transformers-convention view (cfg a NeoXConfig)
        cfg = model.cfg if hasattr(model, "cfg") else NeoXConfig.from_hf(model.config.to_dict())
        plain = cls(cfg)
        source = named_weights(model)
        loaded = {}
        for name, tensor in plain.state_dict().items():
            target = _lookup(weight_map(cfg), name)
            if target is None:
                continue
            names, transform = target
            value = transform(*(source[n] for n in names)) if transform else source[names[0]]
            loaded[name] = value.to(tensor.dtype)
        plain.load_state_dict(loaded, strict=False)
        dtype = next(model.parameters()).dtype
        return plain.to(dtype).eval()

    def _cos_sin(self, positions, dtype):
        inv_freq = 1.0 / (self.cfg.rotary_emb_base ** self.exponents.to(positions.device))
        angles = positions[..., None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _run(self, input_ids, positions, allowed, past):
        x = self.embed(input_ids)
        cos, sin = self._cos_sin(positions, x.dtype)
        new = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, allowed, None if past is None else past["kv"][i])
            new.append(kv)
        return self.lm_head(self.ln_f(x)), new

    def forward(self, input_ids, attention_mask=None):
        b, p = input_ids.shape
        causal = torch.ones(p, p, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is None:
            positions = torch.arange(p, device=input_ids.device)[None].expand(b, -1)
            allowed = causal
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            allowed = causal & attention_mask.bool()[:, None, None, :]
        return self._run(input_ids, positions, allowed, None)[0]

    def step(self, input_ids, past=None):
        """Logits of `input_ids` [batch new] after the cached tokens in `past` (None: none), and the cache."""
        b, p = input_ids.shape
        start = 0 if past is None else past["length"]
        positions = torch.arange(start, start + p, device=input_ids.device)[None].expand(b, -1)
        keys = torch.arange(start + p, device=input_ids.device)
        allowed = (keys[None, :] <= positions[0][:, None])[None, None]
        logits, kv = self._run(input_ids, positions, allowed, past)
        return logits, {"length": start + p, "kv": kv}


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int) -> torch.Tensor:
    """NeoX rotary (rotate-half) on the first `rot` channels of each head."""
    if rot == 0:
        return x
    part, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    turned = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
    return torch.cat(((part * cos + turned * sin).to(x.dtype), rest), dim=-1)


def hook_map() -> dict:
    """neox_lab hook names -> PlainNeoX module paths (what a Port's `hooks` takes)."""
    return {
        "hook_embed": "embed",
        "blocks.{L}.hook_resid_pre": ("layers.{L}", "input"),
        "blocks.{L}.ln1.hook_ln_out": "layers.{L}.ln_attn",
        "blocks.{L}.attn.hook_q": "layers.{L}.attn.q_proj",  # [batch pos d_model], viewed per head
        "blocks.{L}.attn.hook_k": "layers.{L}.attn.k_proj",
        "blocks.{L}.attn.hook_v": "layers.{L}.attn.v_proj",
        "blocks.{L}.attn.hook_z": ("layers.{L}.attn.o_proj", "input"),
        "blocks.{L}.hook_attn_out": "layers.{L}.attn.o_proj",
        "blocks.{L}.ln2.hook_ln_out": "layers.{L}.ln_mlp",
        "blocks.{L}.mlp.hook_pre": "layers.{L}.mlp.fc1",
        "blocks.{L}.mlp.hook_post": "layers.{L}.mlp.act",
        "blocks.{L}.hook_mlp_out": "layers.{L}.mlp",
        "blocks.{L}.hook_resid_post": "layers.{L}",
        "ln_final.hook_ln_out": "ln_f",
    }


def weight_map(cfg: NeoXConfig) -> dict:
    """PlainNeoX tensor names -> neox_lab checkpoint names (and the transform for the fused QKV)."""
    heads = cfg.num_attention_heads
    out = {"embed.weight": "embed.weight", "ln_f.weight": "ln_final.weight", "ln_f.bias": "ln_final.bias",
           "lm_head.weight": "unembed.weight"}
    kinds = ("weight", "bias") if cfg.attention_bias else ("weight",)
    for kind in kinds:
        for part, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[f"layers.{{L}}.attn.{proj}.{kind}"] = (f"blocks.{{L}}.attn.qkv.{kind}", qkv_part(part, heads))
        out[f"layers.{{L}}.attn.o_proj.{kind}"] = f"blocks.{{L}}.attn.out.{kind}"
    for kind in ("weight", "bias"):
        out[f"layers.{{L}}.ln_attn.{kind}"] = f"blocks.{{L}}.ln1.{kind}"
        out[f"layers.{{L}}.ln_mlp.{kind}"] = f"blocks.{{L}}.ln2.{kind}"
        out[f"layers.{{L}}.mlp.fc1.{kind}"] = f"blocks.{{L}}.mlp.fc_in.{kind}"
        out[f"layers.{{L}}.mlp.fc2.{kind}"] = f"blocks.{{L}}.mlp.fc_out.{kind}"
    return out


def port(plain: PlainNeoX, **overrides) -> Port:
    """`plain` as a `Port` with its hook map, weight map, KV-cache step and config."""
    options = dict(hooks=hook_map(), weights=weight_map(plain.cfg), step=plain.step, config=plain.cfg,
                   name="PlainNeoX")
    return Port(plain, **{**options, **overrides})


def _lookup(mapping: dict, name: str):
    """(checkpoint names, transform) for port tensor `name` in a map with `{L}`, or None."""
    parts = name.split(".")
    layer = parts[1] if parts[0] == "layers" else None
    key = name if layer is None else ".".join([parts[0], "{L}", *parts[2:]])
    if key not in mapping:
        return None
    value = mapping[key]
    names, transform = (value, None) if isinstance(value, str) else value
    names = (names,) if isinstance(names, str) else names
    return tuple(n.replace("{L}", layer) if layer is not None else n for n in names), transform


__all__ = ["PlainNeoX", "hook_map", "port", "weight_map"]
