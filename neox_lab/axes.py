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

AXES = ("batch", "pos", "query_pos", "key_pos", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab")

# The fused query_key_value projection of GPT-NeoX lays its output rows out per head: for each head,
# its q rows, then its k rows, then its v rows. Splitting as (qkv n_heads d_head) is the classic bug.
QKV_SPLIT = "batch pos (n_heads qkv d_head) -> qkv batch pos n_heads d_head"

# Attention kernels want heads before positions.
HEADS_FIRST = "batch pos n_heads d_head -> batch n_heads pos d_head"
HEADS_LAST = "batch n_heads pos d_head -> batch pos n_heads d_head"

SCORES = "batch query_pos n_heads d_head, batch key_pos n_heads d_head -> batch n_heads query_pos key_pos"
MIX_VALUES = "batch n_heads query_pos key_pos, batch key_pos n_heads d_head -> batch query_pos n_heads d_head"

# Per-head output projection: W_O seen as [d_model, (n_heads d_head)], as nn.Linear stores it.
MERGE_HEADS = "batch pos n_heads d_head -> batch pos (n_heads d_head)"
W_O_PER_HEAD = "d_model (n_heads d_head) -> n_heads d_head d_model"
HEAD_RESULT = "batch pos n_heads d_head, n_heads d_head d_model -> batch pos n_heads d_model"
