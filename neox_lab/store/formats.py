"""Streaming readers of the file formats corpora come in: text lines, JSON lines (plain, .gz, .zst),
Parquet files or folders of them, and Hugging Face `datasets` objects.

Every reader yields ``(index, document)`` pairs from a given document index on, holding one record (or one
Parquet record batch) in memory at a time, so memory stays flat however large the corpus is. The
optional packages (`pyarrow`, `zstandard`, `datasets`, the ``corpus`` extra) are imported only here, inside
the functions that need them.
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import os
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXTRA_HINT = "install the optional extra: pip install 'neox-lab[corpus]'"
#: Rows per Parquet record batch: bounds memory to a few MB of text whatever the row-group size.
PARQUET_BATCH_ROWS = 1024


def optional_import(module: str, what: str) -> Any:
    """Import an optional package, or raise `ImportError` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs the {module.split('.')[0]!r} package; {EXTRA_HINT}") from None


def text_suffix(path: Path) -> str:
    """The document suffix of a file name, compression included: ".jsonl.zst", ".txt.gz", ".parquet"."""
    name = path.name.lower()
    for compressed in (".zst", ".gz"):
        if name.endswith(compressed):
            inner = Path(name[: -len(compressed)]).suffix
            return inner + compressed
    return path.suffix.lower()


class DamagedCorpusError(ValueError):
    """A corpus file is truncated or corrupt: names the file and the byte offset where reading failed."""


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame, that raises `DamagedCorpusError` when the
    file ends inside a frame or holds bytes zstd cannot decode. (zstandard's own stream reader ends
    quietly at a truncated frame, which would read as a shorter corpus.)"""

    def __init__(self, path: Path):
        self.zstandard = optional_import("zstandard", f"reading {path}")
        self.path, self.raw = path, open(path, "rb")  # noqa: SIM115 -- closed by close()
        self.pos = 0  # offset in the file of `self.input`'s first byte
        self.input, self.frame, self.frame_start = b"", None, 0
        self.out, self.taken = memoryview(b""), 0  # decompressed bytes, and how many were handed on

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.taken == len(self.out):
            if not self.input:
                self.input = self.raw.read(1 << 16)  # bounded: decompressed output grows with the ratio
                if not self.input:
                    if self.frame is not None:
                        raise DamagedCorpusError(
                            f"data file {self.path} is truncated: it ends at byte {self.pos} inside the zstd "
                            f"frame that starts at byte {self.frame_start}")
                    return 0
            if self.frame is None:
                self.frame, self.frame_start = self.zstandard.ZstdDecompressor().decompressobj(), self.pos
            data, self.input = self.input, b""
            try:
                self.out, self.taken = memoryview(self.frame.decompress(data)), 0
            except self.zstandard.ZstdError as err:
                raise DamagedCorpusError(f"data file {self.path} is corrupt: zstd cannot decode the frame that "
                                         f"starts at byte {self.frame_start} ({err})") from None
            self.pos += len(data)
            if self.frame.eof:  # the next frame starts in what this one did not use
                self.input = self.frame.unused_data
                self.pos -= len(self.input)
                self.frame = None
        n = min(len(buffer), len(self.out) - self.taken)
        buffer[:n] = self.out[self.taken : self.taken + n]
        self.taken += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_text(path: Path) -> io.TextIOBase:
    """`path` opened for reading text, decompressing .gz and .zst on the fly (a truncated or corrupt
    compressed file raises `DamagedCorpusError` when read)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    if name.endswith(".zst"):
        # Many frames per file is the norm: the Pile's files and `zstd --rsyncable` output hold many.
        return io.TextIOWrapper(io.BufferedReader(_ZstdFrames(path), buffer_size=1 << 16), encoding="utf-8")
    return open(path, encoding="utf-8")


def _compressed_offset(fh: io.TextIOBase) -> int | None:
    """Where in the compressed file a .gz reader stopped."""
    raw = getattr(getattr(fh, "buffer", None), "fileobj", None)
    try:
        return raw.tell() if raw is not None else None
    except (OSError, ValueError):
        return None


def _utf8_lines(path: Path) -> Iterator[str]:
    """The lines of a (possibly compressed) text file; a non-UTF-8, truncated or corrupt file raises
    `ValueError` naming it."""
    with open_text(path) as fh:
        try:
            yield from fh
        except UnicodeDecodeError as err:
            raise ValueError(f"data file {path} is not UTF-8 text ({err.reason} at byte {err.start} of a block); "
                             "convert it, e.g. iconv -f latin1 -t utf-8") from None
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            offset = _compressed_offset(fh)
            where = f" (reading stopped at byte {offset})" if offset is not None else ""
            what = "truncated" if isinstance(err, EOFError) else "corrupt"
            raise DamagedCorpusError(f"data file {path} is {what}{where}: {err}") from None


def iter_lines(path: Path, start: int = 0) -> Iterator[tuple[int, str]]:
    """Non-blank lines of a text file, numbered from 0 (blank lines are not documents)."""
    index = 0
    for line in _utf8_lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if index >= start:
            yield index, line
        index += 1


def iter_jsonl(path: Path, text_field: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """The `text_field` of each record of a JSON-lines file (blank lines skipped), numbered from 0."""
    index = 0
    for number, line in enumerate(_utf8_lines(path), start=1):
        if not line.strip():
            continue
        if index >= start:
            yield index, json_text(line, text_field, path, number)
        index += 1


def json_text(line: str, text_field: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"{path}, line {number}: no {text_field!r} field "
                         "(choose the field with text_field= / --text-field)")
    value = record[text_field]
    if not isinstance(value, str):
        raise ValueError(f"{path}, line {number}: field {text_field!r} is {type(value).__name__}, not a string")
    return value


def iter_files(files: list[Path], read, start: int = 0) -> Iterator[tuple[int, str]]:
    """Documents of several files in turn, numbered across them (`read(path)` yields (index, text))."""
    offset = 0
    for path in files:
        count = 0
        for index, text in read(path):
            count = index + 1
            if offset + index >= start:
                yield offset + index, text
        offset += count


CORPUS_KINDS = ("parquet", "jsonl", "jsonl.gz", "jsonl.zst", "txt", "txt.gz", "txt.zst")


def _walk(path: Path) -> tuple[list[Path], list[str]]:
    """Every file under `path`, following symbolic links to folders and to files alike (one rule), each
    real folder and file once; and what was left out, in words."""
    files, left_out, seen_dirs, seen_files = [], [], set(), {}

    def refuse(err: OSError) -> None:
        raise ValueError(f"corpus folder {path}: {err.filename} cannot be listed ({err.strerror}); a folder "
                         "that cannot be read would silently shorten the corpus") from None

    for root, dirs, names in os.walk(path, onerror=refuse, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:  # a second link to a folder already read (or a link loop)
            left_out.append(f"{root} (the folder {real} again)")
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs.sort()
        for name in names:
            file = Path(root, name)
            if not file.exists():
                raise ValueError(f"corpus folder {path}: {file} is a symbolic link to {os.readlink(file)!r}, "
                                 "which does not exist; fix or remove the link")
            real_file = os.path.realpath(file)
            if real_file in seen_files:
                left_out.append(f"{file} (the file {seen_files[real_file]} again)")
                continue
            seen_files[real_file] = file
            files.append(file)
    return sorted(files), left_out


def corpus_files(path: Path) -> tuple[str, list[Path]]:
    """The kind and files of a corpus folder: all its .parquet files, or all its .jsonl / .txt files
    (plain, .gz or .zst), searched recursively and sorted by path. One kind per folder.

    Symbolic links are followed, to folders and to files alike; each real folder and file is read once.
    Files of other kinds, and folders or files reached a second time through links, are left out with a
    warning that names them; a dangling link or an unreadable folder is an error."""
    files, left_out = _walk(path)
    by_kind: dict[str, list[Path]] = {}
    for file in files:
        kind = text_suffix(file)[1:]
        if kind in CORPUS_KINDS:
            by_kind.setdefault(kind, []).append(file)
        else:
            left_out.append(f"{file} (not a corpus file)")
    if not by_kind:
        raise FileNotFoundError(f"{path} holds no *.parquet, *.jsonl[.gz|.zst] or *.txt[.gz|.zst] files")
    if len(by_kind) > 1:
        raise ValueError(f"{path} mixes corpus formats ({', '.join(sorted(by_kind))}); keep one per folder")
    kind, chosen = next(iter(by_kind.items()))
    if left_out:
        shown = "; ".join(left_out[:5]) + (f"; and {len(left_out) - 5} more" if len(left_out) > 5 else "")
        warnings.warn(f"corpus folder {path}: reading {len(chosen)} {kind} file(s); {len(left_out)} entr"
                      f"{'y is' if len(left_out) == 1 else 'ies are'} left out: {shown}", stacklevel=3)
    return kind, chosen


def _parquet_file(pq: Any, path: Path) -> Any:
    try:
        # pre_buffer=False: the default reads ahead and keeps whole column chunks, which grew RSS by
        # hundreds of MB over a 1 GB corpus (experiments/bench_corpus_memory.py); this reads as it goes.
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DamagedCorpusError(f"data file {path} ({path.stat().st_size} bytes) is not a readable Parquet "
                                 f"file: truncated or corrupt, its footer (the end of the file) cannot be "
                                 f"read ({err})") from None


def _row_group_batches(pf: Any, path: Path, group: int, text_field: str) -> Iterator[Any]:
    """The record batches of one row group; damage raises `DamagedCorpusError` naming the group's bytes."""
    batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_field])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, ValueError) as err:
            meta = pf.metadata.row_group(group)
            columns = [meta.column(i) for i in range(meta.num_columns)]
            chunk = next((c for c in columns if c.path_in_schema == text_field), columns[0])
            first = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            raise DamagedCorpusError(f"data file {path} is corrupt: row group {group}, column {text_field!r} "
                                     f"(bytes {first}..{first + chunk.total_compressed_size}) cannot be "
                                     f"decoded ({err})") from None
        yield batch


def iter_parquet(files: list[Path], text_field: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """The `text_field` column of Parquet files, row by row, numbered across files from 0.

    Whole files and row groups before `start` are skipped using the footers, without reading them. A
    truncated or corrupt file raises `DamagedCorpusError` naming it (and the row group's bytes).
    """
    pq = optional_import("pyarrow.parquet", "reading Parquet")
    index = 0
    for path in files:
        pf = _parquet_file(pq, path)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                             "choose it with text_field= / --text-field")
        for group in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if index + rows <= start:
                index += rows
                continue
            for batch in _row_group_batches(pf, path, group, text_field):
                column = batch.column(0)
                if index + len(column) <= start:
                    index += len(column)
                    continue
                for value in column.to_pylist():
                    if index >= start:
                        if not isinstance(value, str):
                            raise ValueError(f"{path}: row {index} of column {text_field!r} is "
                                             f"{type(value).__name__}, not a string")
                        yield index, value
                    index += 1


def is_dataset_dir(path: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` (or a DatasetDict's split folder)."""
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def load_dataset_dir(path: Path) -> Any:
    datasets = optional_import("datasets", f"reading the dataset folder {path}")
    return datasets.load_from_disk(str(path))


def is_hf_dataset(obj: Any) -> bool:
    """A `datasets.Dataset` or `IterableDataset`, recognised without importing `datasets`."""
    return type(obj).__module__.startswith("datasets.") and type(obj).__name__ in ("Dataset", "IterableDataset")


def iter_hf_dataset(ds: Any, text_field: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """The `text_field` of each example of a `datasets.Dataset` / `IterableDataset`, numbered from 0."""
    names = getattr(ds, "column_names", None)
    if names is not None and text_field not in names:
        raise ValueError(f"the dataset has no column {text_field!r} (columns: {names}); "
                         "choose it with text_field= / --text-field")
    if type(ds).__name__ == "Dataset":
        # Arrow-backed and memory-mapped: read a slice of the one column at a time.
        column_ds = ds.select_columns([text_field])
        for a in range(start, len(ds), PARQUET_BATCH_ROWS):
            for offset, value in enumerate(column_ds[a : a + PARQUET_BATCH_ROWS][text_field]):
                yield a + offset, _dataset_text(value, a + offset, text_field)
        return
    stream = ds.skip(start) if start else ds
    for offset, example in enumerate(stream):
        if text_field not in example:
            raise ValueError(f"example {start + offset} of the dataset has no field {text_field!r}")
        yield start + offset, _dataset_text(example[text_field], start + offset, text_field)


def _dataset_text(value: Any, index: int, text_field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"example {index} of the dataset: field {text_field!r} is "
                         f"{type(value).__name__}, not a string")
    return value
