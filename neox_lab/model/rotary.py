"""Rotary position embeddings with transformers' GPT-NeoX semantics (rotate-half, partial, scaled)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import NeoXConfig


def inverse_frequencies(cfg: NeoXConfig, seq_len: int | None = None, device=None) -> torch.Tensor:
    """The fp32 frequency table, ceil(rotary_dim / 2) entries.

    `seq_len` only matters for dynamic NTK scaling: beyond max_position_embeddings the base grows to
    base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2)), as transformers does.
    """
    dim = cfg.rotary_dim
    base = float(cfg.rotary_emb_base)
    scaling = cfg.rope_scaling
    if scaling is not None and scaling["type"] == "dynamic" and seq_len is not None:
        if seq_len > cfg.max_position_embeddings:
            # In fp32 tensor arithmetic, as transformers computes it, so the grown base rounds the same way.
            factor = float(scaling["factor"])
            seq = torch.tensor(seq_len, dtype=torch.float32)
            base = base * ((factor * seq / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    if dim == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is not None and scaling["type"] == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary(nn.Module):
    """Computes cos/sin tables for given positions and rotates q or k in [batch pos n_heads d_head].

    Dynamic scaling is stateless here: each call uses frequencies for its own max(position_ids) + 1.
    transformers keeps the largest table seen until a call shorter than max_position_embeddings
    resets it; the two agree on every fresh forward and on step-by-step decoding.
    """

    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.cfg = cfg
        self.channels = cfg.rotary_channels
        self.register_buffer("inv_freq", inverse_frequencies(cfg), persistent=False)

    def _apply(self, fn, recurse=True):
        # `model.half()` / `.to(torch.bfloat16)` would round the frequency table too: in bf16 that puts
        # rotary angles off by radians at position 2048. Whatever the model's dtype, keep it fp32.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = inverse_frequencies(self.cfg, device=self.inv_freq.device)
        return self

    def reset_buffers(self, device=None) -> None:
        """Recompute the (non-persistent) frequency table, e.g. after building on the meta device."""
        self.inv_freq = inverse_frequencies(self.cfg, device=device)

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [batch pos 1 channels], computed in fp32 then cast to `dtype` (as 5.x)."""
        inv_freq = self.inv_freq
        if self.cfg.rope_scaling is not None and self.cfg.rope_scaling["type"] == "dynamic":
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.cfg.max_position_embeddings:
                inv_freq = inverse_frequencies(self.cfg, seq_len, device=position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)
        angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
        """Rotate the first `channels` channels of each head; the rest pass through unchanged.

        in_place: write the rotated channels back into `x` (a view of the fused QKV projection) instead of
        building a new tensor. Pythia rotates a quarter of each head, so the out-of-place form's
        concatenation copies four times the bytes the rotation touches: on an H200 that copy was 16% of a
        pythia-410m forward. Same values either way; the caller must be the only holder of `x`.
        """
        if self.channels == 0:
            return x
        rot = x[..., : self.channels]
        # Under autocast, q/k come out of the projection in half precision while the tables follow the
        # fp32 residual stream; keep x's dtype so q, k and v stay alike (the flash kernels need it).
        rotated = (rot * cos + rotate_half(rot) * sin).to(x.dtype)
        if in_place:
            rot.copy_(rotated)
            return x
        rest = x[..., self.channels :]
        return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
