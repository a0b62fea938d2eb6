"""The on-disk format of an activation store: manifest layout, atomic writes, fingerprints, compatibility.

A store directory holds ``manifest.json`` and ``shard-NNNNN.safetensors`` files (a distributed run puts
each rank's shards and a per-rank manifest in ``rank-RRRRR-of-WWWWW/``, and the top-level manifest lists
all shards). The manifest is JSON with sorted keys and no timestamps, so equal runs write equal bytes:

  format, version        "neox_lab.activation_cache", 1
  model                  class, config (`cfg.to_hf()`), config_sha256 (of its sorted-key JSON),
                         weights_sha256 (every byte of every tensor, with names, shapes and dtypes),
                         weights_fingerprint (what weights_sha256 covers), param_dtype, hooks (the hook
                         functions attached while caching, by qualified name; {} unless allowed)
  runtime                attn_backend (the model's setting) and device type of the run that started the store
  settings               hook_names (forward order), dtype on disk, positions ("all" | "last" |
                         "start:stop:step"), max_length (the context size), batch_size, shard_tokens,
                         windows (packing, prepend_bos, min_tokens, every_k_documents, sample_tokens,
                         seed: see store/windows.py)
  source                 kind (txt | jsonl | npy | token_ids | texts | txt.gz | txt.zst | jsonl.gz |
                         jsonl.zst | parquet | dataset | iterable_dataset | iterator), path, text_field,
                         n_documents, documents_sha256 (of the parsed documents; both None for a
                         one-shot iterator), tokenizer_sha256 (texts only)
  hooks                  per hook: axes (["token", ...]) and the per-token shape
  world_size, doc_range  processes that wrote the store; documents [first, end) it covers (a rank's
                         manifest also has "rank")
  n_tokens, n_documents  cached so far (documents read, skipped ones included)
  next_offset            tokens of document doc_range[0] + n_documents already stored (packing only)
  shards                 in document order: file (relative path), first_token, n_tokens, first_doc,
                         n_docs, bytes, sha256, backend ("attn_backend@device" of the run that wrote it)
  completed              false until every document is on disk

Each shard holds, for its token range, one [token ...] tensor per hook plus int64 "token_ids",
"doc_ids" (index in the source) and "positions" (position in the document) [token].

Only the writer writes the manifest. Readers keep their normalisation statistics in ``stats.json``
(store/stats.py); a "stats" entry in manifests of older versions is ignored.

The manifest is trusted only after `check_manifest`: shard files are plain names inside the store (no
absolute paths, no ".."), token and document counts add up, and a completed store covers every document.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..dtypes import DTYPES

# The format name predates the store's own name; stores on disk carry it, so it stays.
FORMAT = "neox_lab.activation_cache"
VERSION = 1
MANIFEST = "manifest.json"
#: The tensor dtypes of safetensors files, by their header code.
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32}

#: Manifest fields that must agree before a run may resume or reuse a store ("source.path" may differ).
IDENTITY = (
    ("model", "config_sha256"), ("model", "weights_fingerprint"), ("model", "weights_sha256"),
    ("model", "param_dtype"), ("model", "hooks"),
    ("settings", "hook_names"), ("settings", "dtype"), ("settings", "positions"), ("settings", "max_length"),
    ("settings", "batch_size"), ("settings", "shard_tokens"), ("settings", "windows"),
    ("source", "kind"), ("source", "text_field"), ("source", "n_documents"), ("source", "documents_sha256"),
    ("source", "tokenizer_sha256"),
)


class CacheMismatchError(ValueError):
    """The output directory holds a store made by another model, another dataset or other settings."""


class CacheIntegrityError(ValueError):
    """The store on disk is damaged: a shard's bytes, size or contents, or the manifest's own accounting,
    disagree with what was written. Delete the directory (or the damaged run) and cache again."""


class CacheBusyError(RuntimeError):
    """Another process holds the store's lock: it is writing the same directory right now."""


class CacheWriteError(OSError):
    """Writing a shard or the manifest failed; the store on disk is still valid and a rerun resumes it."""


def positions_spec(positions: str | slice) -> str:
    """Canonical text of a positions choice: "all", "last" or "start:stop:step" (a python slice)."""
    if isinstance(positions, str) and positions in ("all", "last"):
        return positions
    if isinstance(positions, str):
        parts = positions.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"positions must be 'all', 'last' or a slice 'start:stop[:step]', "
                             f"got {positions!r}")
        try:
            positions = slice(*(int(p) if p.strip() else None for p in parts))
        except ValueError:
            raise ValueError(f"positions slice {positions!r} holds a non-integer bound") from None
    if not isinstance(positions, slice):
        raise TypeError(f"positions must be 'all', 'last' or a slice, got {type(positions).__name__}")
    if positions.step is not None and positions.step <= 0:
        raise ValueError(f"positions slice step must be positive, got {positions.step}")
    text = lambda v: "" if v is None else str(v)
    return f"{text(positions.start)}:{text(positions.stop)}:{text(positions.step)}"


def parse_positions(spec: str) -> slice:
    """The slice of each document's positions a positions spec keeps."""
    if spec == "all":
        return slice(None)
    if spec == "last":
        return slice(-1, None)
    return slice(*(int(p) if p else None for p in spec.split(":")))


def config_sha256(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(cfg.to_hf(), sort_keys=True).encode()).hexdigest()


#: What `weights_sha256` covers; stored next to it so a store fingerprinted another way is told apart.
WEIGHTS_FINGERPRINT = "sha256 of every state_dict tensor's bytes, name, shape and dtype"


def _tensor_digest(t: torch.Tensor) -> bytes:
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(raw)).digest()


def weights_sha256(model: torch.nn.Module, workers: int | None = None) -> str:
    """A digest of every byte of every tensor in the model's state_dict, with names, shapes and dtypes.

    Two checkpoints that differ anywhere (another training step, one edited weight) differ here. Tensors
    are hashed in `workers` parallel threads (default: the cores, up to 8; hashlib releases the GIL);
    sha256 reads 0.5-1.5 GiB/s per core, so pythia-1.4b in fp16 takes a few seconds once per run
    (experiments/bench_store_integrity.py).
    """
    # A model placed with device_map holds offloaded weights as meta placeholders: hash the stored values.
    state = model.stored_state_dict() if hasattr(model, "stored_state_dict") else model.state_dict()
    items = list(state.items())
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda item: _tensor_digest(item[1]), items))
    h = hashlib.sha256()
    for (name, t), digest in zip(items, digests):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:".encode())
        h.update(digest)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


#: How a shard's "sha256" is taken when its entry says ``"digest": "tensors"`` (every shard this version
#: writes): the writer hashes each tensor while the run goes on, so closing a shard costs no pass over its
#: data; any changed byte of the header or of a tensor changes it. Entries without "digest" hold the
#: plain sha256 of the file (earlier versions).
TENSOR_DIGEST = "tensors"


def tensors_sha256(header_block: bytes, tensor_digests: list[bytes]) -> str:
    """sha256 of a safetensors file's header block (length + JSON) followed by the sha256 of each tensor's
    bytes, in the order the tensors lie in the file."""
    h = hashlib.sha256(header_block)
    for digest in tensor_digests:
        h.update(digest)
    return h.hexdigest()


def shard_digests(path: Path) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A shard file's header block and each tensor's (name, sha256), in the order they lie in the file."""
    with open(path, "rb") as fh:
        header, start = read_safetensors_header(fh, path)
        fh.seek(0)
        header_block = fh.read(start)
        spans = sorted((info["data_offsets"], name) for name, info in header.items() if name != "__metadata__")
        digests = []
        for (begin, end), name in spans:
            fh.seek(start + begin)
            h, left = hashlib.sha256(), end - begin
            while left:
                block = fh.read(min(left, 1 << 22))
                if not block:
                    raise CacheIntegrityError(f"shard {path} ends inside a tensor; it was truncated")
                h.update(block)
                left -= len(block)
            digests.append((name, h.digest()))
    return header_block, digests


def shard_sha256(path: Path) -> str:
    """The `tensors_sha256` of a shard file, read from disk (what the writer recorded, if undamaged)."""
    header_block, digests = shard_digests(path)
    return tensors_sha256(header_block, [digest for _, digest in digests])


def shard_path(directory: Path, file: Any, where: Path) -> Path:
    """The path of a manifest's shard entry, refused unless it is a relative path inside `directory`."""
    if not isinstance(file, str) or not file:
        raise CacheIntegrityError(f"{where}: a shard's file is {file!r}, not a relative path")
    parts = PurePosixPath(file).parts
    if file.startswith(("/", "\\")) or "\\" in file or ":" in file or ".." in parts or "." in parts:
        raise CacheIntegrityError(f"{where}: shard file {file!r} points outside the store (absolute paths, "
                                  "'..' and drive letters are refused); the manifest was edited or damaged")
    return Path(directory, *parts)


def check_manifest(manifest: dict, directory: Path) -> None:
    """Raise `CacheIntegrityError` unless the manifest's accounting is self-consistent: shard files are
    confined to `directory`, shards are contiguous in tokens and documents, their counts sum to
    ``n_tokens`` / ``n_documents``, and a completed store covers every document of its range."""
    where = Path(directory) / MANIFEST
    settings = manifest.get("settings")
    dtype = settings.get("dtype") if isinstance(settings, dict) else None
    if dtype not in DTYPES:
        raise CacheIntegrityError(f"{where}: settings.dtype is {dtype!r}, not one of {sorted(DTYPES)}; the "
                                  "manifest was edited or damaged")
    if not isinstance(settings.get("hook_names"), list) or not all(isinstance(h, str) for h in settings["hook_names"]):
        raise CacheIntegrityError(f"{where}: settings.hook_names is {settings.get('hook_names')!r}, not a list of "
                                  "hook names; the manifest was edited or damaged")
    try:
        shards, doc_range = manifest["shards"], manifest["doc_range"]
        n_tokens, n_docs = manifest["n_tokens"], manifest["n_documents"]
        first_doc = doc_range[0]
        token = doc = 0
        for i, s in enumerate(shards):
            shard_path(directory, s["file"], where)
            if s["first_token"] != token or s["first_doc"] != first_doc + doc:
                raise CacheIntegrityError(
                    f"{where}: shard {i} ({s['file']}) starts at token {s['first_token']}, document "
                    f"{s['first_doc']}; the shards before it end at token {token}, document {first_doc + doc}")
            if min(s["n_tokens"], s["n_docs"], s["bytes"]) < 0 or not isinstance(s["sha256"], str):
                raise CacheIntegrityError(f"{where}: shard {i} ({s['file']}) has a negative count or no sha256")
            token, doc = token + s["n_tokens"], doc + s["n_docs"]
        files = [s["file"] for s in shards]
        if len(set(files)) != len(files):
            raise CacheIntegrityError(f"{where}: a shard file is listed twice")
    except (KeyError, TypeError, IndexError) as err:
        raise CacheIntegrityError(f"{where}: the manifest lacks or garbles a field ({err!r})") from None
    if (token, doc) != (n_tokens, n_docs):
        raise CacheIntegrityError(f"{where}: the shards hold {token} tokens of {doc} documents but the manifest "
                                  f"says n_tokens={n_tokens}, n_documents={n_docs}")
    if manifest.get("completed"):
        want = doc_range[1] - doc_range[0]
        total = manifest.get("source", {}).get("n_documents")
        if doc != want or ("rank" not in manifest and list(doc_range) != [0, total]):
            raise CacheIntegrityError(f"{where}: marked completed but covers {doc} documents of "
                                      f"{doc_range} (the source has {total})")


def check_shard_file(path: Path, shard: dict, hashed: bool) -> None:
    """Raise `CacheIntegrityError` unless the shard file exists with the manifest's size (and, if `hashed`,
    its sha256)."""
    if not path.is_file():
        raise CacheIntegrityError(f"shard {path} is listed in the manifest but missing; the store is damaged "
                                  "(delete the directory and cache again)")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise CacheIntegrityError(f"shard {path} has {size} bytes, the manifest says {shard['bytes']}: it was "
                                  "truncated or replaced (delete the directory and cache again)")
    digest = shard_sha256 if shard.get("digest") == TENSOR_DIGEST else file_sha256
    if hashed and digest(path) != shard["sha256"]:
        raise CacheIntegrityError(f"shard {path} does not match its sha256 in the manifest: its bytes were "
                                  "changed or shards were swapped (delete the directory and cache again)")


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: dict) -> None:
    """Write JSON to a temporary file, fsync it and rename it over `path`: readers see old or new."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        msg = f"writing {path} failed ({err}); the previous manifest is intact"
        raise CacheWriteError(err.errno, msg) from err
    fsync_dir(path.parent)


def read_manifest(directory: Path) -> dict | None:
    """The manifest in `directory`, or None when there is none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        msg = f"{path} is not valid JSON ({err.msg}); it was not written by neox_lab"
        raise CacheMismatchError(msg) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheMismatchError(f"{path} is not a neox_lab activation-cache manifest (format != {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise CacheMismatchError(f"{path} has format version {manifest.get('version')}; this neox_lab reads "
                                 f"version {VERSION}")
    return manifest


def _field(manifest: dict, key: tuple) -> Any:
    for part in key:
        manifest = manifest.get(part) if isinstance(manifest, dict) else None
    return manifest


def identity_sha256(manifest: dict, extra: tuple = ()) -> str:
    """A digest of the identity fields (`IDENTITY` and `extra`): equal exactly when `check_compatible`
    would accept one manifest for the other. Each shard records it, so a shard can be told apart from
    one written for another store."""
    fields = {".".join(key): _field(manifest, key) for key in IDENTITY + tuple(extra)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def read_safetensors_header(fh, path: Path) -> tuple[dict, int]:
    """The JSON header of an open safetensors file and where its data starts; `CacheIntegrityError`
    naming `path` when it is not one."""
    head = fh.read(8)
    if len(head) != 8:
        raise CacheIntegrityError(f"{path} is too short to be a safetensors file")
    n = int.from_bytes(head, "little")
    raw = fh.read(n) if n <= 100_000_000 else b""
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if len(raw) != n or not isinstance(header, dict):
        raise CacheIntegrityError(f"{path}: the safetensors header is damaged")
    return header, 8 + n


def check_compatible(existing: dict, expected: dict, where: Path, extra: tuple = ()) -> None:
    """Raise `CacheMismatchError` naming every identity field that differs between two manifests."""
    diffs = []
    for key in IDENTITY + tuple(extra):
        old, new = _field(existing, key), _field(expected, key)
        if old != new:
            diffs.append(f"{'.'.join(key)}: cache has {old!r}, this run {new!r}")
    if diffs:
        raise CacheMismatchError(
            f"{where} holds a cache that does not match this run ({'; '.join(diffs)}); "
            "use another output directory or delete this one"
        )
