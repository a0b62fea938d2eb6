"""The documents `cache_dataset` reads, fingerprinted and numbered: files, datasets, lists and iterators.

Two shapes of source, one interface (`iter_docs`, `describe`, `n_documents`, `is_text`):

  Documents       in memory: a list of strings, token-id rows, or a .npy file (memory-mapped)
  DocumentStream  streamed, one document at a time: .txt / .jsonl (also .gz / .zst compressed), Parquet
                  files and folders, `datasets.Dataset` / `IterableDataset` / a saved dataset folder, and
                  plain iterators of strings. A re-readable stream is read once up front to count and
                  fingerprint its documents; memory stays flat in the corpus size.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .formats import (
    corpus_files,
    is_dataset_dir,
    is_hf_dataset,
    iter_files,
    iter_hf_dataset,
    iter_jsonl,
    iter_lines,
    iter_parquet,
    load_dataset_dir,
    text_suffix,
)

_END = object()
SUFFIXES = (".txt", ".jsonl", ".npy", ".parquet", ".txt.gz", ".txt.zst", ".jsonl.gz", ".jsonl.zst")


@dataclass
class Documents:
    """A numbered list of documents: texts (`kind` "txt", "jsonl", "texts") or token-id rows."""

    kind: str
    docs: Sequence
    path: str | None = None
    text_field: str | None = None

    @property
    def is_text(self) -> bool:
        return self.kind in ("txt", "jsonl", "texts")

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def n_documents(self) -> int:
        return len(self.docs)

    def iter_docs(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Any]]:
        """``(index, document)`` for documents [start, stop)."""
        stop = len(self.docs) if stop is None else min(stop, len(self.docs))
        for i in range(start, stop):
            yield i, self.docs[i]

    def sha256(self) -> str:
        """A digest of the documents themselves (not the file), so a resumed run can tell the data changed."""
        return fingerprint(self.docs, self.is_text)[1]

    def describe(self) -> dict:
        """The source entry of a manifest."""
        return {"kind": self.kind, "path": self.path, "text_field": self.text_field,
                "n_documents": len(self), "documents_sha256": self.sha256()}


def fingerprint(docs: Iterable, is_text: bool) -> tuple[int, str]:
    """``(count, sha256)`` of documents (their parsed content, not the file's bytes), in one pass."""
    h = hashlib.sha256(b"text" if is_text else b"ids")
    count = 0
    for doc in docs:
        raw = doc.encode("utf-8") if is_text else np.asarray(doc, dtype=np.int64).tobytes()
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
        count += 1
    return count, h.hexdigest()


class DocumentStream:
    """Text documents read one at a time from `reader(start)`, which yields ``(index, text)`` from `start`.

    A re-readable source (a file, a folder, a dataset) is read once here to count and fingerprint its
    documents, so a resumed or distributed run can check it sees the same data. A one-shot iterator can
    be read only once: it has no count and no fingerprint, and cannot resume or be split across ranks.
    """

    is_text = True

    def __init__(self, kind: str, reader: Callable[[int], Iterator[tuple[int, str]]], *, path: str | None = None,
                 text_field: str | None = None, reiterable: bool = True):
        self.kind, self.path, self.text_field, self.reiterable = kind, path, text_field, reiterable
        self._reader, self._used = reader, False
        self._read, self._hash = 0, hashlib.sha256(b"text")
        self.n_documents: int | None = None
        self.digest: str | None = None
        if reiterable:
            self.n_documents, self.digest = fingerprint((text for _, text in reader(0)), True)

    def __len__(self) -> int:
        if self.n_documents is None:
            raise TypeError(f"a {self.kind} source has no length (it can be read only once)")
        return self.n_documents

    def sha256(self) -> str | None:
        return self.digest

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "text_field": self.text_field,
                "n_documents": self.n_documents, "documents_sha256": self.digest}

    def iter_docs(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, str]]:
        """``(index, text)`` for documents [start, stop) (stop None: to the end)."""
        if not self.reiterable:
            if self._used or start:
                raise ValueError(f"a {self.kind} source can be read only once, from its start; pass a file, "
                                 "a folder or a dataset to resume or to split the work")
            self._used = True
        for index, text in self._reader(start):
            if stop is not None and index >= stop:
                return
            if not self.reiterable:
                raw = text.encode("utf-8")
                self._hash.update(len(raw).to_bytes(8, "little"))
                self._hash.update(raw)
                self._read = index + 1
            yield index, text

    def consumed(self) -> tuple[int, str]:
        """Documents read so far from a one-shot iterator, and their digest (as `sha256` of a list)."""
        return self._read, self._hash.hexdigest()


def _iterator_reader(iterator: Iterator) -> Callable[[int], Iterator[tuple[int, str]]]:
    def read(start: int) -> Iterator[tuple[int, str]]:
        for index, text in enumerate(iterator):
            if not isinstance(text, str):
                raise ValueError(f"item {index} of the iterator is {type(text).__name__}, not a string")
            yield index, text
    return read


def _path_source(path: Path, source: Any, text_field: str) -> Documents | DocumentStream:
    if path.is_dir():
        if is_dataset_dir(path):
            ds = load_dataset_dir(path)
            return DocumentStream("dataset", lambda s: iter_hf_dataset(ds, text_field, s), path=str(source),
                                  text_field=text_field)
        kind, files = corpus_files(path)
        if kind == "parquet":
            reader = lambda s: iter_parquet(files, text_field, s)
        elif kind.startswith("jsonl"):
            reader = lambda s: iter_files(files, lambda f: iter_jsonl(f, text_field), s)
        else:
            reader = lambda s: iter_files(files, iter_lines, s)
        return DocumentStream(kind, reader, path=str(source), text_field=text_field if kind != "txt" else None)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = text_suffix(path)
    if suffix in (".txt", ".txt.gz", ".txt.zst"):
        return DocumentStream(suffix[1:], lambda s: iter_lines(path, s), path=str(source))
    if suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        return DocumentStream(suffix[1:], lambda s: iter_jsonl(path, text_field, s), path=str(source),
                              text_field=text_field)
    if suffix == ".parquet":
        return DocumentStream("parquet", lambda s: iter_parquet([path], text_field, s), path=str(source),
                              text_field=text_field)
    if suffix == ".npy":
        # allow_pickle=False: an .npy of objects could run code on load.
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return Documents("npy", _id_matrix(array, f"{path}"), str(source))
    raise ValueError(f"data file {path}: unknown suffix {suffix!r}; expected one of {SUFFIXES}, "
                     "a folder of .parquet files or a saved `datasets` folder")


def _id_matrix(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be a 2-d integer array [document pos], "
                         f"got {array.dtype} {array.shape}")
    return array


def load_documents(source: Any, text_field: str = "text") -> Documents | DocumentStream:
    """Open `source` for caching.

    Paths: .txt (a document per non-blank line), .jsonl (the `text_field` of each record), either one
    compressed as .gz or .zst; .parquet (column `text_field`); a folder of files of one of these kinds
    (read in sorted path order, numbered across files); a folder saved by `datasets` (`save_to_disk`);
    .npy (a 2-d integer array, a document per row). Objects: a `datasets.Dataset` or `IterableDataset`
    (column `text_field`), a list of strings, token ids (a list of id lists, or a 2-d integer tensor /
    array, a document per row), or an iterator of strings.
    """
    if isinstance(source, (str, os.PathLike)):
        return _path_source(Path(source), source, text_field)
    if is_hf_dataset(source):
        kind = "dataset" if type(source).__name__ == "Dataset" else "iterable_dataset"
        return DocumentStream(kind, lambda s: iter_hf_dataset(source, text_field, s), text_field=text_field)
    if isinstance(source, torch.Tensor):
        return Documents("token_ids", _id_matrix(source.detach().cpu().numpy(), "a token-id tensor"))
    if isinstance(source, np.ndarray):
        return Documents("token_ids", _id_matrix(source, "a token-id array"))
    if isinstance(source, (list, tuple)):
        if all(isinstance(d, str) for d in source):
            return Documents("texts", list(source))
        rows = []
        for i, doc in enumerate(source):
            row = np.asarray(doc.cpu() if isinstance(doc, torch.Tensor) else doc)
            if row.ndim != 1 or not (np.issubdtype(row.dtype, np.integer) or row.size == 0):
                raise ValueError(f"document {i}: expected a 1-d sequence of token ids, "
                                 f"got {row.dtype} {row.shape}")
            rows.append(row.astype(np.int64))
        return Documents("token_ids", rows)
    if isinstance(source, Iterator):
        # Peek: an exhausted iterator must be refused like an empty list, not cached as an empty store.
        first = next(source, _END)
        stream = DocumentStream("iterator", _iterator_reader(itertools.chain([first], source)
                                                             if first is not _END else iter(())),
                                reiterable=False)
        if first is _END:
            stream.n_documents = 0
        return stream
    raise TypeError(f"source must be a path, a dataset, a list of strings or token ids, or an iterator of "
                    f"strings; got {type(source).__name__}")


def pad_right(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` [batch pos], padded on the right with id 0 and mask 0.

    Right padding keeps every real token at its own position, and causal attention never lets a real
    token see the padding after it; the pad id is irrelevant because padded positions are masked and dropped.
    """
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A digest of a tokenizer's vocabulary and special-token settings (None without a tokenizer)."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    for attr in ("add_bos_token", "add_eos_token", "bos_token", "eos_token", "truncation_side",
                 "add_prefix_space"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)!r};".encode())
    return h.hexdigest()
