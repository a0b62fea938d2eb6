"""Refusing, before anything is allocated, a model that cannot fit where it is being built.

A config with num_hidden_layers=10**6 built for 97 s and took over 4 GB before failing; hidden_size=10**9
overflowed inside torch. The estimate is the config's exact parameter count (`parameter_count`) times
the dtype's size, against the memory the device has free, plus the Python objects of the module tree
(measured ~80 KiB a block), against the host's memory, which even a model built on the meta device
needs. The error names the sizes that made the model so large.
"""

from __future__ import annotations

import os

import torch

from ..config import NeoXConfig

#: Host memory the module tree of one block takes (modules, hook points, parameter objects): measured
#: 78 KiB on CPython 3.11 / torch 2.13, rounded up.
BLOCK_OBJECT_BYTES = 96 * 1024


def available_bytes(device: torch.device) -> int | None:
    """Memory a model could still take on `device` (host: available RAM plus free swap); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if line.split()[1:2]}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(cfg: NeoXConfig, dtype: torch.dtype, device: torch.device | str) -> None:
    """Raise `ValueError` naming the config's sizes when the model cannot fit: its parameters on `device`
    (none on "meta"), its module tree in host memory."""
    device = torch.device(device)
    sizes = (f"num_hidden_layers={cfg.num_hidden_layers:,}, hidden_size={cfg.hidden_size:,}, "
             f"intermediate_size={cfg.intermediate_size:,}, vocab_size={cfg.vocab_size:,}")
    objects = cfg.num_hidden_layers * BLOCK_OBJECT_BYTES
    host = available_bytes(torch.device("cpu"))
    if host is not None and objects > host:
        raise ValueError(f"NeoXConfig({sizes}): {cfg.num_hidden_layers:,} blocks need ~{_gib(objects)} of host "
                         f"memory for their modules alone, and {_gib(host)} is available; num_hidden_layers is "
                         "far larger than any model this code can build")
    if device.type == "meta":
        return
    params = cfg.parameter_count()
    need = params * dtype.itemsize + (objects if device.type == "cpu" else 0)
    free = available_bytes(device)
    if free is not None and need > free:
        raise ValueError(f"NeoXConfig({sizes}) makes {params:,} parameters, {_gib(need)} in "
                         f"{str(dtype).removeprefix('torch.')} on {device}, but {_gib(free)} is available there; "
                         "check those sizes, or spread a model this large with from_pretrained(..., "
                         "device_map='auto')")
