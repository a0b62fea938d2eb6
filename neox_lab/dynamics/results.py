"""A sweep's results file: one record per finished checkpoint, appended as each finishes, read back to resume.

Two formats, by the file's suffix:

- ``.jsonl``: a header line ``{"neox_lab_sweep": 1, "sweep": {...}}`` saying which sweep wrote it, then
  one line per checkpoint ``{"checkpoint", "step", "load_s", "analysis_s", "values": {...}}``, written
  with one `write` and flushed to disk before the next checkpoint starts. A line cut short by a kill
  is the unfinished checkpoint's and is dropped on resume.
- ``.parquet`` (needs pyarrow: ``pip install neox-lab[corpus]``): columns checkpoint, step, load_s,
  analysis_s and one per value (a tensor as the list of its values); the header and each tensor's
  dtype and shape live in the schema metadata. Parquet cannot be appended to, so the file is rewritten
  (to a temporary file, then renamed over it) after each checkpoint: a kill leaves the previous file.

Numbers stay numbers; a tensor comes back with its dtype, shape and values exactly (floats travel as
their exact decimal, NaN/inf as JSON's NaN/Infinity tokens). Every record must hold the same values
(names, kinds, tensor shapes) as the first: a measurement that changes what it returns is an error.
"""

from __future__ import annotations

import json
import numbers
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ..dtypes import DTYPES

FORMAT_VERSION = 1
HEADER_KEY = "neox_lab_sweep"
PARQUET_META = b"neox_lab.sweep"
#: Record fields a measurement may not return: the sweep writes them itself.
RESERVED = ("checkpoint", "step", "load_s", "analysis_s")
SUFFIXES = (".jsonl", ".parquet")
_TENSOR_DTYPES = {**DTYPES, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
                  "uint8": torch.uint8, "bool": torch.bool}


class SweepFileError(ValueError):
    """A results file that belongs to another sweep, or cannot be read as one."""


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _TENSOR_DTYPES:
        raise ValueError(f"tensors of dtype {name} cannot be stored in sweep results; convert to float32")
    return name


def normalize_values(values, where: str) -> dict:
    """The measurement's result as {name: int | float | bool | CPU tensor}; a clear error for anything else."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{where}: the measurement must return a mapping of names to numbers or tensors, got "
                        f"{type(values).__name__}")
    out = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: result names must be strings, got {key!r}")
        if key in RESERVED:
            raise ValueError(f"{where}: the measurement returned {key!r}, a name the sweep writes itself "
                             f"({', '.join(RESERVED)}); rename it")
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            _dtype_name(value)
        elif isinstance(value, bool):
            pass
        elif isinstance(value, numbers.Integral):
            value = int(value)
        elif isinstance(value, numbers.Real):
            value = float(value)
        elif hasattr(value, "__array__"):  # numpy arrays
            value = torch.as_tensor(value).contiguous()
            _dtype_name(value)
        else:
            raise TypeError(f"{where}: result {key!r} is a {type(value).__name__}; return numbers or tensors")
        out[key] = value
    return out


def layout(values: dict) -> dict:
    """What a record holds, to compare records by: {name: "number" | [dtype, shape]}."""
    return {k: [_dtype_name(v), list(v.shape)] if isinstance(v, torch.Tensor) else "number"
            for k, v in values.items()}


def _encode(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": {"dtype": _dtype_name(value), "shape": list(value.shape),
                           "data": value.flatten().tolist()}}
    return value


def _decode(value, where: str):
    if isinstance(value, dict):
        spec = value.get("tensor")
        if not isinstance(spec, dict) or spec.get("dtype") not in _TENSOR_DTYPES:
            raise SweepFileError(f"{where}: a value is an object but not a stored tensor")
        return torch.tensor(spec["data"], dtype=_TENSOR_DTYPES[spec["dtype"]]).reshape(spec["shape"])
    return value


class ResultsFile:
    """The results of one sweep in `path` (see the module docstring): `records` already there, `append`."""

    def __init__(self, path: str | os.PathLike, sweep: dict):
        self.path = Path(os.fspath(path))
        if self.path.suffix not in SUFFIXES:
            raise ValueError(f"out={os.fspath(path)!r}: results are written as JSON lines (.jsonl) or Parquet "
                             f"(.parquet); name the file with one of those suffixes")
        if self.path.suffix == ".parquet":
            _require_pyarrow()
        self.sweep = json.loads(json.dumps(sweep))  # as it reads back from the file
        self.records: list[dict] = []
        self.layout: dict | None = None
        if self.path.exists() and self.path.stat().st_size:
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.suffix == ".jsonl":
                self._write_lines([{HEADER_KEY: FORMAT_VERSION, "sweep": self.sweep}], mode="w")

    # ----------------------------------------------------------------------------- reading
    def _check_header(self, header: dict) -> None:
        if header.get(HEADER_KEY) != FORMAT_VERSION or not isinstance(header.get("sweep"), dict):
            raise SweepFileError(f"{self.path} is not a neox_lab sweep results file (no {HEADER_KEY!r} header of "
                                 f"version {FORMAT_VERSION}); pass another out= path")
        theirs = header["sweep"]
        differ = [k for k in sorted(set(theirs) | set(self.sweep)) if theirs.get(k) != self.sweep.get(k)]
        if differ:
            detail = "; ".join(f"{k}: file {json.dumps(theirs.get(k))}, this sweep {json.dumps(self.sweep.get(k))}"
                               for k in differ)
            raise SweepFileError(f"{self.path} holds the results of a different sweep ({detail}); its records "
                                 "would be mixed with another measurement's. Pass another out= path, or delete "
                                 "the file to start over")

    def _read(self) -> None:
        if self.path.suffix == ".jsonl":
            self._read_jsonl()
        else:
            self._read_parquet()

    def _read_jsonl(self) -> None:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        good_end = len(raw) - len(tail)
        try:
            header = json.loads(complete[0]) if complete else None
        except ValueError:
            header = None
        if not isinstance(header, dict):
            raise SweepFileError(f"{self.path} does not start with a neox_lab sweep header line; pass another "
                                 "out= path")
        self._check_header(header)
        for number, line in enumerate(complete[1:], start=2):
            try:
                rec = json.loads(line)
                values = {k: _decode(v, f"{self.path}:{number}") for k, v in rec["values"].items()}
                record = {"checkpoint": rec["checkpoint"], "step": rec["step"], "load_s": rec["load_s"],
                          "analysis_s": rec["analysis_s"], "values": values}
            except (ValueError, KeyError, TypeError) as err:
                raise SweepFileError(f"{self.path}, line {number}, is not a sweep record ({err}); the file is "
                                     "damaged: pass another out= path") from None
            self._accept(record, f"{self.path}:{number}")
        if tail:
            # A record cut short by a kill: its checkpoint did not finish; drop it and compute it again.
            warnings.warn(f"{self.path}: dropping an unfinished last line ({len(tail)} bytes) left by an "
                          "interrupted sweep", stacklevel=4)
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)

    def _read_parquet(self) -> None:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(self.path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises many kinds for a bad file
            raise SweepFileError(f"{self.path} is not a readable Parquet file ({err}); pass another out= "
                                 "path") from None
        meta = json.loads((table.schema.metadata or {}).get(PARQUET_META, b"{}"))
        self._check_header(meta)
        fields = meta.get("fields", {})
        for row in table.to_pylist():
            values = {}
            for name, kind in fields.items():
                cell = row[name]
                values[name] = (torch.tensor(cell, dtype=_TENSOR_DTYPES[kind[0]]).reshape(kind[1])
                                if isinstance(kind, list) else cell)
            self._accept({"checkpoint": row["checkpoint"], "step": row["step"], "load_s": row["load_s"],
                          "analysis_s": row["analysis_s"], "values": values}, os.fspath(self.path))

    def _accept(self, record: dict, where: str) -> None:
        found = layout(record["values"])
        if self.layout is None:
            self.layout = found
        elif found != self.layout:
            raise SweepFileError(f"{where}: record for {record['checkpoint']} holds {found}, earlier ones "
                                 f"{self.layout}")
        self.records.append(record)

    # ----------------------------------------------------------------------------- writing
    def append(self, record: dict) -> None:
        """Add one finished checkpoint's record, durably, before the next one starts."""
        found = layout(record["values"])
        if self.layout is not None and found != self.layout:
            raise ValueError(f"checkpoint {record['checkpoint']}: the measurement returned {found}, but earlier "
                             f"checkpoints gave {self.layout}; a sweep's measurement must return the same names, "
                             "kinds and tensor shapes for every checkpoint")
        self.layout = found
        self.records.append(record)
        if self.path.suffix == ".jsonl":
            self._write_lines([{**{k: record[k] for k in RESERVED},
                                "values": {k: _encode(v) for k, v in record["values"].items()}}], mode="a")
        else:
            self._write_parquet()

    def _write_lines(self, objs: list[dict], mode: str) -> None:
        data = "".join(json.dumps(o, allow_nan=True) + "\n" for o in objs).encode()
        with open(self.path, mode + "b") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def _write_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns: dict[str, list] = {k: [r[k] for r in self.records] for k in RESERVED}
        for name, kind in self.layout.items():
            columns[name] = [r["values"][name].flatten().tolist() if isinstance(kind, list) else r["values"][name]
                             for r in self.records]
        meta = {HEADER_KEY: FORMAT_VERSION, "sweep": self.sweep, "fields": self.layout}
        table = pa.table(columns)
        table = table.replace_schema_metadata({PARQUET_META: json.dumps(meta).encode()})
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as err:
        raise ImportError("Parquet results need pyarrow: pip install neox-lab[corpus], or write .jsonl") from err
