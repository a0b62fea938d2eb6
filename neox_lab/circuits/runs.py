"""The runs attribution and evaluation share: checked inputs, a recording forward, metric values.

Every forward here is a transformers-convention call (``model(ids, attention_mask=...).logits``) on the
model's `hf()` view, through the public hook API; the model's own kernels run (a hook on these streams
never forces the eager path).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..dtypes import widen
from ..hooks.registry import block_hook
from .streams import Streams, write_outputs

__all__ = ["Inputs", "Metric", "Recorded", "metric_value", "prepare", "record", "tile"]

Metric = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Inputs:
    """Checked clean / corrupted token ids [batch pos] on the model's input device, the shared mask."""

    clean: torch.Tensor
    corrupted: torch.Tensor
    mask: torch.Tensor | None
    fwd: dict = field(default_factory=dict)  # extra forward arguments (logits_to_keep)

    @property
    def batch(self) -> int:
        return self.clean.shape[0]

    def mask_for(self, copies: int) -> torch.Tensor | None:
        return None if self.mask is None else tile(self.mask, copies)


def _as_batch(tokens, what: str) -> torch.Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"{what} must be integer token ids [batch pos], got {tokens.dtype} {tuple(tokens.shape)}")
    return tokens


def prepare(model, graph, clean, corrupted, attention_mask, logits_to_keep: int) -> Inputs:
    """Check the inputs (and that `graph` is `model`'s) before any work is done."""
    graph.check_model(model)
    clean, corrupted = _as_batch(clean, "clean"), _as_batch(corrupted, "corrupted")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} must have the same "
                         "shape: an edge carries one sender's output at each position, so the two runs must "
                         "line up position by position (pad the shorter one and pass attention_mask)")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.shape != clean.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match the tokens "
                             f"{tuple(clean.shape)}; it is shared by the clean and the corrupted run (same padding)")
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got {logits_to_keep!r}")
    if model.training:
        warnings.warn("the model is in training mode, so dropout makes every run noisy; call model.eval()",
                      stacklevel=3)
    device = model.input_device
    mask = None if attention_mask is None else attention_mask.to(device)
    fwd = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    return Inputs(clean.to(device), corrupted.to(device), mask, fwd)


def tile(x: torch.Tensor, copies: int) -> torch.Tensor:
    """`copies` copies of `x` stacked along the batch axis (copy c holds rows c*batch .. (c+1)*batch - 1)."""
    return x.repeat(copies, *([1] * (x.dim() - 1))) if copies > 1 else x


def metric_value(metric: Metric, logits: torch.Tensor, method: str) -> torch.Tensor:
    """`metric(logits)` checked to be a scalar tensor (TransformerLens' convention)."""
    value = metric(logits)
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    if value.numel() != 1:
        raise ValueError(f"{method}: metric(logits) must return a scalar (TransformerLens' convention: average "
                         f"over the batch inside the metric), got shape {tuple(value.shape)}")
    return value.reshape(())


@dataclass
class Recorded:
    """One run's logits and every sender's output, sender-major [senders batch pos d_model] (in at least fp32)."""

    logits: torch.Tensor
    outputs: torch.Tensor
    resid: list[torch.Tensor] = field(default_factory=list)  # stream entering each block, then the final one


def record(model, streams: Streams, tokens: torch.Tensor, mask, fwd: dict, *, keep_resid: bool = False) -> Recorded:
    """Run `tokens` once without gradients, recording each sender's output (and, with `keep_resid`,
    the residual stream entering each block and leaving the last one)."""
    graph = streams.graph
    outputs: torch.Tensor | None = None
    resid: dict[int, torch.Tensor] = {}

    def keep(sender):
        def hook(x, *, hook):
            nonlocal outputs
            if outputs is None:
                outputs = x.new_zeros((len(graph.senders), *x.shape[:2], x.shape[-1]), dtype=widen(x).dtype)
            write_outputs(outputs, sender, x)
        return hook

    def keep_stream(layer):
        def hook(x, *, hook):
            resid[layer] = x.detach().clone()
        return hook

    hooks = [(s.name, keep(s)) for s in streams.senders]
    if keep_resid:
        hooks += [(block_hook(layer, "hook_resid_pre"), keep_stream(layer)) for layer in range(graph.n_layers)]
        hooks.append((block_hook(graph.n_layers - 1, "hook_resid_post"), keep_stream(graph.n_layers)))
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks, **fwd).logits
    return Recorded(logits, outputs, [resid[layer] for layer in sorted(resid)])
