"""What a report needs to say what was compared: package versions and file fingerprints."""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path

import torch


def versions() -> dict[str, str | None]:
    """neox_lab, torch, transformers (None when not installed) and Python versions."""
    out: dict[str, str | None] = {}
    for dist in ("neox-lab", "torch", "transformers", "safetensors", "tokenizers"):
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    out["torch_runtime"] = torch.__version__
    out["python"] = platform.python_version()
    return out


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
