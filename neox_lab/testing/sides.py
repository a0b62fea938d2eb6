"""Which adapter runs a side of `compare`: neox_lab models, transformers GPTNeoX models, and anything
else (an `nn.Module`, a callable, a `Port`) as a port. Each adapter is one file (`side_neox`,
`side_hf`, `side_port`); another kind of model is one more adapter in `SIDE_KINDS`, tried in order."""

from __future__ import annotations

from .side_base import Side
from .side_hf import HFSide, is_hf
from .side_neox import NeoxSide, is_neox
from .side_port import Port, PortSide

__all__ = ["SIDE_KINDS", "Side", "is_hf", "is_neox", "is_port", "make_side"]

#: Adapters with a `accepts(model)` test, most specific first; whatever none accepts is a port.
SIDE_KINDS: list[type[Side]] = [NeoxSide, HFSide]


def is_port(model) -> bool:
    """Whether `model` is run as a port (no adapter of SIDE_KINDS takes it)."""
    return isinstance(model, Port) or not any(kind.accepts(model) for kind in SIDE_KINDS)


def make_side(model, label: str, **port_options) -> Side:
    """The side adapter for `model`. `port_options` (hooks, weights, step, generate, config, logits,
    dtype, name) describe a port; given for a neox_lab or transformers model, they are an error."""
    if not isinstance(model, Port):
        for kind in SIDE_KINDS:
            if kind.accepts(model):
                given = sorted(k for k, v in port_options.items() if v is not None)
                if given:
                    raise TypeError(f"{label} is a {kind.kind} model, which compare reads by itself; "
                                    f"{', '.join(given)} apply to a port (an nn.Module or a callable)")
                return kind(model, label)
    return PortSide(model, label, **port_options)
