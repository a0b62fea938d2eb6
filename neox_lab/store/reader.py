"""`ActivationStore`: a lazy, memory-mapped reader of a store written by `cache_dataset`.

Shards are opened on first use with `safetensors.safe_open` (which memory-maps the file) and only the
token ranges asked for are read, so a store far larger than memory can be sliced and streamed.

Nothing is served unchecked. Opening a store checks the manifest's accounting and every shard's size;
the first read of a shard hashes the whole file against the sha256 recorded when it was written and
checks its tensors' names and lengths, so a flipped byte or two swapped shards raise
`CacheIntegrityError` instead of returning wrong activations. The hash costs one sequential read of the
shard (sha256 at 0.5-1.5 GiB/s per core), paid once per shard per `ActivationStore` object; storage
you trust can be opened with check="sizes".

A verified shard stays verified only while its file does: every read compares the file's identity
(device, inode, size, modification and change times) with the one it had when it was hashed, and a file
replaced (say, by write-then-rename) or written in place since is hashed again before anything of it is
served. (File times tick in steps of a few milliseconds: a write that lands within one step of the
check that preceded it is the remaining blind spot.)
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ..dtypes import DTYPES
from ..files import file_identity
from .manifest import (
    MANIFEST,
    CacheIntegrityError,
    check_manifest,
    check_shard_file,
    read_manifest,
    shard_path,
)
from .stats import normalization_stats
from .stream import ActivationStream

#: Per-token tensors every shard holds next to the hook activations.
META = ("token_ids", "doc_ids", "positions")


class HookView:
    """One cached stream, [token ...], read lazily: ``view[i]``, ``view[a:b]``, ``view[a:b, 3]``,
    ``view[[5, 1, 9]]`` read only the shards that hold those tokens."""

    def __init__(self, store: ActivationStore, name: str):
        self.store, self.name = store, name

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.store), *self.store.manifest["hooks"].get(self.name, {}).get("shape", ()))

    @property
    def axes(self) -> list[str]:
        return self.store.manifest["hooks"].get(self.name, {}).get("axes", ["token"])

    @property
    def dtype(self) -> torch.dtype:
        if self.name in META:
            return torch.int64
        return DTYPES[self.store.manifest["settings"]["dtype"]]

    def __len__(self) -> int:
        return len(self.store)

    def __repr__(self) -> str:
        axes = " ".join(self.axes)
        return f"HookView({self.name!r}, shape={self.shape}, axes={axes!r}, dtype={self.dtype})"

    def load(self) -> torch.Tensor:
        """The whole stream in memory."""
        return self[:]

    def __getitem__(self, index: Any) -> torch.Tensor:
        rest = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        n = len(self.store)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step < 0:
                raise ValueError(f"{self.name}: negative slice steps are not supported, got {index}")
            out = self.store._read(self.name, start, max(start, stop))[::step]
            return out[(slice(None), *rest)] if rest else out
        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.dim() == 0):
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"{self.name}: token {i} is out of range for a cache of {n} tokens")
            i %= n
            out = self.store._read(self.name, i, i + 1)[0]
            return out[rest] if rest else out
        if isinstance(index, torch.Tensor) and index.dtype == torch.uint8:
            raise TypeError(f"{self.name}: a torch.uint8 index is ambiguous (torch reads it as a mask, numpy as "
                            "positions); pass index.bool() for a mask or index.long() for token positions")
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"{self.name}: a boolean mask must have one entry per cached token, shape "
                                 f"({n},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"{self.name}: index with an int, a slice or a 1-d sequence of ints, "
                            f"got {index!r}")
        out = self.store._gather(self.name, idx.astype(np.int64))  # uint8 / int16 indices are positions too
        return out[(slice(None), *rest)] if rest else out


class ActivationStore:
    """An activation store: a directory written by `cache_dataset`, read lazily.

    ``len(store)`` is the number of stored tokens; ``store[hook_name]`` is a `HookView` [token ...];
    ``store.tokens(a, b)``, ``store.doc_ids(a, b)``, ``store.positions(a, b)`` give each token's id,
    document and position in that document; ``store.document(d)`` is document d's token range.

    check: "lazy" (default) checks the manifest and every shard's size on open and hashes each shard on
    its first read; "open" hashes every shard now (the same as calling `verify()`); "sizes" skips the
    hashes, for a store on storage you trust when a full read costs too much. A damaged store raises
    `CacheIntegrityError` (a ValueError) naming the file.
    """

    CHECKS = ("lazy", "open", "sizes")

    def __init__(self, out_dir, *, allow_incomplete: bool = False, check: str = "lazy"):
        if check not in self.CHECKS:
            raise ValueError(f"check must be one of {self.CHECKS}, got {check!r}")
        self.dir = Path(out_dir)
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise FileNotFoundError(f"no activation cache in {self.dir} (no {MANIFEST})")
        if not manifest["completed"] and not allow_incomplete:
            raise ValueError(f"the cache in {self.dir} is unfinished (rerun cache_dataset to complete it, or "
                             "pass allow_incomplete=True to read the shards written so far)")
        check_manifest(manifest, self.dir)
        self.manifest, self.check = manifest, check
        self.shards: list[dict] = manifest["shards"]
        self._paths = [shard_path(self.dir, s["file"], self.dir / MANIFEST) for s in self.shards]
        for path, shard in zip(self._paths, self.shards):
            check_shard_file(path, shard, hashed=False)
        self._starts = [s["first_token"] for s in self.shards]
        self._handles: dict[int, tuple[Any, tuple]] = {}  # shard -> (open handle, file identity it read)
        self._verified: dict[int, tuple] = {}  # shard -> the file identity its check passed for
        self._stats: dict[str, dict] = {}
        if check == "open":
            self.verify()

    # ------------------------------------------------------------------ description
    @property
    def hook_names(self) -> list[str]:
        return list(self.manifest["settings"]["hook_names"])

    @property
    def n_documents(self) -> int:
        return int(self.manifest["n_documents"])

    def __len__(self) -> int:
        return int(self.manifest["n_tokens"])

    def __contains__(self, name: str) -> bool:
        return name in self.hook_names or name in META

    def __repr__(self) -> str:
        s = self.manifest["settings"]
        return (f"ActivationStore({str(self.dir)!r}, tokens={len(self)}, documents={self.n_documents}, "
                f"shards={len(self.shards)}, dtype={s['dtype']}, positions={s['positions']!r}, "
                f"hooks={self.hook_names})")

    def __getitem__(self, name: str) -> HookView:
        if name not in self:
            raise KeyError(f"hook {name!r} is not in this cache; cached hooks: {self.hook_names}")
        return HookView(self, name)

    def tokens(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Token ids [token] of cached tokens [start, stop)."""
        return self["token_ids"][start:stop]

    def doc_ids(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Document index [token] of cached tokens [start, stop)."""
        return self["doc_ids"][start:stop]

    def positions(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Position within its document [token] of cached tokens [start, stop)."""
        return self["positions"][start:stop]

    def document(self, doc: int) -> slice:
        """The token range of document `doc` (empty when none of its positions was cached)."""
        if (self.manifest["settings"].get("windows") or {}).get("packing"):
            raise ValueError("a packed store has no per-document token ranges (a window holds several "
                             "documents, a document spans windows); select tokens by store.doc_ids() instead")
        total = self.manifest["source"]["n_documents"] or self.n_documents
        if not 0 <= doc < total:
            raise IndexError(f"document {doc} is out of range for {total} documents")
        for i, s in enumerate(self.shards):
            if s["first_doc"] <= doc < s["first_doc"] + s["n_docs"]:
                ids = self._handle(i).get_slice("doc_ids")[0 : s["n_tokens"]]
                lo, hi = (int(torch.searchsorted(ids, doc, right=r)) for r in (False, True))
                return slice(s["first_token"] + lo, s["first_token"] + hi)
        raise IndexError(f"document {doc} is not in the shards written so far")

    # ------------------------------------------------------------------ iteration
    def iter_shards(self, names: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Each shard's tensors (all hooks and META by default), one shard in memory at a time."""
        names = list(names) if names is not None else self.hook_names + list(META)
        for name in names:
            self[name]  # noqa: B018 -- validates the name before any reading
        for i in range(len(self.shards)):
            handle = self._handle(i)
            yield {name: handle.get_tensor(name) for name in names}

    def iter_batches(self, hook_name: str, batch_size: int, start: int = 0,
                     stop: int | None = None) -> Iterator[torch.Tensor]:
        """Consecutive [batch_size ...] blocks of one stream (the last may be shorter), across shards."""
        view = self[hook_name]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stop = len(self) if stop is None else min(stop, len(self))
        for a in range(start, stop, batch_size):
            yield view[a : min(a + batch_size, stop)]

    def stream(self, hooks: str | Sequence[str], **kwargs: Any) -> ActivationStream:
        """A shuffled, sharded `torch.utils.data.IterableDataset` of batches of `hooks` (see
        `ActivationStream` for batch_size, buffer_tokens, seed, epoch, normalize, meta, start_batch ...)."""
        return ActivationStream(self, hooks, **kwargs)

    def normalization_stats(self, hook: str) -> dict:
        """Mean [per-token shape], mean L2 norm ("norm") and mean centred norm ("centered_norm") of `hook`
        over the store, in float64. Computed once, then kept in ``stats.json`` (bound to the shards and
        hashed; saved only for a completed store, never into the manifest): see store/stats.py."""
        self[hook]  # noqa: B018 -- raises KeyError naming the cached hooks
        return normalization_stats(self, hook, self._stats)

    def __getstate__(self) -> dict:
        # Open shard handles cannot be pickled (DataLoader workers); each process reopens its own.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    # ------------------------------------------------------------------ integrity
    def verify(self) -> None:
        """Hash every shard now against the sha256 recorded when it was written (a full read of the store);
        raises `CacheIntegrityError` (a ValueError) naming the first damaged file. Shards verified here are
        not hashed again on first read."""
        for i in range(len(self.shards)):
            self._verified.pop(i, None)
            self.check_shard(i, hashed=True)

    def close(self) -> None:
        """Drop the open shard handles (they are reopened on demand)."""
        self._handles.clear()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def check_shard(self, i: int, hashed: bool | None = None) -> tuple:
        """Make sure shard i's file is the one checked (hashed unless check="sizes"), checking it again if
        it changed since; returns its identity (`file_identity`)."""
        path, shard = self._paths[i], self.shards[i]
        hashed = self.check != "sizes" if hashed is None else hashed
        for _ in range(3):
            try:
                identity = file_identity(path)
            except FileNotFoundError:
                check_shard_file(path, shard, hashed=False)  # raises, naming the missing shard
                raise
            if self._verified.get(i) == identity:
                return identity
            check_shard_file(path, shard, hashed=hashed)
            if file_identity(path) == identity:  # unchanged while it was read
                self._verified[i] = identity
                return identity
        raise CacheIntegrityError(f"shard {path} keeps changing while it is being checked; another process is "
                                  "writing it")

    def _handle(self, i: int):
        identity = self.check_shard(i)
        if i not in self._handles or self._handles[i][1] != identity:
            path, shard = self._paths[i], self.shards[i]
            try:
                handle = safe_open(str(path), framework="pt")
                lengths = {name: handle.get_slice(name).get_shape()[:1] for name in handle.keys()}
            except Exception as err:  # safetensors raises its own error type, without the file's name
                raise CacheIntegrityError(f"shard {path} cannot be read as safetensors ({err}); the store is "
                                          "damaged (delete the directory and cache again)") from None
            for name in (*self.hook_names, *META):
                if lengths.get(name) != [shard["n_tokens"]]:
                    raise CacheIntegrityError(
                        f"shard {path}: tensor {name!r} has leading shape {lengths.get(name)}, the manifest "
                        f"says {shard['n_tokens']} tokens; the store is damaged")
            self._handles[i] = (handle, identity)
        return self._handles[i][0]

    def _empty(self, name: str) -> torch.Tensor:
        view = HookView(self, name)
        return torch.empty((0, *view.shape[1:]), dtype=view.dtype)

    def _read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Tokens [start, stop) of one stream, reading only the overlapping shards."""
        parts = []
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while start < stop and i < len(self.shards):
            s = self.shards[i]
            lo, hi = start - s["first_token"], min(stop, s["first_token"] + s["n_tokens"]) - s["first_token"]
            if hi > lo:
                parts.append(self._handle(i).get_slice(name)[lo:hi])
                start = s["first_token"] + hi
            i += 1
        if not parts:
            return self._empty(name)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _gather(self, name: str, idx: np.ndarray) -> torch.Tensor:
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"{name}: token indices must be in [-{n}, {n}), got [{idx.min()}, {idx.max()}]")
        idx = idx % n if n else idx
        if not idx.size:
            return self._empty(name)
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        out = None
        for i in np.unique(shard):
            sel = np.flatnonzero(shard == i)
            local = idx[sel] - self._starts[i]
            lo, hi = int(local.min()), int(local.max()) + 1
            block = self._handle(int(i)).get_slice(name)[lo:hi][torch.from_numpy(local - lo)]
            if out is None:
                out = torch.empty((len(idx), *block.shape[1:]), dtype=block.dtype)
            out[torch.from_numpy(sel)] = block
        return out


#: The store's name before it had one of its own; kept so code written against it keeps working.
CachedActivations = ActivationStore
