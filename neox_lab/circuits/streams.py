"""Where a graph's nodes live in a hooked model: the hook point of each sender's output and of each
receiver's input, and the stream flags that make the inputs exist.

Senders write: ``input`` = `hook_embed`, ``a{L}.h{H}`` = head H of `blocks.L.attn.hook_result`,
``m{L}`` = `blocks.L.hook_mlp_out`. Receivers read: ``a{L}.h{H}<q|k|v>`` = head H of
`blocks.L.hook_q_input` / `hook_k_input` / `hook_v_input` (the stream entering block L, one copy per
head, before ln1; TransformerLens' `use_split_qkv_input`), ``m{L}`` = `blocks.L.hook_mlp_in` (before
ln2; `use_hook_mlp_in`), ``logits`` = the last block's `hook_resid_post` (before ln_final).
`evaluate` runs on those per-head inputs; `attribute` needs only the MLP inputs and reaches a head's
input through that head's q/k/v (see attribute.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from einops import rearrange

from ..hooks.registry import block_hook

__all__ = ["ABLATE", "EDGE_SCORES", "HEAD_COTANGENT", "PROJECT_ROWS", "TOKEN_SCORES", "ReceiverHook", "SenderHook",
           "Streams", "per_position", "sender_major", "sender_output", "stream_flags",
           "transformers_view", "write_outputs"]

# Axis names beyond neox_lab.axes: `senders` / `receivers` index a graph's senders and receiver inputs;
# `circuits` indexes edge sets run together. A run's sender outputs are kept sender-major,
# [senders batch pos d_model], so the senders upstream of an input are a contiguous prefix.
#: A layer's head writes into the sender-major layout.
SENDER_MAJOR = "batch pos n_heads d_model -> n_heads batch pos d_model"
#: Sender changes dotted with receiver-input gradients, summed over rows and positions: EAP's edge scores.
EDGE_SCORES = "senders batch pos d_model, batch pos receivers d_model -> senders receivers"
#: The same with rows and positions flattened into `tokens`.
TOKEN_SCORES = "senders tokens d_model, receivers tokens d_model -> senders receivers"
#: The gradient at each head's q (k, v) taken back through its W_Q (W_K, W_V): the cotangent at ln1's output.
HEAD_COTANGENT = "tokens n_heads d_head, n_heads d_model d_head -> n_heads tokens d_model"
#: Each patched row's receiver input through its head's own query/key/value weight (`rows` indexes them).
PROJECT_ROWS = "rows pos d_model, rows d_model d_head -> rows pos d_head"
#: Each circuit's ablated edges into some receivers applied to its rows' sender changes.
ABLATE = "senders circuits batch pos d_model, circuits senders receivers -> circuits batch pos receivers d_model"


@dataclass(frozen=True)
class SenderHook:
    """A hook point whose activation holds the outputs of senders ``first .. first + count - 1``
    ([batch pos n_heads d_model] for a layer's heads, [batch pos d_model] for one node)."""

    name: str
    first: int
    count: int
    per_head: bool


@dataclass(frozen=True)
class ReceiverHook:
    """A hook point whose activation is the input of receivers `receivers` (one per head for q/k/v,
    [batch pos n_heads d_model]; one otherwise, [batch pos d_model]); they read senders ``0 .. upstream - 1``."""

    name: str
    layer: int  # the block that runs it (n_layers for the logits)
    receivers: tuple[int, ...]
    upstream: int
    per_head: bool
    kind: str | None = None  # "q", "k" or "v" for a head input


class Streams:
    """The sender and receiver hook points of `graph`, in forward order."""

    def __init__(self, graph):
        self.graph = graph
        n_heads, per_layer = graph.n_heads, 3 * graph.n_heads + 1
        self.senders = [SenderHook("hook_embed", 0, 1, False)]
        self.receivers: list[ReceiverHook] = []
        for layer in range(graph.n_layers):
            first = graph.layer_senders(layer)
            self.senders += [SenderHook(block_hook(layer, "attn.hook_result"), first, n_heads, True),
                             SenderHook(block_hook(layer, "hook_mlp_out"), first + n_heads, 1, False)]
            base = layer * per_layer
            for j, kind in enumerate("qkv"):
                ids = tuple(base + 3 * head + j for head in range(n_heads))
                self.receivers.append(ReceiverHook(block_hook(layer, f"hook_{kind}_input"), layer, ids,
                                                   graph.upstream(ids[0]), True, kind))
            mlp = base + 3 * n_heads
            self.receivers.append(ReceiverHook(block_hook(layer, "hook_mlp_in"), layer, (mlp,),
                                               graph.upstream(mlp), False))
        logits = graph.n_layers * per_layer
        self.receivers.append(ReceiverHook(block_hook(graph.n_layers - 1, "hook_resid_post"), graph.n_layers,
                                           (logits,), graph.upstream(logits), False))

    def in_layer(self, layer: int) -> list[ReceiverHook]:
        """The receiver hooks block `layer` runs (`n_layers`: the logits')."""
        return [r for r in self.receivers if r.layer == layer]


def transformers_view(model):
    """The model to run: `model.hf()` where the class has that view (TransformerLens' `HookedTransformer`
    shares its modules with a transformers-convention model, whose config and calls the runs here
    use), else `model` itself."""
    view = getattr(model, "hf", None)
    return view() if callable(view) else model


def _flag(model, name: str) -> bool:
    value = getattr(model, name, None)
    if value is None:
        value = getattr(model.cfg, name, False)
    return bool(value)


@contextlib.contextmanager
def stream_flags(model, *, split_qkv_input: bool = True) -> Iterator[None]:
    """Within the block, `model` has the MLP input hook points (`set_use_hook_mlp_in(True)`) and, with
    `split_qkv_input`, the per-head q/k/v inputs (`set_use_split_qkv_input(True)`); the flags are
    restored after, however the block ends."""
    flags = ["use_hook_mlp_in"] + (["use_split_qkv_input"] if split_qkv_input else [])
    for flag in flags:
        if not callable(getattr(model, f"set_{flag}", None)):
            raise TypeError(f"{type(model).__name__} has no set_{flag}(): circuit discovery needs a hooked "
                            "neox_lab model with the per-head q/k/v input and MLP input streams")
    before = {flag: _flag(model, flag) for flag in flags}
    try:
        for flag in flags:
            getattr(model, f"set_{flag}")(True)
        yield
    finally:
        for flag, value in before.items():
            getattr(model, f"set_{flag}")(value)


def per_position(x: torch.Tensor, per_head: bool) -> torch.Tensor:
    """A receiver input as [batch pos receivers d_model] (a single one gets an axis of 1)."""
    return x if per_head else x.unsqueeze(-2)


def sender_major(sender: SenderHook, x: torch.Tensor) -> torch.Tensor:
    """The activation `x` of `sender`'s hook point as [count batch pos d_model] (a view)."""
    return rearrange(x, SENDER_MAJOR) if sender.per_head else x.unsqueeze(0)


def write_outputs(buffer: torch.Tensor, sender: SenderHook, x: torch.Tensor) -> None:
    """Store the activation `x` of `sender`'s hook point into the sender-major `buffer`
    [senders batch pos d_model] (converting dtype and device)."""
    buffer[sender.first:sender.first + sender.count] = sender_major(sender, x)


def sender_output(buffer: torch.Tensor, sender: SenderHook) -> torch.Tensor:
    """`sender`'s slice of a sender-major buffer in its hook point's layout ([batch pos n_heads d_model]
    for a layer's heads, [batch pos d_model] otherwise)."""
    span = buffer[sender.first:sender.first + sender.count]
    return rearrange(span, "n_heads batch pos d_model -> batch pos n_heads d_model") if sender.per_head else span[0]
