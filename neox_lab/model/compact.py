"""Compact checkpoints: weight matrices stored as low-bit integers with per-group scales.

A training history holds many checkpoints of one model; stored in fp16 each costs as much as the model.
`save_compact` writes a checkpoint whose 2-D weights are symmetric absmax-quantised integers (8 or 4
bits, two 4-bit values per byte) with one bfloat16 scale per `group` consecutive values of a row, and whose
other tensors (LayerNorms, biases) are kept as float32. The file is an ordinary safetensors file: an
encoded weight ``W`` is stored as ``W.qweight`` (int8, or uint8 holding 4-bit pairs) and ``W.qscale``,
and the header's metadata ``neox_lab.compact`` says which tensors are encoded and how.

What the loader reconstructs is exactly what was stored: ``W = q * scale`` computed in float32, which
is exact (a product of an integer of at most 8 bits and a bfloat16 scale of 8 significant bits fits
float32's 24; bfloat16 has float32's range, so no scale underflows). So a compact checkpoint *is* a
float32 checkpoint with these values; the rounding happened once, when it was written, and
`quantisation_error` reports how large it was.

transformers cannot read these files; `NeoXForCausalLM.from_pretrained` (and everything built on it)
can, and `save_pretrained` writes a loaded one back as an ordinary checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

#: The header metadata key naming a compact file's encoded tensors.
METADATA_KEY = "neox_lab.compact"
FORMAT_VERSION = 1
BITS = (4, 8)
_Q, _S = ".qweight", ".qscale"


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _check(bits: int, group: int, cols: int, key: str) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if group < 1 or cols % group:
        raise ValueError(f"{key}: group={group} must divide the row length {cols}")
    if bits == 4 and group % 2:
        raise ValueError(f"{key}: 4-bit values are stored in pairs, so group={group} must be even")


def encode(t: torch.Tensor, bits: int, group: int, key: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) for a 2-D tensor [rows cols]: scale [rows cols/group] bfloat16, q int8 [rows cols] (8 bits)
    or uint8 [rows cols/2] (4 bits, low nibble first, offset by 8)."""
    rows, cols = t.shape
    _check(bits, group, cols, key)
    qmax = _qmax(bits)
    x = t.detach().to(torch.float32).reshape(rows, cols // group, group)
    absmax = x.abs().amax(-1, keepdim=True)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"{key} holds inf/NaN, which cannot be stored")
    want = absmax / qmax
    scale = want.to(torch.bfloat16)
    # Rounded up, so that no value needs more than qmax steps; a zero group gets scale 1.
    scale = torch.where(scale.float() < want, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    scale = torch.where(absmax == 0, torch.ones_like(scale), scale)
    q = (x / scale.float()).round().clamp(-qmax, qmax).to(torch.int8).reshape(rows, cols)
    scale = scale.reshape(rows, cols // group)
    if bits == 4:
        nibbles = (q + 8).to(torch.uint8).reshape(rows, cols // 2, 2)
        q = nibbles[..., 0] | (nibbles[..., 1] << 4)
    return q.contiguous(), scale.contiguous()


def decode(q: torch.Tensor, scale: torch.Tensor, bits: int, key: str = "tensor") -> torch.Tensor:
    """The float32 tensor [rows cols] that (q, scale) store (exact: see the module docstring)."""
    if bits == 4:
        if q.dtype != torch.uint8:
            raise ValueError(f"{key}: 4-bit values must be stored as uint8 pairs, got {q.dtype}")
        low, high = (q & 0xF).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8
        q = torch.stack([low, high], dim=-1).reshape(q.shape[0], -1)
    elif q.dtype != torch.int8:
        raise ValueError(f"{key}: 8-bit values must be stored as int8, got {q.dtype}")
    rows, cols = q.shape
    if scale.dim() != 2 or scale.shape[0] != rows or scale.shape[1] == 0 or cols % scale.shape[1]:
        raise ValueError(f"{key}: scale {tuple(scale.shape)} does not fit values [{rows} {cols}] (one scale "
                         "per group of a row)")
    group = cols // scale.shape[1]
    values = q.to(torch.float32).reshape(rows, -1, group) * scale.to(torch.float32)[..., None]
    return values.reshape(rows, cols)


def quantisation_error(t: torch.Tensor, bits: int, group: int) -> float:
    """Relative error ``||decode(encode(t)) - t|| / ||t||`` of storing `t` this way."""
    q, scale = encode(t, bits, group)
    ref = t.detach().double()
    return float((decode(q, scale, bits).double() - ref).norm() / ref.norm().clamp(min=1e-300))


# ------------------------------------------------------------------------------------------ files
def save_compact(tensors: dict[str, torch.Tensor], path: str | os.PathLike, *, bits: int = 8,
                 group: int | None = None, min_size: int = 4096,
                 overrides: dict[str, dict] | None = None) -> dict[str, dict]:
    """Write `tensors` (a transformers-keyed state dict) to the safetensors file `path`, 2-D floating tensors
    of at least `min_size` values encoded (`bits`, `group` values per scale; None: one scale per row),
    the rest as float32. `overrides` gives some tensors their own ``{"bits", "group"}`` (e.g. the
    embedding at 4 bits, most of a small model's values, while the matrices of the circuits keep 8).
    Returns the encoding of each encoded tensor (what the header records)."""
    unknown = sorted(set(overrides or {}) - set(tensors))
    if unknown:
        raise ValueError(f"overrides name tensors that are not there: {', '.join(unknown)}")
    out: dict[str, torch.Tensor] = {}
    encoded: dict[str, dict] = {}
    for key, t in tensors.items():
        t = t.detach().cpu()
        if key.endswith((_Q, _S)):
            raise ValueError(f"tensor name {key!r} ends like an encoded part ({_Q}, {_S}); rename it")
        if not t.is_floating_point():
            raise ValueError(f"{key}: only floating tensors are stored in a compact checkpoint, got {t.dtype}")
        if t.dim() == 2 and t.numel() >= min_size:
            own = {"bits": bits, "group": group, **(overrides or {}).get(key, {})}
            g = t.shape[1] if own["group"] is None else own["group"]
            out[key + _Q], out[key + _S] = encode(t, own["bits"], g, key)
            encoded[key] = {"bits": own["bits"], "group": g, "shape": list(t.shape)}
        else:
            out[key] = t.to(torch.float32).contiguous()
    header = {"version": FORMAT_VERSION, "tensors": encoded}
    path = Path(os.fspath(path))
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, os.fspath(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(header, sort_keys=True)})
    os.replace(tmp, path)
    return encoded


def compact_header(path: str | os.PathLike) -> dict | None:
    """The `neox_lab.compact` header of a safetensors file; None for an ordinary one."""
    with safe_open(os.fspath(path), framework="pt", device="cpu") as fh:
        raw = (fh.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path}: its {METADATA_KEY} header is not valid JSON ({err})") from None
    version = header.get("version") if isinstance(header, dict) else None
    if version != FORMAT_VERSION or not isinstance(header.get("tensors"), dict):
        raise ValueError(f"{path}: {METADATA_KEY} header version {version!r} is not one this neox_lab reads "
                         f"(version {FORMAT_VERSION}); upgrade neox-lab")
    return header


def is_compact(path: str | os.PathLike) -> bool:
    """True for a safetensors file written by `save_compact`."""
    return Path(os.fspath(path)).suffix == ".safetensors" and compact_header(path) is not None


def read_compact(path: str | os.PathLike):
    """Yield (key, float32 tensor) for every tensor of a compact file, encoded ones decoded; a missing,
    mis-shaped or mis-typed part raises ValueError naming the tensor."""
    header = compact_header(path)
    specs = header["tensors"]
    with safe_open(os.fspath(path), framework="pt", device="cpu") as fh:
        keys = set(fh.keys())
        missing = sorted(name for name in specs if name + _Q not in keys)
        if missing:
            raise ValueError(f"{path}: the {METADATA_KEY} header lists tensors the file lacks: {', '.join(missing)}")
        for key in sorted(keys):
            if key.endswith(_S):
                continue
            if key.endswith(_Q):
                name = key[: -len(_Q)]
                spec = specs.get(name)
                if spec is None or name + _S not in keys:
                    raise ValueError(f"{path}: {key} has no entry in the {METADATA_KEY} header or no {name + _S}")
                values = decode(fh.get_tensor(key), fh.get_tensor(name + _S), spec["bits"], f"{path}: {name}")
                if list(values.shape) != spec["shape"]:
                    raise ValueError(f"{path}: {name} decodes to {tuple(values.shape)}, the header says "
                                     f"{tuple(spec['shape'])}")
                yield name, values
            else:
                yield key, fh.get_tensor(key)
