"""Attention kernels: "eager" (einsum, every stream materialised), "sdpa" and "flash" (flash.py).

Words. A *backend* is what the user chooses: `attn_backend=` / `set_attn_backend` take "auto", "eager",
"sdpa" or "flash", and `resolve_backend` turns "auto" into one of the other three for each call. A
*kernel* is the implementation that actually ran in a layer: `Attention.last_kernel`, listed per
layer by `model.attn_kernels()`: "eager", "eager (fallback)", "sdpa", or the one the flash backend
picked ("flash_attn.func", ..., "sdpa.cudnn"; see flash.py).

All kernels take q, k, v in [batch pos n_heads d_head] (k, v with the KV cache's past positions
prepended) and return z in the same layout. Masks are described once per forward by `AttnMask` (or,
for a CUDA-graph decoding step, by `StaticDecodeMask`), shared by every layer.

Rows. A query with no key at all (a left-padding position, or a row a `hook_attn_scores` hook set to
-inf everywhere) gets z = 0 on every backend, never NaN (a scores hook runs the eager kernel, on any
backend, so one guard covers them all).
A padding query that does see real keys (right padding) is computed like any other row by "eager" and
"sdpa"; the flash-attn package's unpadded kernel drops it and gives 0 there. No real position ever reads
a padding position, so outputs at real positions never depend on this.

Cost of materialising. "eager" is also what a layer runs when its scores or pattern are hooked (every
layer under `run_with_cache()`). Without autograd it computes q.k and pattern.v by blocks of query rows,
skipping the keys the causal mask hides from a block, and fixes the softmax up in place, so the only
[batch n_heads query_pos key_pos] tensors it allocates are the scores and the pattern the hooks see.
Hooks that change them (told apart by `HookPoint.fire_checked`) get the dense form from there on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from einops import einsum

from .. import axes
from ..dtypes import HALF, widen

log = logging.getLogger("neox_lab")

BACKENDS = ("auto", "eager", "sdpa", "flash")


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

    def to(self, device, non_blocking: bool = False) -> AttnMask:
        """This mask on `device` (itself when already there): a block placed on another device gets
        its own copy, made once per forward and shared by every block on that device."""
        device = torch.device(device)
        if device == self.device:
            return self
        key = ("to", device)
        if key not in self._cache:
            key_mask = None if self.key_mask is None else self.key_mask.to(device)
            self._cache[key] = AttnMask(q_len=self.q_len, k_len=self.k_len, device=device, key_mask=key_mask)
        return self._cache[key]

    @property
    def plain_causal(self) -> bool:
        """No padding and no past: the kernels' built-in (top-left) causal mask is exact."""
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
    def forbidden(self) -> torch.Tensor:
        """~allowed: where the scores are -inf."""
        return ~self.allowed

    @cached_property
    def dead(self) -> torch.Tensor | None:
        """bool [batch 1 query_pos 1]: queries with no key at all (left-padding positions), or None."""
        if self.key_mask is None:
            return None
        dead = ~self.allowed.any(-1, keepdim=True)
        return dead if bool(dead.any()) else None

    @cached_property
    def leftpad(self) -> torch.Tensor | None:
        """int32 [batch]: padding keys before each row's first real key, when the padding is all on the
        left (what generation produces); None when there is no padding or it is anywhere else."""
        if self.key_mask is None:
            return None
        n_pad = (~self.key_mask).sum(-1)
        cols = torch.arange(self.k_len, device=self.key_mask.device)
        pure_left = bool(((cols[None, :] >= n_pad[:, None]) == self.key_mask).all())
        return n_pad.to(torch.int32) if pure_left else None

    @cached_property
    def unpadded(self) -> tuple:
        """Gather indices for unpadded ("varlen") kernels: (q_idx, k_idx, cu_q, cu_k, max_q, max_k).

        q_idx / k_idx index the flattened [batch*query_pos] / [batch*key_pos] rows of real tokens; each
        query row is the last q_len of its key row. Built once per forward, shared by all layers.
        """
        key_mask = self.key_mask
        q_mask = key_mask[:, -self.q_len:]
        k_lens = key_mask.sum(-1, dtype=torch.int32)
        q_lens = q_mask.sum(-1, dtype=torch.int32)
        return (
            q_mask.flatten().nonzero().squeeze(-1),
            key_mask.flatten().nonzero().squeeze(-1),
            F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0)),
            F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0)),
            int(q_lens.max()),
            int(k_lens.max()),
        )


class StaticDecodeMask:
    """The mask of a one-token decoding step over a preallocated cache of `k_len` slots.

    Made only of tensors whose storage never moves (the step updates them in place), and nothing here
    reads a value back to the host, so a step using it can be captured in a CUDA graph and replayed.
    Slots not yet written have key_mask False; every row's new token is real, so no row is dead.

    key_mask: bool [batch key_pos]; cache_seqlens: int32 [batch], the slots written so far including
    this step's (padding included); leftpad: int32 [batch] left-padding slots, or None;
    flash_kvcache: run flash-attn's `flash_attn_with_kvcache` on the whole cache (else a masked kernel).
    """

    q_len = 1
    plain_causal = False
    dead = None

    def __init__(self, key_mask: torch.Tensor, cache_seqlens: torch.Tensor, leftpad: torch.Tensor | None,
                 flash_kvcache: bool):
        self.key_mask = key_mask
        self.k_len = key_mask.shape[1]
        self.device = key_mask.device
        self.allowed = key_mask[:, None, None, :]
        self.cache_seqlens = cache_seqlens
        self.leftpad = leftpad
        self.flash_kvcache = flash_kvcache

    @property
    def forbidden(self) -> torch.Tensor:
        """~allowed, recomputed per call: the step edits key_mask in place."""
        return ~self.allowed


def attention_scores(q, k, mask, scale) -> torch.Tensor:
    """Scores [batch n_heads query_pos key_pos]: (q * scale) . k, -inf where the mask forbids."""
    # Scaling q before the product keeps fp16 scores in range (NeoX-20B's known QK overflow): the
    # unscaled q.k can pass 65504 where q.k / sqrt(d_head) is far below it.
    scores = einsum(q * scale, k, axes.SCORES)
    # In place: the product is a fresh tensor, and every [batch n_heads query_pos key_pos] copy is new
    # memory the CPU page-faults in (what dominated caching the pattern of every layer).
    return scores.masked_fill_(mask.forbidden, float("-inf"))


def emptied_rows(scores: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """`dead` plus the query rows a scores hook masked entirely ([batch n_heads query_pos 1])."""
    # A hook that masks every key of a row (a common knockout) leaves it no softmax: it attends to
    # nothing, as a padding row does, instead of turning every later logit into NaN.
    emptied = torch.isneginf(scores).all(-1, keepdim=True)
    return emptied if dead is None else dead | emptied


def attention_pattern(scores: torch.Tensor, dead: torch.Tensor | None, dtype: torch.dtype,
                      head_mask=None) -> torch.Tensor:
    """softmax(scores) in fp32 (at least), cast to `dtype`; `dead` rows attend to nothing (all zero);
    each head scaled by `head_mask` as transformers does."""
    if not (torch.is_grad_enabled() and scores.requires_grad):
        # No graph to keep: fix the softmax's own output up in place. A dead row's softmax is NaN,
        # overwritten; every other row is computed exactly as below. One new [batch n_heads query_pos
        # key_pos] tensor instead of up to three.
        pattern = torch.softmax(scores, -1, dtype=widen(scores[..., :0]).dtype)
        if dead is not None:
            pattern.masked_fill_(dead, 0.0)
        pattern = pattern.to(dtype)
        if head_mask is not None:
            pattern.mul_(head_mask[None, :, None, None].to(pattern.dtype))
        return pattern
    scores32 = widen(scores)
    if dead is not None:
        # A row with every key masked has no softmax; give it zero attention instead of NaN.
        scores32 = scores32.masked_fill(dead, 0.0)
    pattern = scores32.softmax(-1)
    if dead is not None:
        pattern = pattern.masked_fill(dead, 0.0)
    pattern = pattern.to(dtype)
    if head_mask is not None:
        pattern = pattern * head_mask[None, :, None, None].to(pattern.dtype)
    return pattern


#: Query rows per block of the eager kernel's no-grad form, at least: smaller blocks skip more of the
#: causally masked keys, larger ones keep each matmul efficient.
MIN_BLOCK_ROWS = 64


def causal_blocks(q_len: int, k_len: int) -> list[tuple[int, int, int]]:
    """(first row, end row, keys) of each block of query rows: a row block sees no key past `keys` (the
    causal mask, aligned bottom-right), so everything right of it is -inf / zero attention."""
    rows = max(MIN_BLOCK_ROWS, -(-q_len // 16))
    offset = k_len - q_len
    return [(r0, min(r0 + rows, q_len), min(k_len, offset + min(r0 + rows, q_len)))
            for r0 in range(0, q_len, rows)]


class _Blockwise:
    """The eager kernel's two products without autograd, by blocks of query rows: a block's scores and
    its pattern . v read only the keys the causal mask lets it see (about half the work on a prefill),
    writing into the full tensors hooks see, whose part right of each block is -inf. Same values as the
    dense products to rounding (the skipped terms are exact zeros of the pattern)."""

    def __init__(self, q, k, mask, scale):
        self.batch, self.q_len, self.n_heads, d_head = q.shape
        self.k_len = k.shape[1]
        self.blocks = causal_blocks(self.q_len, self.k_len)
        self.mask = mask
        flat = self.batch * self.n_heads
        # Scaled before the product, as attention_scores does (the fp16 range).
        self.q = (q * scale).transpose(1, 2).reshape(flat, self.q_len, d_head)
        self.kt = k.permute(0, 2, 3, 1).reshape(flat, d_head, self.k_len)

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.batch * self.n_heads, *t.shape[2:])

    def scores(self) -> torch.Tensor:
        """attention_scores(q, k, mask, scale), block by block."""
        scores = self.q.new_empty(self.batch, self.n_heads, self.q_len, self.k_len)
        flat, offset = self._flat(scores), self.k_len - self.q_len
        plain = getattr(self.mask, "key_mask", True) is None  # causal only: masked entries are near the diagonal
        for r0, r1, keys in self.blocks:
            torch.bmm(self.q[:, r0:r1], self.kt[:, :, :keys], out=flat[:, r0:r1, :keys])
            if plain:
                # Row r sees keys up to offset + r: only the square right of offset + r0 has masked entries.
                square = torch.ones(r1 - r0, keys - offset - r0, dtype=torch.bool, device=scores.device)
                scores[:, :, r0:r1, offset + r0:keys].masked_fill_(square.triu(1), float("-inf"))
            else:
                scores[:, :, r0:r1, :keys].masked_fill_(self.mask.forbidden[..., r0:r1, :keys], float("-inf"))
            scores[:, :, r0:r1, keys:] = float("-inf")
        return scores

    def mix(self, pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """pattern . v, z [batch pos n_heads d_head], for a pattern that is zero right of each block."""
        d_head = v.shape[-1]
        values = v.transpose(1, 2).reshape(self.batch * self.n_heads, self.k_len, d_head)
        z = v.new_empty(self.batch, self.n_heads, self.q_len, d_head)
        flat, weights = self._flat(z), self._flat(pattern)
        for r0, r1, keys in self.blocks:
            torch.bmm(weights[:, r0:r1, :keys], values[:, :keys], out=flat[:, r0:r1])
        return z.transpose(1, 2)


def eager_attention(q, k, v, mask: AttnMask, *, scale, head_mask=None, dropout_p=0.0,
                    hook_scores=None, hook_pattern=None):
    """Reference attention: scores and pattern materialised, softmax in fp32, -inf masking.

    Returns (z [batch pos n_heads d_head], pattern [batch n_heads query_pos key_pos]).

    Without autograd (and dropout) the two products run by causal blocks (`_Blockwise`), as far as the
    hooks allow: pattern . v skips the keys right of each block only while neither hook changed its
    stream (`HookPoint.fire_checked`; a changed score or pattern may sit there). Hooks that only read
    (run_with_cache) keep it to the end.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    blockwise = None if needs_grad or dropout_p else _Blockwise(q, k, mask, scale)
    scores = attention_scores(q, k, mask, scale) if blockwise is None else blockwise.scores()
    dead, untouched = mask.dead, True
    if hook_scores is not None:
        scores, untouched = hook_scores.fire_checked(scores)
        if not untouched:  # a hook that only read cannot have emptied a row
            dead = emptied_rows(scores, dead)
    pattern = attention_pattern(scores, dead, q.dtype, head_mask)
    if hook_pattern is not None:
        pattern, pattern_untouched = hook_pattern.fire_checked(pattern)
        untouched = untouched and pattern_untouched
    if dropout_p:
        pattern = F.dropout(pattern, p=dropout_p, training=True)
    if blockwise is not None and untouched:
        return blockwise.mix(pattern, v), pattern
    return einsum(pattern, v, axes.MIX_VALUES), pattern


def finish(z: torch.Tensor, mask, head_mask) -> torch.Tensor:
    """z [batch pos n_heads d_head] with dead rows zeroed and head_mask applied as eager does.

    Scaling a head's pattern by m scales its z by m, so head_mask works without materialising it.
    """
    if mask.dead is not None:
        z = z.masked_fill(mask.dead.transpose(1, 2), 0.0)
    if head_mask is not None:
        z = z * head_mask[None, None, :, None].to(z.dtype)
    return z


def sdpa_mask(mask) -> torch.Tensor | None:
    """The boolean attn_mask for torch's SDPA, None when `is_causal` (or nothing) says it all."""
    if mask.plain_causal or (mask.q_len == 1 and mask.key_mask is None):
        return None  # plain causal, or one query seeing every key
    allowed = mask.allowed
    # Dead rows would give NaN in some kernels: let them see everything, then zero them in finish().
    return allowed | mask.dead if mask.dead is not None else allowed


def sdpa_attention(q, k, v, mask: AttnMask, *, scale, head_mask=None, dropout_p=0.0):
    """torch's scaled_dot_product_attention (any device and dtype)."""
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=sdpa_mask(mask),
        is_causal=mask.plain_causal, dropout_p=dropout_p, scale=scale,
    )
    return finish(z.transpose(1, 2), mask, head_mask)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention will run in: x's, or the autocast dtype when CUDA autocast is on."""
    if x.is_cuda:
        try:
            if torch.is_autocast_enabled("cuda"):
                return torch.get_autocast_dtype("cuda")
        except TypeError:  # torch < 2.4 has only the device-less spelling
            if torch.is_autocast_enabled():
                return torch.get_autocast_gpu_dtype()
    return x.dtype


def resolve_backend(name: str, x: torch.Tensor) -> str:
    """Map "auto" to a concrete backend for this input: flash on CUDA half precision, else sdpa (the
    same function as eager to rounding, and what transformers runs by default; a layer whose scores or
    pattern are hooked or asked for runs eager for that call). "eager" stays the named reference.

    "flash" where it cannot run (CPU, fp32/fp64) raises ValueError before any layer runs.
    """
    if name not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {name!r}")
    runs_flash = x.is_cuda and compute_dtype(x) in HALF
    if name == "auto":
        return "flash" if runs_flash else "sdpa"
    if name == "flash" and not runs_flash:
        raise ValueError(
            f"attn_backend 'flash' needs CUDA tensors in float16/bfloat16, got {compute_dtype(x)} on "
            f"{x.device}; use 'eager' or 'sdpa' (or 'auto', which picks flash only where it can run)"
        )
    return name


__all__ = ["BACKENDS", "AttnMask", "StaticDecodeMask", "attention_pattern", "attention_scores", "eager_attention",
           "emptied_rows", "finish",
           "resolve_backend", "sdpa_attention", "sdpa_mask"]
