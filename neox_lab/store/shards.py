"""`ShardWriter`: appends activation shards to one directory so that no kill or write error loses data.

Every shard is written under a temporary name, fsynced and renamed; the manifest is rewritten atomically
after each shard. On restart, the manifest says which documents are safely on disk; stray files from the
interrupted shard are deleted and work resumes at the next document, which is always a batch boundary.
A resume re-hashes the shards already written, so it never builds on a damaged or swapped one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import safetensors.torch
import torch

from .manifest import (
    MANIFEST,
    CacheBusyError,
    CacheMismatchError,
    CacheWriteError,
    atomic_write_json,
    check_compatible,
    check_manifest,
    check_shard_file,
    file_sha256,
    fsync_dir,
    read_manifest,
    shard_path,
)

SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors(\.tmp)?$")
# safetensors >= 0.5 itself writes through a ".tmpXXXXXX" file next to the target; a kill can leave one.
LIBRARY_TMP_RE = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


class _Lock:
    """An exclusive advisory flock on `directory/.lock`, held from the start of a run to its end and
    released by the OS if the process dies.

    The file is never deleted: unlinking it while a second process has it open but not yet locked would
    let that process lock the orphaned inode while a third locks a fresh file, two holders at once.
    """

    def __init__(self, directory: Path):
        self.path, self.fd = directory / ".lock", None
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unguarded
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            msg = f"another process is writing the cache in {directory} (it holds {self.path})"
            raise CacheBusyError(msg) from None

    def release(self) -> None:
        if self.fd is None:
            return
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None


class ShardWriter:
    """Writes the shards of documents ``doc_range`` to `directory`, under the identity in `header`."""

    def __init__(self, directory: Path, header: dict, extra_identity: tuple = (), backend: str = "",
                 allow_backend_change: bool = False):
        self.dir, self.backend, self.allow_backend_change = Path(directory), backend, allow_backend_change
        self.dir.mkdir(parents=True, exist_ok=True)
        self.header = header
        self.lock = _Lock(self.dir)
        try:
            self._open(extra_identity)
        except BaseException:
            self.lock.release()
            raise
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.pending_tokens = self.pending_docs = 0
        self.pending_offset = self.manifest["next_offset"]

    # ------------------------------------------------------------------ start / resume
    def _open(self, extra_identity: tuple) -> None:
        existing = read_manifest(self.dir)
        if existing is None:
            if any(SHARD_RE.match(p.name) and not p.name.endswith(".tmp") for p in self.dir.iterdir()):
                raise CacheMismatchError(f"{self.dir} holds shard files but no {MANIFEST}; refusing to "
                                         "overwrite them (use another output directory)")
            self.manifest = {**self.header, "hooks": {}, "shards": [], "n_tokens": 0, "n_documents": 0,
                             "next_offset": 0, "completed": False}
            self._clean(ours=False)
            atomic_write_json(self.dir / MANIFEST, self.manifest)
            return
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
        self._clean()

    def _clean(self, ours: bool = True) -> None:
        """Delete temporary files and shards the manifest does not list (a run killed mid-shard).

        Before this directory holds a manifest only our own temporary names are touched.
        """
        listed = {s["file"] for s in self.manifest["shards"]}
        for path in self.dir.iterdir():
            stray = SHARD_RE.match(path.name) and path.name not in listed
            if stray or path.name == MANIFEST + ".tmp" or (ours and LIBRARY_TMP_RE.match(path.name)):
                path.unlink()

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
        self.pending_tokens += int(tensors["token_ids"].shape[0])
        self.pending_docs += n_docs
        self.pending_offset = offset

    def flush(self, axes: dict[str, list[str]]) -> None:
        """Write the queued batches as the next shard (a no-op when nothing is queued)."""
        if not self.pending:
            return
        tensors = {name: torch.cat(parts).contiguous() for name, parts in self.pending.items()}
        index = len(self.manifest["shards"])
        final = self.dir / shard_name(index)
        tmp = final.with_name(final.name + ".tmp")
        try:
            safetensors.torch.save_file(tensors, os.fspath(tmp), metadata={"format": "pt"})
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            digest, size = file_sha256(tmp), tmp.stat().st_size
            os.replace(tmp, final)
        except Exception as err:  # safetensors reports I/O errors as SafetensorError, not OSError
            tmp.unlink(missing_ok=True)
            msg = (f"writing shard {final} failed ({err}); {index} complete shard(s) and the manifest in "
                   f"{self.dir} are intact: free space and rerun to resume")
            code = getattr(err, "errno", None)
            raise (CacheWriteError(code, msg) if code is not None else CacheWriteError(msg)) from err
        fsync_dir(self.dir)
        m = self.manifest
        if not m["hooks"]:
            m["hooks"] = {name: {"axes": axes[name], "shape": list(tensors[name].shape[1:])} for name in axes}
        self._commit({"file": final.name, "first_token": m["n_tokens"], "n_tokens": self.pending_tokens,
                      "first_doc": self.next_doc, "n_docs": self.pending_docs, "bytes": size, "sha256": digest,
                      "backend": self.backend})

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
        self.pending, self.pending_tokens, self.pending_docs = {}, 0, 0

    def finish(self) -> dict:
        """Mark this directory's part complete; returns its manifest."""
        self.manifest["completed"] = True
        atomic_write_json(self.dir / MANIFEST, self.manifest)
        return self.manifest

    def close(self) -> None:
        """End the run: release the lock (held since the writer was made)."""
        self.lock.release()
