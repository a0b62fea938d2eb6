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


def open_text(path: Path) -> io.TextIOBase:
    """`path` opened for reading text, decompressing .gz and .zst on the fly."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    if name.endswith(".zst"):
        zstandard = optional_import("zstandard", f"reading {path}")
        raw = open(path, "rb")  # noqa: SIM115 -- closed by the wrapper
        # read_across_frames: the Pile's files (and `zstd --rsyncable`) hold many frames.
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.TextIOWrapper(io.BufferedReader(stream), encoding="utf-8")
    return open(path, encoding="utf-8")


def _utf8_lines(path: Path) -> Iterator[str]:
    """The lines of a (possibly compressed) text file; a non-UTF-8 file raises `ValueError` naming it."""
    with open_text(path) as fh:
        try:
            yield from fh
        except UnicodeDecodeError as err:
            raise ValueError(f"data file {path} is not UTF-8 text ({err.reason} at byte {err.start} of a block); "
                             "convert it, e.g. iconv -f latin1 -t utf-8") from None


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


def corpus_files(path: Path) -> tuple[str, list[Path]]:
    """The kind and files of a corpus folder: all its .parquet files, or all its .jsonl / .txt files
    (plain, .gz or .zst), searched recursively and sorted by path. One kind per folder."""
    by_kind: dict[str, list[Path]] = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            kind = text_suffix(p)[1:]
            if kind in ("parquet", "jsonl", "jsonl.gz", "jsonl.zst", "txt", "txt.gz", "txt.zst"):
                by_kind.setdefault(kind, []).append(p)
    if not by_kind:
        raise FileNotFoundError(f"{path} holds no *.parquet, *.jsonl[.gz|.zst] or *.txt[.gz|.zst] files")
    if len(by_kind) > 1:
        raise ValueError(f"{path} mixes corpus formats ({', '.join(sorted(by_kind))}); keep one per folder")
    return next(iter(by_kind.items()))


def parquet_rows(files: list[Path]) -> list[int]:
    """Rows of each Parquet file, from its footer (no data is read)."""
    pq = optional_import("pyarrow.parquet", "reading Parquet")
    return [pq.ParquetFile(f).metadata.num_rows for f in files]


def iter_parquet(files: list[Path], text_field: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """The `text_field` column of Parquet files, row by row, numbered across files from 0.

    Whole files and row groups before `start` are skipped using the footers, without reading them.
    """
    pq = optional_import("pyarrow.parquet", "reading Parquet")
    index = 0
    for path in files:
        # pre_buffer=False: the default reads ahead and keeps whole column chunks, which grew RSS by
        # hundreds of MB over a 1 GB corpus (experiments/bench_corpus_memory.py); this reads as it goes.
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                             "choose it with text_field= / --text-field")
        groups = list(range(pf.metadata.num_row_groups))
        while groups and index + pf.metadata.row_group(groups[0]).num_rows <= start:
            index += pf.metadata.row_group(groups.pop(0)).num_rows
        if not groups:
            continue
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=[text_field]):
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
