"""The documents `cache_dataset` reads: text lines, jsonl records or token ids, fingerprinted and batched.

A source is read whole into memory (texts or id rows; tokenization happens per batch), so every rank of a
distributed run sees the same numbered list of documents and can take its own contiguous block of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SUFFIXES = (".txt", ".jsonl", ".npy")


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

    def sha256(self) -> str:
        """A digest of the documents themselves (not the file), so a resumed run can tell the data changed."""
        h = hashlib.sha256(b"text" if self.is_text else b"ids")
        for doc in self.docs:
            raw = doc.encode("utf-8") if self.is_text else np.asarray(doc, dtype=np.int64).tobytes()
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
        return h.hexdigest()

    def describe(self) -> dict:
        """The source entry of a manifest."""
        return {"kind": self.kind, "path": self.path, "text_field": self.text_field,
                "n_documents": len(self), "documents_sha256": self.sha256()}

    def token_rows(self, start: int, stop: int, tokenizer: Any, max_length: int) -> list[list[int]]:
        """Token ids of documents [start, stop), each cut to its first `max_length` tokens (an empty
        document gives an empty row)."""
        chunk = [self.docs[i] for i in range(start, stop)]
        if self.is_text:
            rows = [list(r) for r in tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]]
        else:
            rows = [[int(t) for t in np.asarray(doc).reshape(-1)[:max_length]] for doc in chunk]
        return rows


def _read_lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.rstrip("\r\n") for line in fh]
    except UnicodeDecodeError as err:
        raise ValueError(f"data file {path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it, "
                         "e.g. iconv -f latin1 -t utf-8") from None


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"{path}, line {number}: no {text_field!r} field "
                             "(choose the field with text_field= / --text-field)")
        if not isinstance(record[text_field], str):
            kind = type(record[text_field]).__name__
            raise ValueError(f"{path}, line {number}: field {text_field!r} is {kind}, not a string")
        texts.append(record[text_field])
    return texts


def _id_matrix(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be a 2-d integer array [document pos], "
                         f"got {array.dtype} {array.shape}")
    return array


def load_documents(source: Any, text_field: str = "text") -> Documents:
    """Read `source`: a .txt path (a document per line, blank lines skipped), a .jsonl path (the
    `text_field` of each record), a .npy path (a 2-d integer array, a document per row), a list of
    strings, or token ids (a list of id lists, or a 2-d integer tensor / array, a document per row).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return Documents("txt", [t for t in _read_lines(path) if t.strip()], str(source))
        if suffix == ".jsonl":
            return Documents("jsonl", _read_jsonl(path, text_field), str(source), text_field)
        if suffix == ".npy":
            # allow_pickle=False: an .npy of objects could run code on load.
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return Documents("npy", _id_matrix(array, f"{path}"), str(source))
        raise ValueError(f"data file {path}: unknown suffix {path.suffix!r}; expected one of {SUFFIXES}")
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
    raise TypeError(f"source must be a path, a list of strings or token ids, got {type(source).__name__}")


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
