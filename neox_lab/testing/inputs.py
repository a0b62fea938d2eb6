"""The inputs `compare` runs: the user's batch (or random ids), and the two extra batches that expose
the common input-dependent bugs, cheaply:

- a left-padded batch with its mask (three rows, padded by 1/4, 2/4 and 3/4 of their length): a model
  that attends to pad keys fails on it;
- a long one-row probe through every layer (default 512 positions, capped by max_position_embeddings
  and by a memory budget): rotary differences grow with the position, and a bug that starts beyond
  some length (a sliding window) shows only there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..config import NeoXConfig

#: Default random batch (the CLI's --batch / --seq-len).
DEFAULT_BATCH, DEFAULT_SEQ_LEN = 4, 32
#: Length of the long probe (capped, see `probe_length`).
PROBE_LEN = 512
#: What the probe may hold per side: its cached streams and the eager attention's scores.
PROBE_BUDGET_BYTES = 512 * 2**20
PADDED_ROWS = 3


@dataclass
class Batch:
    """One set of inputs and what it is for ("main", "left-padded", "probe")."""

    label: str
    ids: torch.Tensor  # [batch pos]
    mask: torch.Tensor | None  # [batch pos], None: no padding

    @property
    def real(self) -> torch.Tensor:
        return torch.ones_like(self.ids, dtype=torch.bool) if self.mask is None else self.mask.bool()

    def describe(self) -> str:
        return {"main": "the main batch", "left-padded": "the left-padded batch",
                "probe": "the long probe"}.get(self.label, self.label)


def as_inputs(inputs, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids [batch pos], mask or None) from token ids, a TokenBatch or a tokenizer-style mapping."""
    mask = None
    if isinstance(inputs, torch.Tensor):
        ids = inputs
    elif isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError(f"inputs mapping needs an 'input_ids' key, has {sorted(inputs)}")
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    elif hasattr(inputs, "input_ids"):
        ids, mask = inputs.input_ids, getattr(inputs, "attention_mask", None)
    else:
        raise TypeError(f"inputs must be token ids [batch pos], a TokenBatch or a mapping with input_ids; got "
                        f"{type(inputs).__name__}")
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be integer token ids [batch pos], got {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"input_ids must hold at least one token, got shape {tuple(ids.shape)}")
    if attention_mask is not None:
        mask = attention_mask
    if mask is not None:
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask must match input_ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
        if not bool(mask.bool().any(-1).all()):
            raise ValueError("every row of attention_mask needs at least one real (1) token")
        if bool(mask.bool().all()):
            mask = None  # no padding: both libraries then take their plain causal path
    return ids, mask


def random_ids(cfg: NeoXConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(cfg: NeoXConfig, length: int, seed: int) -> Batch:
    """PADDED_ROWS random rows of `length` tokens; row r starts with (r + 1) * length // (PADDED_ROWS + 1) pad
    tokens (the pad id, or 0), so the rows hold different numbers of real tokens, each at least one (an
    unpadded row would repeat what the main batch checks)."""
    length = max(length, PADDED_ROWS + 1)
    ids = random_ids(cfg, PADDED_ROWS, length, seed + 1)
    mask = torch.ones_like(ids)
    for row in range(PADDED_ROWS):
        mask[row, : (row + 1) * length // (PADDED_ROWS + 1)] = 0
    pad = cfg.pad_token_id if cfg.pad_token_id is not None and cfg.pad_token_id < cfg.vocab_size else 0
    return Batch("left-padded", ids.masked_fill(mask == 0, pad), mask)


def probe_length(cfg: NeoXConfig, wanted: int | None, n_streams: int, itemsize: int = 8) -> int:
    """The probe's length: `wanted`, at most max_position_embeddings, and small enough that one side's
    cached streams (n_streams per layer, d_model wide) and eager scores fit PROBE_BUDGET_BYTES."""
    if not wanted:
        return 0
    length = min(wanted, cfg.max_position_embeddings)
    per_token = cfg.num_hidden_layers * n_streams * cfg.hidden_size * itemsize
    # scores, pattern and their fp32 copy: three [n_heads L L] tensors alive at once in the eager kernel
    per_square = 3 * cfg.num_attention_heads * itemsize
    fits = (-per_token + math.sqrt(per_token**2 + 4 * per_square * PROBE_BUDGET_BYTES)) / (2 * per_square)
    return max(1, min(length, int(fits)))
