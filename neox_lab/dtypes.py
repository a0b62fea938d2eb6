"""The floating dtypes neox_lab accepts by name, and the half-precision pair it widens to fp32.

Names are torch's without the "torch." prefix, as config.json's `torch_dtype`, the CLI's --dtype
flags and an activation store's manifest spell them.
"""

from __future__ import annotations

import torch

#: Every dtype a user may name: CLI flags, the dtype an activation store keeps on disk.
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                  "float32": torch.float32, "float64": torch.float64}

#: Half precision: what the fast attention kernels need, and what reductions are widened from.
HALF = (torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype | str) -> str:
    """The canonical name ("float16", "bfloat16", "float32", "float64") of a dtype or a dtype name."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


def widen(t: torch.Tensor) -> torch.Tensor:
    """`t` in at least fp32: half precision becomes fp32, fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in HALF else t


def nonfinite_count(t: torch.Tensor) -> int:
    """How many inf/NaN values a tensor holds, fast when there are none: min and max are one vectorised
    pass (NaN propagates into both, an inf becomes one of them), where isfinite is 20-50x slower on a CPU
    in half precision. Only a tensor that has some pays for the exact count."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return 0
    return int((~torch.isfinite(t)).sum())
