"""The one axis vocabulary of neox_lab, and the einops patterns written in it.

Every shape in docstrings, hooks and einops patterns uses these names, so a pattern documents the
shapes it moves between:

    batch     sequences in a batch
    pos       token positions of the current call (query side)
    key_pos   positions attended to (past cache + current call)
    query_pos the query side of an attention matrix
    d_model   residual stream width (hidden_size)
    n_heads   attention heads
    d_head    per-head width (hidden_size // num_attention_heads)
    d_mlp     MLP width (intermediate_size)
    d_vocab   vocabulary size
"""

from __future__ import annotations

# Shapes of the hooked streams: every HookPoint is built with one, and the hook registry lists them.
RESID = "batch pos d_model"  # the residual stream and everything written into it
LN_SCALE = "batch pos 1"  # a LayerNorm's sqrt(var + eps)
HEADS = "batch pos n_heads d_head"  # q, k, v (before and after rotary) and z
HEAD_WRITES = "batch pos n_heads d_model"  # each head's write into the residual stream
HEAD_READS = "batch pos n_heads d_model"  # each head's own copy of what it reads (TransformerLens' split inputs)
PATTERN = "batch n_heads query_pos key_pos"  # attention scores and pattern
MLP_ACTS = "batch pos d_mlp"
LOGITS = "batch pos d_vocab"  # a head's output per position (num_labels or 2 wide for classifiers and QA)

# A stream's position axis: `query_pos` in attention matrices, `pos` everywhere else.
POSITIONS = ("pos", "query_pos")


def find_axis(shape: str, names: str | tuple[str, ...]) -> int | None:
    """Index in `shape` ("batch pos n_heads d_head") of the first of `names` it has, or None."""
    dims = shape.split()
    for name in (names,) if isinstance(names, str) else names:
        if name in dims:
            return dims.index(name)
    return None


# The fused query_key_value projection of GPT-NeoX lays its output rows out per head: for each head,
# its q rows, then its k rows, then its v rows. Splitting as (qkv n_heads d_head) is the classic bug.
QKV_SPLIT = "batch pos (n_heads qkv d_head) -> qkv batch pos n_heads d_head"

SCORES = "batch query_pos n_heads d_head, batch key_pos n_heads d_head -> batch n_heads query_pos key_pos"
MIX_VALUES = "batch n_heads query_pos key_pos, batch key_pos n_heads d_head -> batch query_pos n_heads d_head"

# Per-head output projection: W_O seen as [d_model, (n_heads d_head)], as nn.Linear stores it.
MERGE_HEADS = "batch pos n_heads d_head -> batch pos (n_heads d_head)"
W_O_PER_HEAD = "d_model (n_heads d_head) -> n_heads d_head d_model"
# The fused qkv weight and bias in TransformerLens' per-head layout (W_Q: [n_heads d_model d_head]).
QKV_WEIGHT_PER_HEAD = "(n_heads qkv d_head) d_model -> qkv n_heads d_model d_head"
QKV_BIAS_PER_HEAD = "(n_heads qkv d_head) -> qkv n_heads d_head"
# A projection of per-head inputs (each head reads its own copy of the stream): q, k or v of each head.
HEAD_PROJECT = "batch pos n_heads d_model, n_heads d_model d_head -> batch pos n_heads d_head"
# One stream copied to every head (TransformerLens' `repeat_along_head_dimension`).
REPEAT_HEADS = "batch pos d_model -> batch pos n_heads d_model"
HEAD_RESULT = "batch pos n_heads d_head, n_heads d_head d_model -> batch pos n_heads d_model"
# The same with or without the batch axis (a cache after remove_batch_dim).
HEAD_RESULT_ANY = "... n_heads d_head, n_heads d_head d_model -> ... n_heads d_model"
