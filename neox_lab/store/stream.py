"""`ActivationStream`: a store's activations as a shuffled, sharded `torch.utils.data.IterableDataset`.

Made by `ActivationStore.stream(...)`; yields dicts of [batch_size ...] tensors, one per hook (and the
token ids, document ids and positions with ``meta=True``), ready for ``DataLoader(stream, batch_size=None)``.

How an epoch is cut:

  chunks    the store's tokens in contiguous runs of `chunk_tokens` (never across a shard), each read
            with one `preadv` from a shard file into the stream's own memory (the page cache serves
            it; faulting pages of a mapping in instead ran at half the speed of a plain read)
  order     the chunks shuffled by a generator seeded with (seed, epoch), the same in every process
  sharding  consumer c of C (C = ranks x DataLoader workers, c = rank * workers + worker) takes chunks
            c, c + C, c + 2C, ... of that order: every token goes to exactly one consumer
  shuffle   each consumer keeps a buffer of at most `buffer_tokens` tokens: it fills it with chunks, then
            emits a random part of it (seeded with (seed, epoch, c, C)) and refills, so tokens from many
            shards mix while memory stays bounded
  balance   with ``drop_last`` (the default) every consumer emits the same number of full batches,
            the fewest any consumer can fill, so ranks stay in step; without it nothing is dropped

Everything is decided by integers (seed, epoch, rank, worker), so a run is reproducible, and a run
killed mid-epoch resumes with ``start_batch``: the number of batches the training loop had taken in
that epoch (the shuffle is replayed on token indices only, and just the buffer's tokens are re-read).
With several DataLoader workers, resuming needs ``drop_last`` (equal counts keep the workers' turns).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from .manifest import SAFETENSORS_DTYPES, CacheIntegrityError

NORMALIZE = (None, "center", "scale", "center_scale")
META_NAMES = ("token_ids", "doc_ids", "positions")


class _ShardRows:
    """Rows of a store's tensors read with `os.preadv` straight into the caller's memory: one copy, no page
    faults of a mapping. Before every read the store checks the shard's file (`check_shard`: hashed on
    first use, and again whenever its identity changed), and a descriptor opened on another file than
    the one checked is reopened, so nothing unchecked is served."""

    def __init__(self, store: Any):
        self.store, self._files = store, {}

    def _layout(self, i: int) -> tuple[int, int, dict]:
        identity = self.store.check_shard(i)
        if i in self._files and self._files[i][3] != identity:
            os.close(self._files.pop(i)[0])  # the file was replaced or rewritten since it was opened
        if i not in self._files:
            fd = os.open(self.store.dir / self.store.shards[i]["file"], os.O_RDONLY)
            if os.fstat(fd).st_ino != identity[1]:  # replaced between the check and the open
                os.close(fd)
                return self._layout(i)
            n = int.from_bytes(os.pread(fd, 8, 0), "little")
            header = json.loads(os.pread(fd, n, 8))
            self._files[i] = (fd, 8 + n, header, identity)
        return self._files[i][:3]

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Tokens [start, stop) of one stream (within one shard) into `out` [stop - start ...]."""
        i = int(np.searchsorted([s["first_token"] for s in self.store.shards], start, side="right") - 1)
        first = self.store.shards[i]["first_token"]
        if not hasattr(os, "preadv"):  # Windows: through the store's mapping
            out.copy_(self.store[name][start:stop])
            return
        fd, base, header = self._layout(i)
        entry, shard = header.get(name), self.store.shards[i]
        fits = entry is not None and SAFETENSORS_DTYPES.get(entry["dtype"]) == out.dtype and \
            entry["shape"] == [shard["n_tokens"], *out.shape[1:]] and base + entry["data_offsets"][1] <= shard["bytes"]
        if not fits:
            raise CacheIntegrityError(f"shard {shard['file']}: {name!r} is {entry and entry['dtype']} "
                                      f"{entry and entry['shape']} in its header, the store says {out.dtype} "
                                      f"[{shard['n_tokens']} {list(out.shape[1:])}]; the store is damaged")
        row = out[0].numel() * out.element_size() if len(out) else 0
        offset = base + entry["data_offsets"][0] + (start - first) * row
        view = memoryview(out.numpy() if out.dtype != torch.bfloat16 else out.view(torch.int16).numpy()).cast("B")
        done = 0
        while done < len(view):  # preadv may return short counts
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"shard {self.store.shards[i]['file']} ended early while reading {name!r}")
            done += got

    def close(self) -> None:
        for fd, *_ in self._files.values():
            os.close(fd)
        self._files.clear()


def _take(parts: list[dict[str, torch.Tensor]], n: int, names: list[str]):
    """The first `n` rows of a queue of blocks (copied into one batch), and the queue after them."""
    out, rest, need = {name: [] for name in names}, list(parts), n
    while need:
        block = rest[0]
        size = len(block[names[0]])
        take = min(size, need)
        for name in names:
            out[name].append(block[name][:take])
        rest = rest[1:] if take == size else [{name: t[take:] for name, t in block.items()}, *rest[1:]]
        need -= take
    return {name: torch.cat(pieces) for name, pieces in out.items()}, rest


def _non_negative(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{label} must be a non-negative integer, got {value!r}")


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


class ActivationStream(IterableDataset):
    """Batches of shuffled tokens of `hooks` from `store`; see the module docstring.

    batch_size: tokens per batch. buffer_tokens: the shuffle buffer's bound (larger mixes more).
    chunk_tokens: tokens read per contiguous slice (default buffer_tokens // 8). seed, epoch: fix the
    order (`set_epoch` between epochs, as with `DistributedSampler`). shuffle=False streams the chunks
    in store order (still sharded). rank/world_size: default from `torch.distributed`. normalize:
    None, "center" (x - mean), "scale" (x * sqrt(d) / E||x||) or "center_scale" (both, with the
    centred norm), from the store's `normalization_stats`; the result is float32. meta: also yield "token_ids",
    "doc_ids", "positions". start_batch: resume this epoch after that many batches of this process.
    """

    def __init__(self, store: Any, hooks: str | Sequence[str], *, batch_size: int = 4096,
                 buffer_tokens: int = 1 << 16, chunk_tokens: int | None = None, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, drop_last: bool = True, normalize: str | None = None, meta: bool = False,
                 rank: int | None = None, world_size: int | None = None, start_batch: int = 0):
        super().__init__()
        self.store = store
        self.hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        if not self.hooks:
            raise ValueError("hooks names no hook; pass one name or a list of names")
        for name in self.hooks:
            store[name]  # noqa: B018 -- raises KeyError naming the cached hooks
        chunk_tokens = chunk_tokens if chunk_tokens is not None else max(1, buffer_tokens // 8)
        for label, value in (("batch_size", batch_size), ("buffer_tokens", buffer_tokens),
                             ("chunk_tokens", chunk_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if chunk_tokens > buffer_tokens:
            raise ValueError(f"chunk_tokens={chunk_tokens} exceeds buffer_tokens={buffer_tokens}; the buffer "
                             "must hold at least one chunk")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        for label, value in (("seed", seed), ("epoch", epoch), ("start_batch", start_batch)):
            _non_negative(label, value)
        self.batch_size, self.buffer_tokens, self.chunk_tokens = batch_size, buffer_tokens, chunk_tokens
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.normalize, self.meta = normalize, meta
        # (epoch, start_batch) in shared memory: DataLoader workers, persistent ones included, read the
        # values `set_epoch` wrote in the main process when an epoch's iteration starts.
        self._position = torch.tensor([epoch, start_batch], dtype=torch.int64).share_memory_()
        self.rank, self.world_size = _world(rank, world_size)
        # Statistics are computed here, in the main process, before DataLoader workers start.
        self._norm = {name: self._normalizer(name) for name in self.hooks} if normalize else {}

    def _normalizer(self, name: str) -> tuple[torch.Tensor, float]:
        stats = self.store.normalization_stats(name)
        shape = self.store[name].shape[1:]
        mean = torch.tensor(stats["mean"], dtype=torch.float32).reshape(shape)
        centre = self.normalize in ("center", "center_scale")
        norm = stats["centered_norm"] if self.normalize == "center_scale" else stats["norm"]
        scale = math.sqrt(mean.numel()) / norm if self.normalize != "center" and norm > 0 else 1.0
        return (mean if centre else torch.zeros_like(mean)), scale

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @property
    def start_batch(self) -> int:
        return int(self._position[1])

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use the order of `epoch` next (and skip its first `start_batch` batches, to resume). Reaches
        DataLoader workers too, persistent ones included: each reads it when the epoch starts."""
        _non_negative("epoch", epoch)
        _non_negative("start_batch", start_batch)
        self._position[0], self._position[1] = epoch, start_batch

    # ------------------------------------------------------------------ the plan (integers only)
    def chunks(self) -> list[tuple[int, int]]:
        """The store's token ranges [a, b), shard by shard, in store order."""
        out = []
        for s in self.store.shards:
            first, n = s["first_token"], s["n_tokens"]
            out += [(a, min(a + self.chunk_tokens, first + n)) for a in range(first, first + n, self.chunk_tokens)]
        return out

    def consumers(self) -> tuple[int, int, int]:
        """(this consumer's index, number of consumers, DataLoader workers per rank)."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers, workers

    def _my_chunks(self, consumer: int, n_consumers: int) -> list[tuple[int, int]]:
        chunks = self.chunks()
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(chunks))
            chunks = [chunks[i] for i in order]
        return chunks[consumer::n_consumers]

    def batches_per_consumer(self, n_consumers: int | None = None) -> list[int]:
        """Batches each consumer emits this epoch (all equal with drop_last)."""
        n_consumers = n_consumers or self.consumers()[1]
        tokens = [sum(b - a for a, b in self._my_chunks(c, n_consumers)) for c in range(n_consumers)]
        if self.drop_last:
            return [min(t // self.batch_size for t in tokens)] * n_consumers
        return [-(-t // self.batch_size) for t in tokens]

    def _order(self, consumer: int, n_consumers: int) -> Iterator[tuple[np.ndarray, list, np.ndarray]]:
        """Token indices in emission order, piece by piece: (indices emitted now, chunks read just before,
        indices left in the buffer after)."""
        rng = np.random.default_rng([self.seed, self.epoch, consumer, n_consumers])
        buffer = np.empty(0, dtype=np.int64)
        fresh: list = []
        for a, b in self._my_chunks(consumer, n_consumers):
            buffer = np.concatenate([buffer, np.arange(a, b, dtype=np.int64)])
            fresh.append((a, b))
            if len(buffer) < self.buffer_tokens:
                continue
            if self.shuffle:
                buffer = buffer[rng.permutation(len(buffer))]
            # Emit all but half the bound; the kept half mixes with the next chunks.
            n_out = len(buffer) - self.buffer_tokens // 2
            yield buffer[:n_out], fresh, buffer[n_out:]
            buffer, fresh = buffer[n_out:], []
        if len(buffer) or fresh:
            if self.shuffle:
                buffer = buffer[rng.permutation(len(buffer))]
            yield buffer, fresh, buffer[:0]

    # ------------------------------------------------------------------ reading
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        _, n_consumers, workers = self.consumers()
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # A DataLoader takes batches from its workers in turn, starting with worker 0. Batch p of the
        # epoch is batch p // W of worker p % W, so to continue at batch b worker w takes over the role
        # of worker (w + b) % W, past its first (w + b) // W batches.
        consumer = self.rank * workers + (worker + self.start_batch) % workers
        skip = (worker + self.start_batch) // workers
        n_batches = self.batches_per_consumer(n_consumers)[consumer]
        if self.start_batch and workers > 1 and not self.drop_last:
            raise ValueError("resuming with several DataLoader workers needs drop_last=True (equal batch counts "
                             "keep the workers' turns fixed)")
        names = self.hooks + (list(META_NAMES) if self.meta else [])
        reader = _ShardRows(self.store)
        try:
            if self.shuffle:
                yield from self._shuffled(reader, consumer, n_consumers, names, skip, n_batches)
            else:
                yield from self._in_order(reader, consumer, n_consumers, names, skip, n_batches)
        finally:
            reader.close()

    def _shuffled(self, reader: _ShardRows, consumer: int, n_consumers: int, names: list[str], skip: int,
                  n_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        """Tokens through the bounded shuffle buffer (see the module docstring)."""
        emitted, skip_tokens = skip, skip * self.batch_size
        # The buffer: fixed slots, refilled where emitted tokens left, so each token is copied twice (into
        # its slot, out to its batch). slot_token[i] is the token index in slot i (-1: free).
        capacity = self.buffer_tokens + self.chunk_tokens
        slots: dict[str, torch.Tensor] | None = None
        slot_token = np.full(capacity, -1, dtype=np.int64)
        carry: dict[str, torch.Tensor] | None = None
        replayed = False
        for out, fresh, left in self._order(consumer, n_consumers):
            if emitted >= n_batches:
                return
            if slots is None and skip_tokens:
                if skip_tokens >= len(out):
                    skip_tokens -= len(out)  # replayed on indices only: nothing read
                    replayed = True
                    continue
                out, skip_tokens = out[skip_tokens:], 0
            if slots is None:
                slots = {name: self._empty(name, capacity) for name in names}
                if replayed:  # the buffer at the resume point, gathered once
                    held = np.concatenate([out, left])
                    slot_token[: len(held)] = held
                    for name in names:
                        slots[name][: len(held)] = self.store[name][held]
                    fresh = []
            free = np.flatnonzero(slot_token < 0)
            used = 0
            for a, b in fresh:
                where = free[used : used + b - a]
                slot_token[where] = np.arange(a, b)
                rows = torch.from_numpy(where)
                for name in names:
                    slots[name].index_copy_(0, rows, self._rows(reader, name, a, b))
                used += b - a
            order = np.argsort(slot_token, kind="stable")
            rows_out = order[np.searchsorted(slot_token, out, sorter=order)]
            # Free every slot but the buffer's: the emitted tokens, and any skipped when resuming.
            slot_token[~np.isin(slot_token, left)] = -1
            n_carry = 0 if carry is None else len(carry[names[0]])
            n_full = min((n_carry + len(out)) // self.batch_size, n_batches - emitted)
            joined = {}
            for name in names:
                t = self._empty(name, n_carry + len(out))
                if n_carry:
                    t[:n_carry] = carry[name]
                torch.index_select(slots[name], 0, torch.from_numpy(rows_out), out=t[n_carry:])
                joined[name] = t
            for j in range(n_full):
                yield self._finish({name: t[j * self.batch_size : (j + 1) * self.batch_size]
                                    for name, t in joined.items()})
            emitted += n_full
            carry = {name: t[n_full * self.batch_size :].clone() for name, t in joined.items()}
        if carry is not None and len(carry[names[0]]) and emitted < n_batches:
            yield self._finish(carry)

    def _in_order(self, reader: _ShardRows, consumer: int, n_consumers: int, names: list[str], skip: int,
                  n_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        """Without shuffling the buffer would hand tokens on in chunk order: copy them straight from the
        shard files into each batch instead (one copy per token, the same batches)."""
        emitted, skip_tokens = skip, skip * self.batch_size
        parts: list[dict[str, torch.Tensor]] = []
        pending = 0
        for a, b in self._my_chunks(consumer, n_consumers):
            if emitted >= n_batches:
                return
            if skip_tokens >= b - a:
                skip_tokens -= b - a
                continue
            a, skip_tokens = a + skip_tokens, 0
            parts.append({name: self._rows(reader, name, a, b) for name in names})
            pending += b - a
            while pending >= self.batch_size and emitted < n_batches:
                batch, parts = _take(parts, self.batch_size, names)
                pending -= self.batch_size
                emitted += 1
                yield self._finish(batch)
        if pending and emitted < n_batches:
            yield self._finish(_take(parts, pending, names)[0])

    def _rows(self, reader: _ShardRows, name: str, a: int, b: int) -> torch.Tensor:
        """Tokens [a, b) of one stream (a chunk never crosses a shard), read with one copy."""
        out = self._empty(name, b - a)
        reader.read(name, a, b, out)
        return out

    def _empty(self, name: str, n: int) -> torch.Tensor:
        view = self.store[name]
        return torch.empty((n, *view.shape[1:]), dtype=view.dtype)

    def num_batches(self, num_workers: int = 0) -> int:
        """Batches this process yields in this epoch through a DataLoader with `num_workers` workers."""
        workers = max(num_workers, 1)
        counts = self.batches_per_consumer(self.world_size * workers)
        return sum(counts[self.rank * workers : (self.rank + 1) * workers])

    def _finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, (mean, scale) in self._norm.items():
            batch[name] = (batch[name].float() - mean) * scale
        return batch
