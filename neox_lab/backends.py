"""Attention kernels: "eager" (einsum, every stream materialised), "sdpa" and "flash".

All kernels take q, k, v in [batch pos n_heads d_head] (k, v with the KV cache's past positions
prepended) and return z in the same layout. Masks are described once by `AttnMask`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from einops import einsum

from . import axes

log = logging.getLogger("neox_lab")

BACKENDS = ("auto", "eager", "sdpa", "flash")
HALF = (torch.float16, torch.bfloat16)

try:  # the flash-attn package is optional (the `flash` extra)
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore

    HAVE_FLASH_ATTN = True
except Exception:  # noqa: BLE001 - any import failure (missing CUDA libs too) means "not available"
    flash_attn_func = flash_attn_varlen_func = None
    HAVE_FLASH_ATTN = False


@dataclass
class AttnMask:
    """Which keys each query may attend to, for one forward call.

    key_mask: bool [batch key_pos], True for real tokens (None: no padding). Queries are the last
    `q_len` of the `k_len` key positions, so causality is aligned bottom-right.
    """

    q_len: int
    k_len: int
    device: torch.device
    key_mask: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def plain_causal(self) -> bool:
        """No padding and no past: the kernels' built-in causal mask is exact."""
        return self.key_mask is None and self.q_len == self.k_len

    @cached_property
    def allowed(self) -> torch.Tensor:
        """bool [batch|1, 1, query_pos, key_pos], True where attention is allowed."""
        q_pos = torch.arange(self.k_len - self.q_len, self.k_len, device=self.device)
        k_pos = torch.arange(self.k_len, device=self.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
        if self.key_mask is not None:
            allowed = allowed & self.key_mask[:, None, None, :]
        return allowed

    @cached_property
    def dead(self) -> torch.Tensor | None:
        """bool [batch 1 query_pos 1]: queries with no key at all (left-padding positions), or None."""
        if self.key_mask is None:
            return None
        dead = ~self.allowed.any(-1, keepdim=True)
        return dead if bool(dead.any()) else None


def eager_attention(q, k, v, mask: AttnMask, *, scale, head_mask=None, dropout_p=0.0,
                    hook_scores=None, hook_pattern=None):
    """Reference attention: scores and pattern materialised, softmax in fp32, -inf masking.

    Returns (z [batch pos n_heads d_head], pattern [batch n_heads query_pos key_pos]).
    """
    # Scaling q before the product keeps fp16 scores in range (NeoX-20B's known QK overflow).
    scores = einsum(q * scale, k, axes.SCORES)
    scores = scores.masked_fill(~mask.allowed, float("-inf"))
    if hook_scores is not None:
        scores = hook_scores(scores)
    scores32 = scores.float() if scores.dtype in HALF else scores
    dead = mask.dead
    if dead is not None:
        # A row with every key masked has no softmax; give it zero attention instead of NaN.
        scores32 = scores32.masked_fill(dead, 0.0)
    pattern = scores32.softmax(-1)
    if dead is not None:
        pattern = pattern.masked_fill(dead, 0.0)
    pattern = pattern.to(q.dtype)
    if head_mask is not None:
        pattern = pattern * head_mask[None, :, None, None].to(pattern.dtype)
    if hook_pattern is not None:
        pattern = hook_pattern(pattern)
    if dropout_p:
        pattern = F.dropout(pattern, p=dropout_p, training=True)
    z = einsum(pattern, v, axes.MIX_VALUES)
    return z, pattern


def _finish(z: torch.Tensor, mask: AttnMask, head_mask) -> torch.Tensor:
    """Back to [batch pos n_heads d_head]; dead rows zeroed and head_mask applied as eager does.

    Scaling a head's pattern by m scales its z by m, so head_mask works without materialising it.
    """
    z = z.transpose(1, 2)
    if mask.dead is not None:
        z = z.masked_fill(mask.dead.transpose(1, 2), 0.0)
    if head_mask is not None:
        z = z * head_mask[None, None, :, None].to(z.dtype)
    return z


def _sdpa_mask(mask: AttnMask) -> torch.Tensor | None:
    if mask.plain_causal:
        return None
    allowed = mask.allowed
    # Dead rows would give NaN in some kernels: let them see everything, then zero them in _finish.
    return allowed | mask.dead if mask.dead is not None else allowed


def sdpa_attention(q, k, v, mask: AttnMask, *, scale, head_mask=None, dropout_p=0.0):
    """torch's scaled_dot_product_attention (any device and dtype)."""
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=_sdpa_mask(mask),
        is_causal=mask.plain_causal, dropout_p=dropout_p, scale=scale,
    )
    return _finish(z, mask, head_mask)


class FlashKernel:
    """FlashAttention-2: the flash-attn package when importable, else torch's fused CUDA kernels.

    `last` names the kernel that actually ran on the latest call (e.g. "flash_attn.varlen",
    "sdpa.cudnn"); torch's choice is probed once per kind of call and remembered.
    """

    def __init__(self) -> None:
        self.last: str | None = None
        self._choice: dict = {}

    def __call__(self, q, k, v, mask: AttnMask, *, scale, head_mask=None, dropout_p=0.0):
        if not q.is_cuda or q.dtype not in HALF:
            raise ValueError(
                f"attn_backend 'flash' needs CUDA tensors in float16/bfloat16, got {q.dtype} on {q.device}; "
                "use 'eager' or 'sdpa' (or 'auto', which picks flash only where it can run)"
            )
        if HAVE_FLASH_ATTN:
            z = self._flash_attn(q, k, v, mask, scale, dropout_p)
            if mask.dead is not None:
                z = z.masked_fill(mask.dead.transpose(1, 2), 0.0)
            if head_mask is not None:
                z = z * head_mask[None, None, :, None].to(z.dtype)
            return z
        return self._torch_fused(q, k, v, mask, scale, head_mask, dropout_p)

    def _flash_attn(self, q, k, v, mask: AttnMask, scale, dropout_p):
        if mask.key_mask is None:
            self.last = "flash_attn.func"
            # flash-attn aligns the causal mask bottom-right when q_len < k_len, as decoding needs.
            return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=True)
        self.last = "flash_attn.varlen"
        b, q_len, h, d = q.shape
        key_mask = mask.key_mask
        q_mask = key_mask[:, -q_len:]
        k_idx = key_mask.flatten().nonzero().squeeze(-1)
        q_idx = q_mask.flatten().nonzero().squeeze(-1)
        k_lens = key_mask.sum(-1, dtype=torch.int32)
        q_lens = q_mask.sum(-1, dtype=torch.int32)
        cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0))
        out = flash_attn_varlen_func(
            q.reshape(b * q_len, h, d)[q_idx], k.reshape(-1, h, d)[k_idx], v.reshape(-1, h, d)[k_idx],
            cu_q, cu_k, int(q_lens.max()), int(k_lens.max()), dropout_p=dropout_p, softmax_scale=scale,
            causal=True,
        )
        z = q.new_zeros(b * q_len, h, d)
        z[q_idx] = out
        return z.view(b, q_len, h, d)

    def _torch_fused(self, q, k, v, mask: AttnMask, scale, head_mask, dropout_p):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        masked = not mask.plain_causal and not (mask.q_len == 1 and mask.key_mask is None)
        attn_mask = _sdpa_mask(mask) if masked else None
        is_causal = mask.plain_causal
        key = (q.dtype, q.shape[-1], masked)
        order = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]
        if masked:  # torch's flash kernel takes no mask; the memory-efficient one does
            order.append(("efficient", SDPBackend.EFFICIENT_ATTENTION))
        if key in self._choice:
            order = [o for o in order if o[0] == self._choice[key]]
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        errors = []
        for name, backend in order:
            try:
                with sdpa_kernel([backend]):
                    z = F.scaled_dot_product_attention(*args, attn_mask=attn_mask, is_causal=is_causal,
                                                       dropout_p=dropout_p, scale=scale)
            except RuntimeError as err:
                errors.append(f"{name}: {err}")
                continue
            if key not in self._choice:
                self._choice[key] = name
                log.info("neox_lab flash backend: torch sdpa %s kernel for %s", name, key)
            self.last = f"sdpa.{name}"
            return _finish(z, mask, head_mask)
        raise RuntimeError("no fused attention kernel accepted this call: " + "; ".join(errors))


def resolve_backend(name: str, x: torch.Tensor) -> str:
    """Map "auto" to a concrete backend for this input: flash on CUDA half precision, else eager."""
    if name not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "flash" if x.is_cuda and x.dtype in HALF else "eager"
    return name
