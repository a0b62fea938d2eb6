"""Tensors of checkpoint files: safetensors headers checked against the file, tensors read into memory
the model owns, and the identity of a file that offloaded weights are read from at every forward.

A loaded model must not change when its checkpoint file does. Memory-mapping the file (what
`safetensors.safe_open` and `torch.load(mmap=True)` give) would make the weights views of the page
cache: copying another checkpoint over the file would silently turn the model into that one, and
truncating it would kill the process with SIGBUS at the next forward. So every tensor is read into
memory of its own (one copy, tensor by tensor); weights offloaded to "disk" are read from the file at
each forward by design, and there the file's identity is checked before every read (`OffloadCheck`).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from ..files import file_identity


class CheckpointError(ValueError):
    """A checkpoint does not fit the model or is damaged: names the file and the tensors at fault."""


#: Tensor dtypes of safetensors files, by their header code.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class StoredTensor:
    """One tensor of a safetensors file, located by its header (nothing is read)."""

    def __init__(self, path: Path, key: str, dtype: torch.dtype, shape: tuple, start: int, end: int):
        self.path, self.key, self.dtype, self.shape, self.start, self.end = path, key, dtype, shape, start, end

    def read(self) -> torch.Tensor:
        """A CPU tensor of its own memory holding the stored values, read with plain file I/O."""
        n = self.end - self.start
        buf = torch.empty(n, dtype=torch.uint8)
        with open(self.path, "rb") as fh:
            fh.seek(self.start)
            got = fh.readinto(memoryview(buf.numpy())) if n else 0
        if got != n:
            raise CheckpointError(f"{self.path}: tensor {self.key!r} should be {n:,} bytes at offset {self.start:,} "
                                  f"but the file ends after {got:,} of them; the file was truncated (or changed "
                                  "while being read)")
        return buf.view(self.dtype).view(self.shape) if n else torch.empty(self.shape, dtype=self.dtype)


def stored_tensors(path: Path) -> list[StoredTensor]:
    """Every tensor of a safetensors file, located from its header, each checked against the header's
    dtype and shape and the file's size: a truncated or inconsistent file is a `CheckpointError` naming
    the first tensor that does not fit, before anything is read."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path} is not a readable safetensors file: too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path} is not a readable safetensors file: its header says {n:,} bytes but "
                                  f"the file holds {size:,}; it was truncated or is not safetensors")
        try:
            header = json.loads(fh.read(n))
        except ValueError as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: bad header ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a readable safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    base, out = 8 + n, []
    for key, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: the header entry of tensor {key!r} is malformed ({info!r})") from None
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {code}, which neox_lab does not load")
        dtype = SAFETENSORS_DTYPES[code]
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= begin <= end:
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed shape {shape} or offsets {begin}..{end}")
        want = math.prod(shape) * dtype.itemsize
        if end - begin != want:
            raise CheckpointError(f"{path}: tensor {key!r} is {code} {list(shape)}, {want:,} bytes, but its header "
                                  f"gives it {end - begin:,}; the file is damaged")
        if base + end > size:
            raise CheckpointError(f"{path}: tensor {key!r} ends at byte {base + end:,} but the file holds {size:,} "
                                  "bytes; the file was truncated")
        out.append(StoredTensor(path, key, dtype, shape, base + begin, base + end))
    return out


def owned(t: torch.Tensor, mapped: torch.Tensor | None) -> torch.Tensor:
    """`t`, copied if it still views the storage of `mapped` (a memory-mapped file's tensor)."""
    if mapped is not None and t.untyped_storage().data_ptr() == mapped.untyped_storage().data_ptr():
        return t.clone()
    return t


class OffloadCheck(Mapping):
    """accelerate's map of the weights it reads from checkpoint files at each forward ("disk" offload),
    checked: before every read the file must be the one that was loaded (`file_identity`), and the first
    read of each tensor is checked by `first_read(key, tensor)` (its shape, inf/NaN), so a file that
    changed or damage in an offloaded block is an error naming the file or tensor, not other weights or
    NaN logits. Each read is a tensor of its own memory, aligned as torch allocates."""

    def __init__(self, loader: Mapping, first_read: Callable[[str, torch.Tensor], None]):
        self.loader, self.first_read = loader, first_read
        self.refresh()

    def refresh(self) -> None:
        """Take the loader's index as it is now: after `load_checkpoint_` pointed offloaded tensors at
        another checkpoint's files, those files are the ones checked, and each tensor's first read is
        checked again."""
        index = getattr(self.loader, "index", {})
        files = {info["safetensors_file"] for info in index.values() if info.get("safetensors_file")}
        self.identity = {path: file_identity(path) for path in files}
        self.file_of = {key: info.get("safetensors_file") for key, info in index.items()}
        self.checked = set()

    def __getattr__(self, name: str):
        # Everything else (`index`, `state_dict`, `save_folder`) is accelerate's loader's: code that edits
        # the offload map in place (reload.py) reaches it through the check.
        if name == "loader":  # not set yet: no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self.file_of.get(key)
        if path is not None:
            try:
                now = file_identity(path)
            except FileNotFoundError:
                now = None
            if now != self.identity[path]:
                raise CheckpointError(f"checkpoint file {path} changed (or was removed) since the model was "
                                      f"loaded; the weights offloaded to disk ({key} ...) are read from it at "
                                      "each forward, so load the model again")
        # accelerate reads a safetensors file through a memory map, so a tensor starts wherever the file puts
        # it: often off the 64-byte boundary torch's allocator keeps. CPU matmul kernels reduce in an order
        # that can depend on alignment, and such a weight gave logits 1 ulp off the in-memory model's. A
        # copy of our own restores the in-memory bits (and leaves the page cache at once).
        t = self.loader[key].clone()
        if key not in self.checked:
            self.first_read(key, t)
            self.checked.add(key)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)
