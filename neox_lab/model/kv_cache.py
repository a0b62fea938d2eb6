"""Key/value cache for incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values (after rotary) in [batch key_pos n_heads d_head].

    With `max_length`, storage is written in place and grown in chunks up to `max_length` (capacity
    doubles, from at least `MIN_CAPACITY` positions), so a decoding step rarely reallocates and a
    generous `max_length` costs nothing until it is used; otherwise each step concatenates. Slots not
    yet written hold zeros, not garbage: a kernel that reads the whole buffer under a mask multiplies
    them by 0, and 0 * NaN is NaN. `preallocated` allocates the full length at once (fixed addresses).
    """

    MIN_CAPACITY = 256

    def __init__(self, n_layers: int, max_length: int | None = None):
        self.n_layers = n_layers
        self.max_length = max_length
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers

    def __len__(self) -> int:
        return self.n_layers

    @property
    def length(self) -> int:
        """Positions already cached (what the next call's positions start after)."""
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's k, v for `layer`; return all keys and values so far."""
        start, new = self.lengths[layer], k.shape[1]
        if self.max_length is None:
            if self.keys[layer] is not None:
                k = torch.cat((self.keys[layer], k), dim=1)
                v = torch.cat((self.values[layer], v), dim=1)
            self.keys[layer], self.values[layer] = k, v
            self.lengths[layer] = k.shape[1]
            return k, v
        if start + new > self.max_length:
            raise ValueError(f"KVCache: {start + new} positions exceed max_length={self.max_length}")
        held = self.keys[layer]
        if held is None or start + new > held.shape[1]:
            size = 0 if held is None else held.shape[1]
            capacity = min(self.max_length, max(start + new, 2 * size, self.MIN_CAPACITY))
            shape = (k.shape[0], capacity, *k.shape[2:])
            keys, values = k.new_zeros(shape), v.new_zeros(shape)
            if held is not None:  # new tensors, so a snapshot's references keep the old contents
                keys[:, :start], values[:, :start] = held[:, :start], self.values[layer][:, :start]
            self.keys[layer], self.values[layer] = keys, values
        self.keys[layer][:, start : start + new] = k
        self.values[layer][:, start : start + new] = v
        self.lengths[layer] = start + new
        return self.keys[layer][:, : start + new], self.values[layer][:, : start + new]

    @classmethod
    def preallocated(cls, n_layers: int, batch: int, max_length: int, n_heads: int, d_head: int, *,
                     dtype: torch.dtype, device) -> KVCache:
        """A cache whose zeroed [batch max_length n_heads d_head] buffers exist before the first update,
        so their addresses are known in advance (what a captured CUDA graph needs)."""
        cache = cls(n_layers, max_length)
        shape = (batch, max_length, n_heads, d_head)
        cache.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        cache.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        return cache

    def snapshot(self) -> tuple:
        """What `restore` needs to undo the updates that follow. Cheap: tensors are referenced, not
        copied, since a growing cache replaces them and a preallocated one writes only past `lengths`."""
        return list(self.keys), list(self.values), list(self.lengths)

    def restore(self, snapshot: tuple) -> None:
        """Forget every update made since `snapshot()` was taken."""
        keys, values, lengths = snapshot
        self.keys, self.values, self.lengths = list(keys), list(values), list(lengths)

    def set_length(self, length: int) -> None:
        """Declare the first `length` slots of every layer written: a captured decoding step writes
        them in place, without `update`, and the host side keeps count."""
        self.lengths = [length] * self.n_layers

    def reset(self) -> None:
        """Forget every position but keep preallocated buffers (stale slots are masked, never read)."""
        self.lengths = [0] * self.n_layers
        if self.max_length is None:
            self.keys = [None] * self.n_layers
            self.values = [None] * self.n_layers

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache holding only the given batch rows."""
        out = KVCache(self.n_layers, self.max_length)
        out.keys = [None if t is None else t[rows] for t in self.keys]
        out.values = [None if t is None else t[rows] for t in self.values]
        out.lengths = list(self.lengths)
        return out
