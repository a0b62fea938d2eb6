"""`ShardWriter`: appends activation shards to one directory so that no kill or write error loses data.

Every shard is written under a temporary name, fsynced and renamed; the manifest is rewritten atomically
after each shard. On restart, the manifest says which documents are safely on disk, and work resumes at
the next document, which is always a batch boundary. A resume re-hashes the shards already written, so
it never builds on a damaged or swapped one.

Each shard also describes itself: its safetensors metadata holds its manifest entry, each tensor's
sha256 (taken before the file was written) and a digest of the store's identity (`SHARD_RECORD`). So a
finished shard the manifest does not list (a run killed between renaming the shard and recording it, or
a manifest replaced by an older copy) is checked against its own digests and taken back on resume
rather than recomputed, and nothing a run did not write is ever deleted: temporary files are, and a
finished-named shard only when it is provably damaged (not a readable safetensors file of its own
size, or bytes that differ from the digests it was written with); one from another store stops the
run with an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .lock import StoreLock
from .manifest import (
    MANIFEST,
    SAFETENSORS_DTYPES,
    TENSOR_DIGEST,
    CacheIntegrityError,
    CacheMismatchError,
    CacheWriteError,
    atomic_write_json,
    check_compatible,
    check_manifest,
    check_shard_file,
    fsync_dir,
    identity_sha256,
    read_manifest,
    read_safetensors_header,
    shard_digests,
    shard_path,
    tensors_sha256,
)

SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors(\.tmp)?$")
# safetensors >= 0.5 itself writes through a ".tmpXXXXXX" file next to the target; a kill can leave one.
LIBRARY_TMP_RE = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
#: The safetensors metadata key of a shard's own record: its manifest entry (without its size and
#: sha256, which are of the file itself), the cursor after it, the hooks' axes, each tensor's sha256 and
#: the store's identity.
SHARD_RECORD = "neox_lab.shard"


def write_shard_file(path: Path, tensors: dict[str, list[torch.Tensor]], metadata: dict[str, str],
                     digests: dict[str, bytes]) -> str:
    """Write a safetensors file of the concatenation of each name's parts, fsync it, and return its
    `tensors_sha256` from `digests` (each name's sha256, taken as the parts arrived).

    The parts are written where they lie: no concatenated copy, and no pass over the data for its hash.
    The layout is safetensors' own (an 8-byte header length, the JSON header padded to 8 bytes, the tensors
    in order of decreasing item size then name), so `safe_open` reads it; the header's keys are in a
    fixed order, so equal shards are equal bytes.
    """
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    names = sorted(tensors, key=lambda name: (-tensors[name][0].element_size(), name))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in names:
        parts = tensors[name]
        size = sum(p.numel() for p in parts) * parts[0].element_size()
        shape = [sum(p.shape[0] for p in parts), *parts[0].shape[1:]]
        header[name] = {"dtype": codes[parts[0].dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    block = len(raw).to_bytes(8, "little") + raw
    with open(path, "wb") as fh:
        fh.write(block)
        for name in names:
            for part in tensors[name]:
                if part.numel():
                    fh.write(_bytes(part))  # write releases the GIL: the next forward runs meanwhile
        fh.flush()
        os.fsync(fh.fileno())
    return tensors_sha256(block, [digests[name] for name in names])


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


class ShardWriter:
    """Writes the shards of documents ``doc_range`` to `directory`, under the identity in `header`."""

    def __init__(self, directory: Path, header: dict, extra_identity: tuple = (), backend: str = "",
                 allow_backend_change: bool = False, fill_header: Callable[[dict], None] | None = None):
        """`fill_header`, when given, completes `header` (with fields slow to compute, e.g. the weights'
        fingerprint): called before the directory's manifest is first read against it or written, so a
        fresh directory's manifest is written with the first shard and the call overlaps the first batches."""
        self.dir, self.backend, self.allow_backend_change = Path(directory), backend, allow_backend_change
        self.dir.mkdir(parents=True, exist_ok=True)
        self.header, self.extra_identity, self._fill = header, extra_identity, fill_header
        self._unwritten = False  # a fresh manifest waiting for `fill_header`
        self.identity: str | None = None  # identity_sha256 of the complete header
        self.lock = StoreLock(self.dir)
        try:
            self._open(extra_identity)
        except BaseException:
            self.lock.release()
            raise
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.hashes: dict[str, hashlib._Hash] = {}  # sha256 of each pending tensor, taken as parts arrive
        self.pending_tokens = self.pending_docs = 0
        self.pending_offset = self.manifest["next_offset"]

    # ------------------------------------------------------------------ start / resume
    def _complete_header(self) -> None:
        """Run `fill_header` once; write a fresh manifest that waited for it."""
        if self._fill is not None:
            self._fill(self.header)
            self._fill = None
            if self._unwritten:
                self.manifest["model"] = self.header["model"]
                atomic_write_json(self.dir / MANIFEST, self.manifest)
                self._unwritten = False
        self.identity = identity_sha256(self.header, self.extra_identity)

    def _open(self, extra_identity: tuple) -> None:
        existing = read_manifest(self.dir)
        if existing is None:
            if any(SHARD_RE.match(p.name) and not p.name.endswith(".tmp") for p in self.dir.iterdir()):
                raise CacheMismatchError(f"{self.dir} holds shard files but no {MANIFEST}; refusing to "
                                         "overwrite them (use another output directory)")
            self.manifest = {**self.header, "hooks": {}, "shards": [], "n_tokens": 0, "n_documents": 0,
                             "next_offset": 0, "completed": False}
            self._clean(ours=False)
            self._unwritten = self._fill is not None
            if self._unwritten:
                return  # written with the first shard, once the header is complete
            atomic_write_json(self.dir / MANIFEST, self.manifest)
            self._complete_header()
            return
        self._complete_header()
        check_compatible(existing, self.header, self.dir, extra_identity)
        check_manifest(existing, self.dir)
        old, new = existing.get("runtime"), self.header.get("runtime")
        if old != new and existing["shards"] and not existing["completed"] and not self.allow_backend_change:
            raise CacheMismatchError(
                f"{self.dir} was started with attention backend/device {old}, this run uses {new}; kernels "
                "differ in rounding, so the store would mix them. Resume with the same backend and device, "
                "or pass allow_backend_change=True (--allow-backend-change) to accept it (each shard "
                "records its backend)")
        progress = ("hooks", "shards", "n_tokens", "n_documents", "completed")
        self.manifest = {**self.header, **{k: existing[k] for k in progress},
                         "next_offset": existing.get("next_offset", 0)}
        # Hash what a resumed store builds on: reading it back costs about a second per 1.5 GB, and a
        # flipped byte or a swapped shard found now is cheaper than a store that fails when read.
        for shard in self.manifest["shards"]:
            check_shard_file(shard_path(self.dir, shard["file"], self.dir / MANIFEST), shard, hashed=True)
        if not self.completed:
            self._adopt()
        self._clean()

    def _record(self, path: Path) -> dict | None:
        """The self-description of a shard file, {} when it has none, None when it is not a readable
        safetensors file of its own size (damaged: a finished name is given only after fsync)."""
        try:
            with open(path, "rb") as fh:
                header, data_start = read_safetensors_header(fh, path)
            ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
            if data_start + max(ends, default=0) != path.stat().st_size:
                return None
            raw = (header.get("__metadata__") or {}).get(SHARD_RECORD)
            record = json.loads(raw) if raw is not None else {}
        except (OSError, ValueError, TypeError, KeyError, IndexError, CacheIntegrityError):
            return None
        if not isinstance(record, dict):
            return None
        lengths = {tuple(info["shape"][:1]) for name, info in header.items() if name != "__metadata__"}
        if record and lengths != {(record.get("n_tokens"),)}:
            return None  # tensors disagree with the record: not a shard as it was written
        return record

    def _adopt(self) -> None:
        """Take back the finished shards that continue the manifest's list but are not in it: a run killed
        after renaming a shard and before recording it, or a manifest replaced by an older copy. Each is
        checked against its own record (this store's identity, the next index, token and document) and
        hashed now; the manifest is rewritten once."""
        m, adopted = self.manifest, 0
        while True:
            index = len(m["shards"])
            path = self.dir / shard_name(index)
            record = self._record(path) if path.is_file() else None
            if not record or record.get("identity") != self.identity or record.get("index") != index or \
                    record.get("first_token") != m["n_tokens"] or record.get("first_doc") != self.next_doc:
                break
            header_block, digests = shard_digests(path)
            if {name: d.hex() for name, d in digests} != record.get("tensors_sha256"):
                path.unlink()  # its bytes differ from what was hashed when it was written: damaged
                break
            m["shards"].append({"file": path.name, "first_token": record["first_token"],
                                "n_tokens": record["n_tokens"], "first_doc": record["first_doc"],
                                "n_docs": record["n_docs"], "bytes": path.stat().st_size,
                                "sha256": tensors_sha256(header_block, [d for _, d in digests]),
                                "digest": TENSOR_DIGEST, "backend": record["backend"]})
            m["n_tokens"] += record["n_tokens"]
            m["n_documents"] += record["n_docs"]
            m["next_offset"] = record["next_offset"]
            m["hooks"] = m["hooks"] or record["hooks"]
            adopted += 1
        if adopted:
            atomic_write_json(self.dir / MANIFEST, m)
            warnings.warn(f"{self.dir}: {adopted} finished shard(s) were on disk but not in {MANIFEST} (a run "
                          "killed while recording them, or the manifest was replaced by an older copy); they "
                          "match this store and were checked, hashed and kept", stacklevel=4)

    def _clean(self, ours: bool = True) -> None:
        """Delete the temporary files of an interrupted run; deal with finished-named shards the manifest
        does not list: a damaged one is deleted, one this store wrote later in its run (past a gap) is left
        to be rewritten with the same bytes, and any other stops the run.

        Before this directory holds a manifest only our own temporary names are touched.
        """
        listed = {s["file"] for s in self.manifest["shards"]}
        foreign = []
        for path in sorted(self.dir.iterdir()):
            match = SHARD_RE.match(path.name)
            if match and not match.group(2) and path.name not in listed:
                record = self._record(path)
                if record is None:
                    path.unlink()  # provably damaged
                elif record.get("identity") != self.identity:
                    foreign.append(path.name)
            elif (match and match.group(2)) or path.name == MANIFEST + ".tmp" or \
                    (ours and LIBRARY_TMP_RE.match(path.name)):
                path.unlink()
        if foreign:
            raise CacheIntegrityError(
                f"{self.dir} holds shard files its {MANIFEST} does not list and that were not written for "
                f"this store ({', '.join(foreign[:4])}{' ...' if len(foreign) > 4 else ''}); refusing to "
                "delete them: move them out of the directory, then rerun to resume")

    @property
    def completed(self) -> bool:
        return bool(self.manifest["completed"])

    @property
    def next_doc(self) -> int:
        """The first document not yet safely on disk."""
        return self.header["doc_range"][0] + self.manifest["n_documents"]

    @property
    def cursor(self) -> tuple[int, int]:
        """Where writing resumes: the next document, and how many of its tokens are already on disk
        (nonzero only when packed windows split a document across shards)."""
        return self.next_doc, int(self.manifest["next_offset"])

    # ------------------------------------------------------------------ writing
    def add(self, tensors: dict[str, torch.Tensor], n_docs: int, offset: int = 0) -> None:
        """Queue one batch: per-token tensors [n_tokens ...] under each name, finishing `n_docs` documents
        and ending `offset` tokens into the next one."""
        for name, t in tensors.items():
            self.pending.setdefault(name, []).append(t)
            digest = self.hashes.setdefault(name, hashlib.sha256())
            if t.numel():
                digest.update(_bytes(t))  # releases the GIL: hashed while the next forward runs
        self.pending_tokens += int(tensors["token_ids"].shape[0])
        self.pending_docs += n_docs
        self.pending_offset = offset

    def flush(self, axes: dict[str, list[str]]) -> None:
        """Write the queued batches as the next shard (a no-op when nothing is queued)."""
        if not self.pending:
            return
        self._complete_header()
        index = len(self.manifest["shards"])
        final = self.dir / shard_name(index)
        tmp = final.with_name(final.name + ".tmp")
        m = self.manifest
        if not m["hooks"]:
            m["hooks"] = {name: {"axes": axes[name], "shape": list(self.pending[name][0].shape[1:])}
                          for name in axes}
        entry = {"file": final.name, "first_token": m["n_tokens"], "n_tokens": self.pending_tokens,
                 "first_doc": self.next_doc, "n_docs": self.pending_docs, "backend": self.backend}
        digests = {name: h.digest() for name, h in self.hashes.items()}
        record = {**entry, "index": index, "next_offset": self.pending_offset, "hooks": m["hooks"],
                  "identity": self.identity, "tensors_sha256": {name: d.hex() for name, d in digests.items()}}
        metadata = {"format": "pt", SHARD_RECORD: json.dumps(record, sort_keys=True)}
        try:
            digest = write_shard_file(tmp, self.pending, metadata, digests)
            size = tmp.stat().st_size
            os.replace(tmp, final)
        except Exception as err:
            tmp.unlink(missing_ok=True)
            msg = (f"writing shard {final} failed ({err}); {index} complete shard(s) and the manifest in "
                   f"{self.dir} are intact: free space and rerun to resume")
            code = getattr(err, "errno", None)
            raise (CacheWriteError(code, msg) if code is not None else CacheWriteError(msg)) from err
        fsync_dir(self.dir)
        self._commit({**entry, "bytes": size, "sha256": digest, "digest": TENSOR_DIGEST})

    def _commit(self, shard: dict) -> None:
        """Record the queued shard and progress in the manifest."""
        m, saved = self.manifest, (self.manifest["n_tokens"], self.manifest["n_documents"],
                                   self.manifest["next_offset"])
        m["shards"].append(shard)
        m["n_tokens"] += self.pending_tokens
        m["n_documents"] += self.pending_docs
        m["next_offset"] = self.pending_offset
        try:
            atomic_write_json(self.dir / MANIFEST, m)
        except CacheWriteError:
            # A shard is on disk but unlisted: a resumed run deletes and rewrites it.
            m["shards"].pop()
            m["n_tokens"], m["n_documents"], m["next_offset"] = saved
            raise
        self.pending, self.hashes, self.pending_tokens, self.pending_docs = {}, {}, 0, 0

    def finish(self) -> dict:
        """Mark this directory's part complete; returns its manifest."""
        self._complete_header()
        self.manifest["completed"] = True
        atomic_write_json(self.dir / MANIFEST, self.manifest)
        return self.manifest

    def close(self) -> None:
        """End the run: release the lock (held since the writer was made)."""
        self.lock.release()
