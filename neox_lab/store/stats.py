"""Normalisation statistics of a store's hooks: mean and mean L2 norm, computed once in float64.

They live in ``stats.json`` beside the manifest, never in it: the manifest belongs to the writer, and a
reader that rewrote it (say, while `cache_dataset` was still running) could hand the next run a stale
shard list. The rules:

  bound       each hook's entry records the shards it was computed from (a digest of their files and
              sha256s, the dtype and the token count); an entry for other shards is not used
  hashed      each entry carries the sha256 of its own values, so an edited or damaged mean is never
              used: it is computed again, with a warning naming the file
  saved       only for a completed store (an unfinished one still grows), under the store's lock taken
              without waiting (a busy or read-only store keeps them in memory for this process)

stats.json: {"format": "neox_lab.activation_stats", "version": 1, "hooks": {name: {"mean": [...],
"norm": float, "centered_norm": float, "n_tokens": int, "shards": digest, "sha256": digest}}}.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .lock import StoreLock
from .manifest import CacheBusyError, atomic_write_json, read_manifest

STATS = "stats.json"
STATS_FORMAT = "neox_lab.activation_stats"
STATS_VERSION = 1
#: What a caller gets back; the file adds the binding ("shards") and the entry's own "sha256".
STAT_KEYS = ("mean", "norm", "centered_norm", "n_tokens")


def shards_digest(manifest: dict, hook: str) -> str:
    """What a hook's statistics were computed from: the shard files with their sha256s, dtype and size."""
    shards = [[s["file"], s["sha256"], s["n_tokens"]] for s in manifest["shards"]]
    what = [hook, manifest["settings"]["dtype"], manifest["n_tokens"], shards]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def entry_sha256(entry: dict) -> str:
    """The sha256 of an entry's values and binding (everything but its own "sha256")."""
    body = {k: v for k, v in entry.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def compute_stats(view: Any, n: int, chunk_tokens: int = 8192) -> dict:
    """Mean [per-token shape] and mean L2 norm (raw and centred) of a [token ...] view, in float64, in
    two passes of `chunk_tokens` tokens."""
    total = None
    for a in range(0, n, chunk_tokens):
        part = view[a : a + chunk_tokens].to(torch.float64).sum(0)
        total = part if total is None else total + part
    mean = total / n
    norm = centred = 0.0
    for a in range(0, n, chunk_tokens):
        block = view[a : a + chunk_tokens].to(torch.float64).reshape(-1, mean.numel())
        norm += float(block.norm(dim=1).sum())
        centred += float((block - mean.reshape(1, -1)).norm(dim=1).sum())
    return {"mean": mean.tolist(), "norm": norm / n, "centered_norm": centred / n, "n_tokens": n}


def _read_file(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        warnings.warn(f"{path} cannot be read ({err}); the statistics are computed again", stacklevel=4)
        return None
    if not isinstance(data, dict) or data.get("format") != STATS_FORMAT or not isinstance(data.get("hooks"), dict):
        warnings.warn(f"{path} is not a neox_lab statistics file; the statistics are computed again", stacklevel=4)
        return None
    return data


def saved_stats(directory: Path, manifest: dict, hook: str) -> dict | None:
    """The saved statistics of `hook`, if stats.json holds an intact entry for exactly these shards."""
    path = Path(directory) / STATS
    data = _read_file(path)
    entry = None if data is None else data["hooks"].get(hook)
    if not isinstance(entry, dict):
        return None
    if entry.get("sha256") != entry_sha256(entry) or not all(k in entry for k in STAT_KEYS):
        warnings.warn(f"{path}: the statistics of {hook!r} do not match their sha256 (the file was edited or "
                      "damaged); they are computed again from the shards", stacklevel=3)
        return None
    if entry.get("shards") != shards_digest(manifest, hook):
        return None  # computed from other shards (the store was rewritten)
    return {k: entry[k] for k in STAT_KEYS}


def save_stats(directory: Path, manifest: dict, hook: str, stats: dict) -> None:
    """Add `hook`'s statistics to stats.json, if the store is completed and its lock is free."""
    if not manifest.get("completed"):
        return  # an unfinished store is still being written: nothing of it is final yet
    directory = Path(directory)
    entry = {**stats, "shards": shards_digest(manifest, hook)}
    entry["sha256"] = entry_sha256(entry)
    try:
        lock = StoreLock(directory)
    except CacheBusyError:
        return  # a writer (or another reader saving its statistics) holds the store
    except OSError as err:
        _not_saved(directory, hook, err)
        return
    with lock:
        # Under the lock, the store on disk must still be the one these statistics were computed from.
        current = read_manifest(directory)
        if current is None or not current.get("completed") or shards_digest(current, hook) != entry["shards"]:
            return
        data = _read_file(directory / STATS) or {"format": STATS_FORMAT, "version": STATS_VERSION, "hooks": {}}
        data["hooks"][hook] = entry
        try:
            atomic_write_json(directory / STATS, data)
        except OSError as err:
            _not_saved(directory, hook, err)


def _not_saved(directory: Path, hook: str, err: OSError) -> None:
    warnings.warn(f"normalisation statistics of {hook!r} could not be saved in {directory} ({err}); "
                  "they will be computed again next time", stacklevel=4)


def normalization_stats(store: Any, hook: str, memo: dict, *, chunk_tokens: int = 8192) -> dict:
    """Mean and mean norms of `hook` over `store`: from `memo`, else stats.json, else computed (and saved
    when the store is completed). Never writes the manifest."""
    if hook in memo:
        return memo[hook]
    n = len(store)
    if n == 0:
        raise ValueError(f"the store in {store.dir} holds no tokens; no statistics for {hook!r}")
    stats = saved_stats(store.dir, store.manifest, hook)
    if stats is None:
        stats = compute_stats(store[hook], n, chunk_tokens)
        save_stats(store.dir, store.manifest, hook, stats)
    memo[hook] = stats
    return stats

