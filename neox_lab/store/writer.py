"""`cache_dataset`: run a model over a dataset and keep chosen hook activations on disk, as an activation
store of safetensors shards.

Documents become windows (`windows.py`: truncation or packing), windows are cut into batches of
`batch_size`, and a shard is closed after the first batch that brings it to `shard_tokens` tokens. All of
it depends only on the data and the settings, so a run that was killed and resumed at its cursor computes
the very same batches and writes the same bytes. A distributed run gives each rank a contiguous block of
documents; see `rank_doc_range`.

Three threads share the work: one reads and tokenizes documents ahead of the model (`Prefetcher`), the
caller's runs the model, and one writes shards (`_ShardSink`), so neither the tokenizer nor the disk
makes the model wait.
"""

from __future__ import annotations

import fnmatch
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..axes import POSITIONS, find_axis
from ..dtypes import DTYPES, dtype_name, nonfinite_count
from .hook_identity import attached_hooks, hook_name, hooks_identity
from .manifest import (
    FORMAT,
    VERSION,
    WEIGHTS_FINGERPRINT,
    CacheMismatchError,
    atomic_write_json,
    check_compatible,
    config_sha256,
    parse_positions,
    positions_spec,
    read_manifest,
    weights_sha256,
)
from .reader import ActivationStore
from .shards import ShardWriter
from .sources import Documents, DocumentStream, load_documents, pad_right, tokenizer_fingerprint
from .windows import (
    Batch,
    Prefetcher,
    WindowSpec,
    count_docs,
    iter_batches,
    iter_windows,
    sample_positions,
    selected_positions,
)

DEFAULT_SHARD_TOKENS = 16384
_PART_IDENTITY = (("world_size",), ("doc_range",))


def expand_hook_patterns(model, names: str | Iterable[str] | Callable[[str], bool]) -> list[str]:
    """Hook names selected by names, fnmatch globs (``blocks.*.hook_resid_post``) or a predicate, in forward
    order. An unknown name or a glob matching nothing raises `KeyError`."""
    if callable(names) and not isinstance(names, str):
        chosen = {hp.name for hp in model.resolve_hooks(names)}
    else:
        known, chosen = model.hook_names(), set()
        for pattern in [names] if isinstance(names, str) else list(names):
            if any(c in pattern for c in "*?["):
                matched = [n for n in known if fnmatch.fnmatchcase(n, pattern)]
                if not matched:
                    raise KeyError(f"hook pattern {pattern!r} matches no hook point of this model")
                chosen.update(matched)
            else:
                chosen.update(hp.name for hp in model.resolve_hooks(pattern))
    order = {name: i for i, name in enumerate(model.hook_names())}
    return sorted(chosen, key=order.__getitem__)


def rank_doc_range(n_docs: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Documents [first, end) of one rank: a contiguous block of whole batches of the global batch grid."""
    n_batches = -(-n_docs // batch_size)
    b0, b1 = rank * n_batches // world_size, (rank + 1) * n_batches // world_size
    return min(b0 * batch_size, n_docs), min(b1 * batch_size, n_docs)


def part_dir_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}"


def _pos_axes(shape: str, name: str) -> tuple[int, list[str]]:
    dims = shape.split()
    q = find_axis(shape, POSITIONS)
    if q is None or dims[0] != "batch":
        raise ValueError(f"hook {name!r} [{shape}] has no batch/position axes to cache per token")
    return q, ["token"] + [d for i, d in enumerate(dims) if i not in (0, q)]


def _flatten(t: torch.Tensor, shape: str, keep: torch.Tensor, max_length: int) -> torch.Tensor:
    """[batch pos ...] (or [batch n_heads query_pos key_pos]) -> [token ...] for the kept positions.

    A key_pos axis is padded to `max_length`, and keys after the query (causally masked, and the only place
    padding can appear) are stored as 0, so values never depend on how a batch was padded.
    """
    dims = shape.split()
    q = _pos_axes(shape, "?")[0]
    order = [0, q] + [i for i in range(1, len(dims)) if i != q]
    t = t.permute(order)
    rest = [dims[i] for i in order[2:]]
    if "key_pos" in rest:
        k, width = 2 + rest.index("key_pos"), t.shape[1]
        view = [1] * t.dim()
        view[1] = view[k] = width
        causal = torch.ones(width, width, dtype=torch.bool).tril().view(view)
        t = t.masked_fill(~causal, 0).movedim(k, -1)
        t = F.pad(t, (0, max_length - width)).movedim(-1, k)
    if keep.all():  # every position kept (no padding, no selection): a view, not a second copy
        return t.reshape(-1, *t.shape[2:]).contiguous()
    return t[keep].contiguous()


def _stop_layer(points) -> int | None:
    """Run only the blocks the hooks need: `stop_at_layer` skips later blocks and the unembedding."""
    if any(hp.layer is None and hp.name != "hook_embed" for hp in points):
        return None
    return max((hp.layer for hp in points if hp.layer is not None), default=-1) + 1


def _world(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    group = dist.is_available() and dist.is_initialized()
    if rank is None and world_size is None and group:
        return dist.get_rank(), dist.get_world_size(), True
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size, bool(group and world_size > 1 and dist.get_world_size() == world_size)


def _runtime(model) -> dict:
    return {"attn_backend": getattr(model, "attn_backend", None), "device": model.input_device.type}


def _header(model, docs: Documents | DocumentStream, tokenizer, names, dtype, positions, max_length, batch_size,
            shard_tokens, spec: WindowSpec, hooks: dict):
    param = next(model.parameters())  # dtype only: a meta placeholder of a placed model has it too
    return {
        "format": FORMAT, "version": VERSION,
        "model": {"class": type(model).__name__, "config": model.cfg.to_hf(),
                  "config_sha256": config_sha256(model.cfg), "weights_sha256": None,  # filled in later
                  "weights_fingerprint": WEIGHTS_FINGERPRINT, "hooks": hooks,
                  "param_dtype": str(param.dtype).removeprefix("torch.")},
        "runtime": _runtime(model),
        "settings": {"hook_names": names, "dtype": dtype, "positions": positions, "max_length": max_length,
                     "batch_size": batch_size, "shard_tokens": shard_tokens, "windows": spec.describe()},
        "source": {**docs.describe(),
                   "tokenizer_sha256": tokenizer_fingerprint(tokenizer) if docs.is_text else None},
    }


def cache_dataset(model, source: Any, names, out_dir, *, batch_size: int = 8, max_length: int = 128,
                  dtype: torch.dtype | str = torch.float16, positions: str | slice = "all", tokenizer=None,
                  text_field: str = "text", shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True,
                  rank: int | None = None, world_size: int | None = None, allow_hooks: bool | str = False,
                  allow_backend_change: bool = False, context_size: int | None = None, packing: bool = False,
                  prepend_bos: bool = False, min_tokens: int | None = None, every_k_documents: int = 1,
                  sample_tokens: int | None = None, seed: int = 0) -> ActivationStore | None:
    """Run `model` (a neox_lab model of either convention) over every document of `source` and store the
    activations of hooks `names` in `out_dir`.

    source: a .txt file (a document per non-blank line), a .jsonl file (field `text_field`), either one
    compressed (.gz, .zst), a .parquet file or a folder of them (column `text_field`), a `datasets.Dataset`
    / `IterableDataset` or a folder saved by `datasets`, an iterator of strings, a .npy file or
    tensor/array of token ids [document pos], a list of id lists, or a list of strings (see
    `load_documents`). Files and datasets are streamed: memory does not grow with the corpus. Texts are
    tokenized with `tokenizer` (default `model.tokenizer`) in a background thread.

    Windows (recorded in the manifest, part of the store's identity): every document is cut to its first
    `context_size` tokens (alias `max_length`), or with ``packing=True`` documents are joined with the EOS
    token and cut into consecutive `context_size` windows. ``prepend_bos`` puts the BOS token first in
    every window; documents with fewer than `min_tokens` tokens are skipped (empty ones always are);
    only documents whose index is a multiple of `every_k_documents` are read; ``sample_tokens=n`` keeps a
    uniform random sample of n positions of each window (seeded by `seed` and the window's place in the
    corpus). "doc_ids" is each token's source document, "positions" its position in its window.
    names: hook names, fnmatch globs ("blocks.*.hook_resid_post") or a predicate; unknown names raise
    `KeyError` before any work. positions: "all" real tokens, the "last" one of each document, or a
    slice of each document's positions. Activations are stored as `dtype` [token ...], plus "token_ids",
    "doc_ids" and "positions" [token], in shards of at least `shard_tokens` tokens (batch boundaries).
    A document with no tokens (an empty string or id list) is kept in the numbering and stores nothing;
    their count is reported once. Non-finite values written to the store (fp16 overflows past 65504)
    raise a warning naming the hook.

    Hook functions attached to the model (e.g. a permanent ablation) would change what is stored, so
    they are refused unless ``allow_hooks=True``, which records each by name and fingerprint (its code,
    closure values, `functools.partial` arguments and the globals it names; store/hook_identity.py) as
    part of the store's identity, so "ablate head 0" never resumes a store made with "ablate head 3". A
    hook holding a value that cannot be fingerprinted is refused; ``allow_hooks="<text>"`` records that
    text as the hooks' identity instead, for you to keep unique. The weights are fingerprinted byte for
    byte. A resume with another attention backend or device than the one that started the store is
    refused unless ``allow_backend_change=True``; each shard records the backend that wrote it.

    A rerun into the same `out_dir` resumes an unfinished store (and returns a finished one at once);
    a store made by another model, dataset or settings raises `CacheMismatchError`, a damaged one
    `CacheIntegrityError` (shards are hashed when a resume builds on them and on first read). With several
    ranks (`torch.distributed` initialised, or `rank`/`world_size` given) each rank caches its block of
    batches under ``rank-RRRRR-of-WWWWW/`` and one manifest lists all shards in document order.
    Returns an `ActivationStore` over the finished store (None on a rank that cannot merge yet, which
    happens only with explicit ranks and no process group).
    """
    model = model.hf()  # either convention's class: run through the transformers view, same modules
    if context_size is not None:
        if max_length not in (128, context_size):
            raise ValueError(f"context_size={context_size} and max_length={max_length} disagree; they name the "
                             "same window length, pass one of them")
        max_length = context_size
    sizes = (("batch_size", batch_size), ("max_length", max_length), ("shard_tokens", shard_tokens))
    for label, value in sizes:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    hook_list = expand_hook_patterns(model, names)
    if not hook_list:
        raise ValueError("names selects no hook point")
    points = model.resolve_hooks(hook_list)
    for hp in points:
        _pos_axes(hp.shape, hp.name)
    dtype_str, pos_spec = dtype_name(dtype), positions_spec(positions)
    spec = WindowSpec(max_length, packing=packing, prepend_bos=prepend_bos, min_tokens=min_tokens,
                      every_k_documents=every_k_documents, sample_tokens=sample_tokens, seed=seed)
    found = attached_hooks(model)
    if found and (allow_hooks is False or allow_hooks == ""):
        listed = "; ".join(f"{where}: {', '.join(map(hook_name, fns))}" for where, fns in found.items())
        raise ValueError(f"the model has hook functions attached ({listed}); they would change the stored "
                         "activations. Remove them (model.reset_hooks(including_permanent=True)) or pass "
                         "allow_hooks=True to cache with them and record them in the manifest")
    if not isinstance(allow_hooks, (bool, str)):
        raise TypeError(f"allow_hooks must be True, False or a string naming the hooks, got {allow_hooks!r}")
    hooks = hooks_identity(model, found, allow_hooks)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    specials = _special_ids(tokenizer, spec)
    rank, world, group = _world(rank, world_size)
    docs = load_documents(source, text_field)
    if docs.n_documents == 0 and docs.kind == "iterator":
        raise ValueError("the iterator yields no documents (is it already exhausted?); nothing to cache")
    if docs.n_documents == 0:
        raise ValueError(f"the source {source if isinstance(source, (str, Path)) else 'given'} holds no "
                         "documents; nothing to cache")
    if docs.is_text and tokenizer is None:
        raise ValueError("text documents need a tokenizer: pass tokenizer= or set model.tokenizer")
    if docs.n_documents is None and world > 1:
        raise ValueError(f"a {docs.kind} source can be read only once, so it cannot be split across {world} "
                         "processes; pass a file, a folder or a dataset")
    header = _header(model, docs, tokenizer, hook_list, dtype_str, pos_spec, max_length, batch_size,
                     shard_tokens, spec, hooks)
    # Hashing every weight byte takes a second or more; a fresh store needs the digest only when its first
    # shard is recorded, so it is taken in a thread (one core) while the first batches run.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neox-lab-fingerprint")
    fingerprint = pool.submit(weights_sha256, model, workers=1)
    pool.shutdown(wait=False)

    def fill_header(h: dict = header) -> None:
        h["model"]["weights_sha256"] = fingerprint.result()

    out = Path(out_dir)
    top = read_manifest(out)
    if top is not None or world > 1:
        fill_header()  # an existing store (or part) is checked against the full identity before any work
    if top is not None and docs.n_documents is None:
        raise CacheMismatchError(f"{out} already holds a cache, and a one-shot {docs.kind} source cannot be "
                                 "checked against it or resumed; use another output directory, or pass a "
                                 "file, a folder or a dataset")
    if top is not None:
        check_compatible(top, header, out)
        if top["completed"]:
            return ActivationStore(out)
        if world > 1:
            raise CacheMismatchError(f"{out} holds an unfinished single-process cache; resume it with one "
                                     "process or use another output directory")
    else:
        # Parts made with another number of processes cover other document blocks and cannot be resumed.
        others = sorted(p.name for p in out.iterdir() if p.name.startswith("rank-")
                        and not p.name.endswith(f"-of-{world:05d}")) if out.is_dir() else []
        if others:
            raise CacheMismatchError(f"{out} holds an unfinished distributed cache made by another number of "
                                     f"processes ({others[0]}); resume it with that many processes")
    if docs.n_documents is None:
        first, end = 0, None
    else:
        first, end = rank_doc_range(docs.n_documents, batch_size, rank, world)
    part_header = {**header, "world_size": world, "doc_range": [first, end]}
    if world > 1:
        part_header["rank"] = rank
    runtime = header["runtime"]
    writer = ShardWriter(out if world == 1 else out / part_dir_name(rank, world), part_header, _PART_IDENTITY,
                         backend=f"{runtime['attn_backend']}@{runtime['device']}",
                         allow_backend_change=allow_backend_change,
                         fill_header=None if header["model"]["weights_sha256"] else fill_header)
    try:
        if not writer.completed:
            desc = "caching" if world == 1 else f"caching (rank 0 of {world})"
            _run(model, docs, tokenizer, points, writer, end, spec=spec, specials=specials,
                 batch_size=batch_size, dtype=DTYPES[dtype_str], pos_slice=parse_positions(pos_spec),
                 shard_tokens=shard_tokens, progress=progress and rank == 0, desc=desc)
            if docs.n_documents is None:  # a one-shot iterator: its count and digest are known only now
                read, digest = docs.consumed()
                writer.manifest["doc_range"] = [0, read]
                writer.manifest["source"] = {**writer.manifest["source"], "n_documents": read,
                                             "documents_sha256": digest}
            writer.finish()
    finally:
        writer.close()
    if world == 1:
        return ActivationStore(out)
    return _merge(out, header, docs.n_documents, world, rank, group)


def _special_ids(tokenizer, spec: WindowSpec) -> dict[str, int | None]:
    ids = {"bos_id": getattr(tokenizer, "bos_token_id", None), "eos_id": getattr(tokenizer, "eos_token_id", None)}
    if spec.prepend_bos and ids["bos_id"] is None:
        raise ValueError("prepend_bos needs a tokenizer with a bos_token (pass tokenizer= or set model.tokenizer)")
    if spec.packing and ids["eos_id"] is None:
        raise ValueError("packing needs a tokenizer with an eos_token to separate documents (pass tokenizer= or "
                         "set model.tokenizer)")
    return ids


class _ShardSink:
    """Hands batches to a `ShardWriter` in a background thread, so writing a shard (safetensors, sha256,
    fsync) overlaps the next forward. The first error is raised in the caller at its next `put`/`close`."""

    def __init__(self, writer: ShardWriter, axes: dict, shard_tokens: int, depth: int = 2):
        self.writer, self.axes, self.shard_tokens = writer, axes, shard_tokens
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True, name="neox-lab-write")
        self._thread.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._error is not None:
                if item is None:
                    return
                continue
            try:
                tensors, n_docs, offset = item
                self.writer.add(tensors, n_docs, offset)
                if self.writer.pending_tokens >= self.shard_tokens:
                    self.writer.flush(self.axes)
            except BaseException as err:  # raised in the caller
                self._error = err

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, tensors: dict | None, n_docs: int, offset: int) -> None:
        self._check()
        self._queue.put((tensors, n_docs, offset))

    def close(self, flush: bool) -> None:
        """Wait for the queued batches; with `flush`, write what is left as the last shard."""
        self._queue.put(None)
        self._thread.join()
        if flush:  # not while another error is on its way up: that one is the cause
            self._check()
            self.writer.flush(self.axes)


def _run(model, docs, tokenizer, points, writer: ShardWriter, end: int | None, *, spec: WindowSpec, specials,
         batch_size, dtype, pos_slice, shard_tokens, progress, desc) -> None:
    names = [hp.name for hp in points]
    shapes = {hp.name: hp.shape for hp in points}
    axes = {hp.name: _pos_axes(hp.shape, hp.name)[1] for hp in points}
    stop, device = _stop_layer(points), model.input_device
    first, cursor = writer.header["doc_range"][0], writer.cursor
    total = None if end is None else end - first
    bar = tqdm(total=total, initial=cursor[0] - first, unit="doc", desc=desc, disable=not progress)
    seen, t0, was_training, warned = 0, time.perf_counter(), model.training, set()
    skipped = {"empty": 0, "short": 0}
    windows = iter_windows(docs, spec, tokenizer, cursor, end, counts=skipped, **specials)
    stop_at = end if end is not None else (lambda: docs.consumed()[0])
    batches = Prefetcher(count_docs(iter_batches(windows, batch_size, cursor, stop_at), cursor))
    sink = _ShardSink(writer, axes, shard_tokens)
    model.eval()  # dropout would make the store differ from run to run
    done = False
    try:
        for batch in batches:
            if batch.windows:
                tensors = _forward(model, batch, names, shapes, spec, pos_slice, dtype, stop, device)
                for name in names:
                    bad = 0 if name in warned else nonfinite_count(tensors[name])
                    if bad:
                        warned.add(name)
                        warnings.warn(_non_finite_message(name, bad, dtype), stacklevel=3)
            else:  # only skipped documents: a shard of no tokens still records that they were read
                tensors = _no_tokens(model, names, shapes, spec.context_size, dtype, stop)
            sink.put(tensors, batch.n_docs, batch.end[1])
            seen += sum(len(w.tokens) for w in batch.windows)
            bar.update(batch.n_docs)
            bar.set_postfix_str(f"{seen / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
        done = True
    finally:
        batches.close()
        bar.close()
        model.train(was_training)
        sink.close(flush=done)
    if skipped["empty"]:
        warnings.warn(f"{skipped['empty']} document(s) had no tokens; they keep their numbers and store nothing",
                      stacklevel=3)


def _forward(model, batch: Batch, names, shapes, spec: WindowSpec, pos_slice, dtype, stop, device) -> dict:
    """The per-token tensors of one batch of windows."""
    rows = [w.tokens for w in batch.windows]
    ids, mask = pad_right(rows)
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    doc_ids = torch.zeros(ids.shape, dtype=torch.long)
    for i, w in enumerate(batch.windows):
        keep[i, torch.from_numpy(sample_positions(selected_positions(w, pos_slice), spec, w.start))] = True
        doc_ids[i, : len(w.tokens)] = torch.tensor(w.doc_ids, dtype=torch.long)
    _, acts = model.run_with_cache(ids.to(device), attention_mask=mask.to(device), names_filter=names,
                                   device="cpu", dtype=dtype, stop_at_layer=stop)
    tensors = {name: _flatten(acts[name], shapes[name], keep, spec.context_size) for name in names}
    tensors["token_ids"] = ids[keep]
    tensors["doc_ids"] = doc_ids[keep]
    tensors["positions"] = torch.arange(ids.shape[1])[None].expand(ids.shape)[keep]
    return tensors
def _no_tokens(model, names, shapes, max_length, dtype, stop) -> dict:
    """Zero-token tensors for a batch whose documents are all empty (the per-token shape from the model)."""
    _, acts = model.run_with_cache(torch.zeros(1, 1, dtype=torch.long, device=model.input_device),
                                   names_filter=names, device="cpu", dtype=dtype, stop_at_layer=stop)
    keep = torch.zeros(1, 1, dtype=torch.bool)
    tensors = {name: _flatten(acts[name], shapes[name], keep, max_length) for name in names}
    for meta in ("token_ids", "doc_ids", "positions"):
        tensors[meta] = torch.zeros(0, dtype=torch.long)
    return tensors


def _non_finite_message(name: str, bad: int, dtype: torch.dtype) -> str:
    hint = (" float16 overflows past 65504: cache with dtype=torch.bfloat16 or torch.float32"
            if dtype == torch.float16 else "")
    return f"hook {name!r}: {bad} non-finite value(s) (inf/nan) written to the store as {dtype_name(dtype)};{hint}"


def merge_parts(out: Path, header: dict, n_docs: int, world: int) -> dict | None:
    """Write the one manifest of a distributed store from its ranks' parts (None while one is unfinished)."""
    parts = []
    for rank in range(world):
        part = read_manifest(out / part_dir_name(rank, world))
        if part is None or not part["completed"]:
            return None
        check_compatible(part, header, out / part_dir_name(rank, world))
        parts.append(part)
    shards, n_tokens = [], 0
    for rank, part in enumerate(parts):
        for shard in part["shards"]:
            shards.append({**shard, "file": f"{part_dir_name(rank, world)}/{shard['file']}",
                           "first_token": n_tokens + shard["first_token"]})
        n_tokens += part["n_tokens"]
    manifest = {**header, "world_size": world, "doc_range": [0, n_docs], "n_tokens": n_tokens,
                "n_documents": sum(p["n_documents"] for p in parts), "shards": shards, "completed": True,
                "hooks": next((p["hooks"] for p in parts if p["hooks"]), {})}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _merge(out: Path, header: dict, n_docs: int, world: int, rank: int, group: bool):
    if not group:  # independent jobs: whoever finishes last merges (equal bytes if two race)
        return ActivationStore(out) if merge_parts(out, header, n_docs, world) else None
    dist.barrier()
    error = None
    if rank == 0:
        try:
            merge_parts(out, header, n_docs, world)
        except Exception as err:  # the other ranks must still leave the barrier below
            error = err
    dist.barrier()
    if error is not None:
        raise error
    top = read_manifest(out)
    if top is None or not top["completed"]:
        raise RuntimeError(f"rank 0 failed to write the merged manifest of {out}; see rank 0's error")
    return ActivationStore(out)
