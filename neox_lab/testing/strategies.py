"""Hypothesis strategies for NeoX configs and inputs, and seeded (transformers, neox_lab) model pairs.

Nothing here downloads: pairs are built from random weights, saved with transformers'
`save_pretrained` and loaded back with neox_lab, which exercises the real loading path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from ..config import NeoXConfig

# Pair building lives in `pairs` (no hypothesis needed there); re-exported for existing imports.
from .pairs import HF_CLASSES, TRAINED_LIKE_STD, build_pair, hf_config, tiny_config  # noqa: F401

ACTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu")


@st.composite
def rotary_pcts(draw, head_dim: int) -> float:
    """The common fractions, plus values whose int(head_dim * pct) is odd (transformers 5.x then
    rotates one channel more than rotary_dim)."""
    common = st.sampled_from([0.0, 0.25, 0.5, 1.0])
    odd = [r for r in range(1, head_dim, 2) if 2 * ((r + 1) // 2) <= head_dim]
    choices = [common]
    if odd:
        choices.append(st.sampled_from(odd).map(lambda r: (r + 0.5) / head_dim))
    return draw(st.one_of(*choices))


@st.composite
def neox_configs(draw, *, max_layers: int = 3, max_heads: int = 4, head_dims=(8, 32), vocab=(16, 128),
                 max_position_embeddings=(8, 64), scaling: bool = True, dropout: bool = False) -> NeoXConfig:
    """Small random NeoX configs covering every structural option neox_lab supports."""
    heads = draw(st.integers(1, max_heads))
    head_dim = 2 * draw(st.integers(head_dims[0] // 2, head_dims[1] // 2))
    pct = draw(rotary_pcts(head_dim))
    rotary_dim = int(head_dim * pct)
    kinds = [None, "linear"] + (["dynamic"] if rotary_dim > 2 else [])
    kind = draw(st.sampled_from(kinds)) if scaling else None
    rope_scaling = None if kind is None else {"type": kind, "factor": draw(st.sampled_from([1.5, 2.0, 4.0]))}
    vocab_size = draw(st.integers(*vocab))
    return NeoXConfig(
        vocab_size=vocab_size,
        hidden_size=heads * head_dim,
        num_hidden_layers=draw(st.integers(1, max_layers)),
        num_attention_heads=heads,
        intermediate_size=draw(st.sampled_from([16, 32, 64, 4 * heads * head_dim])),
        hidden_act=draw(st.sampled_from(ACTS)),
        rotary_pct=pct,
        rotary_emb_base=draw(st.sampled_from([10000.0, 500.0])),
        max_position_embeddings=draw(st.integers(*max_position_embeddings)),
        use_parallel_residual=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        rope_scaling=rope_scaling,
        layer_norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        attention_dropout=draw(st.sampled_from([0.0, 0.1])) if dropout else 0.0,
        hidden_dropout=draw(st.sampled_from([0.0, 0.1])) if dropout else 0.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=draw(st.sampled_from([None, 1])),
        num_labels=draw(st.integers(1, 3)),
    )


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [batch pos]
    attention_mask: torch.Tensor  # [batch pos], 1 for real tokens
    padding: str  # "none", "left" or "right"

    @property
    def position_ids(self) -> torch.Tensor:
        """What neox_lab derives from the mask; transformers' forward needs them passed explicitly."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)


@st.composite
def token_batches(draw, cfg: NeoXConfig, *, max_batch: int = 3, max_len: int = 32,
                  padding=("none", "left", "right"), pad_id: int | None = None) -> TokenBatch:
    """Random token ids with random left or right padding; every row keeps at least one real token."""
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(1, max_len))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)
    mode = draw(st.sampled_from(padding))
    mask = torch.ones(batch, length, dtype=torch.long)
    if mode != "none":
        for row in range(batch):
            n_pad = draw(st.integers(0, length - 1))
            if mode == "left":
                mask[row, :n_pad] = 0
            else:
                mask[row, length - n_pad:] = 0
        fill = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
        ids = ids.masked_fill(mask == 0, fill)
    return TokenBatch(ids, mask, mode)


@dataclass
class ModelPair:
    """A drawn config, the seed its weights came from, and the (transformers, neox_lab) models."""

    cfg: NeoXConfig
    seed: int
    hf: object
    neox: object


@st.composite
def paired_models(draw, configs=None, *, task: str = "causal_lm", dtype=torch.float32,
                  attn_backend: str = "eager", trained_like: float | None = TRAINED_LIKE_STD) -> ModelPair:
    """A config from `configs` (default `neox_configs()`), a seed, and the seeded pair built from them,
    with trained-like weights (random biases and LayerNorms, sharp attention; `trained_like` is the
    weight std, None for transformers' fresh init), so a dropped bias or a GELU variant shows.

    Building saves and loads a checkpoint (tens of ms for tiny configs): keep `configs` small.
    """
    cfg = draw(neox_configs() if configs is None else configs)
    seed = draw(st.integers(0, 2**16))
    hf, neox = build_pair(cfg, seed, task, dtype=dtype, attn_backend=attn_backend, trained_like=trained_like)
    return ModelPair(cfg, seed, hf, neox)
