"""What `compare` needs of one side of a comparison, whatever kind of model it is.

A side adapter wraps one kind of model (neox_lab, transformers, a user's port) behind one small
interface; `sides.make_side` picks the adapter. Adding a kind of side is one more subclass of `Side`
and one line in `sides.SIDE_KINDS`:

    run(ids, mask, names, stop_at_layer)  -> ({hook name: tensor}, logits or None)
    observable()                          -> {hook name: why not} for the registry names it cannot show
    weights()                             -> {neox_lab parameter name: tensor} or None
    recast(dtype)                         -> the same model in another dtype (measured floors), or None
    step(ids, mask, past)                 -> (logits, past): one decoding call with a KV cache (can_step)
    generate(ids, mask, n)                -> ids [batch prompt+n], greedy (a port without step)
    variants()                            -> other settings of the same model, to find one that works
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import NeoXConfig


@dataclass
class Variant:
    """Another setting of a side (dtype, attention backend): what `compare` tries when a reference gives
    non-finite values, to suggest one that works. `cli` is the same setting as `neox-lab compare` flags."""

    description: str
    cli: str
    build: Callable[[], Side]


class Side(abc.ABC):
    """One side of a comparison. Subclasses fill in the attributes and override what their kind can do."""

    kind = "model"
    #: whether the side computes with a padding mask (a port without one skips the left-padded batch)
    accepts_mask = True

    def __init__(self, model, label: str):
        self.model = model
        self.label = label
        self.cfg: NeoXConfig | None = None
        self.dtype: torch.dtype = torch.float32
        self.device = torch.device("cpu")
        self.backend = "eager"
        self.architecture = type(model).__name__
        #: weight-processing steps applied to this side (`model.weights_processed`), e.g. {"fold_ln"}
        self.processed: set[str] = set()

    # -- description ----------------------------------------------------------------------------
    @property
    def library(self) -> str:
        return self.kind

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.library} {type(self.model).__name__} {dtype}/{self.backend} on {self.device}"

    def short(self) -> str:
        """"transformers (sdpa, float64)": the side's library and setting, for messages."""
        return f"{self.library} ({self.backend}, {str(self.dtype).removeprefix('torch.')})"

    def info(self) -> dict:
        """Provenance of this side for the JSON report."""
        return {"library": self.library, "class": type(self.model).__name__,
                "dtype": str(self.dtype).removeprefix("torch."), "backend": self.backend,
                "device": str(self.device), "architecture": self.architecture,
                "weights_processed": sorted(self.processed)}

    # -- capabilities ---------------------------------------------------------------------------
    def unobservable(self, names: list[str]) -> dict[str, str]:
        """The names among `names` this side cannot observe, with the reason."""
        return {}

    @abc.abstractmethod
    def run(self, ids: torch.Tensor, mask: torch.Tensor | None, names: list[str],
            stop_at_layer: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Forward once in eval mode without gradients; returns ({hook name: tensor}, logits or None).
        stop_at_layer=n may stop after block n-1 (then no logits)."""

    def weights(self) -> dict[str, torch.Tensor] | None:
        """Parameters under neox_lab's body-relative names, or None when this side has none to compare."""
        return None

    def recast(self, dtype: torch.dtype) -> Side | None:
        """A copy of this side computing in `dtype` (for measuring rounding noise), or None."""
        return None

    def exact_copy(self) -> Side | None:
        """This side computing in float64 throughout (the reference of the measured floors), or None."""
        if self.dtype == torch.float64:
            return self
        return self.recast(torch.float64)

    #: whether `step` (one decoding call with a KV cache) works on this side, and whether it can give greedy
    #: tokens at all (with `step`, or with its own `generate`)
    can_step = False
    can_generate = False

    def step(self, ids: torch.Tensor, mask: torch.Tensor | None, past):
        """Logits of `ids` [batch new] given the cache `past` (None: prefill) and the new cache."""
        raise TypeError(f"{self.label} ({self.describe()}) cannot decode with a KV cache")

    def generate(self, ids: torch.Tensor, mask: torch.Tensor | None, n: int) -> torch.Tensor:
        """`n` greedy tokens after `ids` [batch prompt]: ids [batch prompt+n]."""
        raise TypeError(f"{self.label} ({self.describe()}) cannot generate")

    def variants(self) -> list[Variant]:
        return []


@contextlib.contextmanager
def eval_mode(model):
    """`model` in eval mode for the block, its mode restored afterwards (a plain callable: no-op)."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def first(out):
    """The tensor of a module output: itself, the first element of a tuple, or `.logits`."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def logits_of(out) -> torch.Tensor:
    """Logits from what a model or callable returned: a tensor, an output with `.logits`, or a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"expected logits [batch pos vocab]: a tensor, an output with .logits or a tuple whose first "
                    f"element is the logits; got {type(out).__name__}")
