"""Ready-made hook functions: ablate, patch, steer, clamp and record activations.

Every factory returns ``fn(tensor, *, hook)`` for `run_with_hooks`, ``with model.hooks(...)``,
`add_hook` or decoding with a KV cache::

    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero_ablate(heads=[0, 3]))])

Selections are read from the hook point's shape string, never guessed from sizes:

- ``heads=`` selects along the ``n_heads`` axis: q, k, v, rot_q, rot_k, z and result are
  [batch pos n_heads d_head|d_model]; attn_scores and pattern are [batch n_heads query_pos key_pos].
  Asking for heads on a stream without that axis is an error naming the hook.
- ``positions=`` selects along ``pos`` (or ``query_pos`` for scores and pattern). Positions index the
  *current call's* position axis: an int, a list of ints (negative counts from the end), a slice, or a
  bool tensor as long as that axis. In a fresh forward these are absolute token positions. Under
  KV-cache decoding (``generate``, or forwards with ``past_key_values``) each decode call carries only
  the new token, so its position axis has length 1: ``positions=None`` (every position) or ``-1``
  (the newest token) mean the same thing on every step, while ``positions=[3]`` applies during the
  prompt's forward and raises an IndexError on the decode steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..axes import POSITIONS, find_axis
from ..hooks.points import HookPoint

Selection = int | Sequence[int] | slice | torch.Tensor | None


# ---------------------------------------------------------------------------------------------- selection
def _axis(hook: HookPoint, x: torch.Tensor, names: str | tuple[str, ...]) -> int | None:
    if len(hook.shape.split()) != x.dim():
        raise ValueError(f"hook {hook.name!r}: its shape string [{hook.shape}] does not describe the "
                         f"{x.dim()}-d activation {tuple(x.shape)}; cannot find the axes to select")
    return find_axis(hook.shape, names)


def _index_mask(sel: Selection, size: int, what: str, hook: HookPoint) -> torch.Tensor:
    """bool [size], True at the selected indices."""
    if isinstance(sel, torch.Tensor) and sel.dtype == torch.bool:
        if sel.shape != (size,):
            raise ValueError(f"hook {hook.name!r}: a bool {what} mask must have shape ({size},), "
                             f"got {tuple(sel.shape)}")
        return sel.cpu()
    mask = torch.zeros(size, dtype=torch.bool)
    if isinstance(sel, slice):
        mask[sel] = True
        return mask
    idx = torch.as_tensor([sel] if isinstance(sel, int) else sel, dtype=torch.long).flatten().cpu()
    bad = idx[(idx < -size) | (idx >= size)]
    if bad.numel():
        hint = (" (under KV-cache decoding each call's position axis holds only the new tokens; "
                "use positions=None or negative indices there)") if what == "positions" else ""
        raise IndexError(f"hook {hook.name!r}: {what} {bad.tolist()} out of range for an axis of "
                         f"length {size}{hint}")
    mask[idx] = True
    return mask


def selection_mask(x: torch.Tensor, hook: HookPoint, heads: Selection = None,
                   positions: Selection = None) -> torch.Tensor | None:
    """A bool mask broadcastable to `x`, True on the selected heads x positions; None means "all of it"."""
    if heads is None and positions is None:
        return None
    mask = torch.ones((1,) * x.dim(), dtype=torch.bool)
    if heads is not None:
        axis = _axis(hook, x, "n_heads")
        if axis is None:
            raise ValueError(f"hook {hook.name!r} [{hook.shape}] has no n_heads axis, so heads= cannot "
                             "select on it; use an attention stream (q, k, v, rot_q, rot_k, z, result, "
                             "attn_scores, pattern)")
        shape = [1] * x.dim()
        shape[axis] = x.shape[axis]
        mask = mask & _index_mask(heads, x.shape[axis], "heads", hook).view(shape)
    if positions is not None:
        axis = _axis(hook, x, POSITIONS)
        if axis is None:
            raise ValueError(f"hook {hook.name!r} [{hook.shape}] has no pos axis to select positions on")
        shape = [1] * x.dim()
        shape[axis] = x.shape[axis]
        mask = mask & _index_mask(positions, x.shape[axis], "positions", hook).view(shape)
    return mask.to(x.device)


def _replace(x: torch.Tensor, new: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    new = new.to(dtype=x.dtype, device=x.device)
    if mask is None:
        # A copy, so later in-place edits of the output never reach a cached source tensor.
        return new.expand_as(x).clone()
    return torch.where(mask, new, x)


def _source(source, hook: HookPoint, what: str) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    if not hasattr(source, "__getitem__"):
        raise TypeError(f"{what}: expected a tensor or an ActivationCache/dict, got {type(source).__name__}")
    try:
        return source[hook.name]
    except KeyError:
        known = sorted(source)[:6] if isinstance(source, Mapping) else "?"
        raise KeyError(f"{what}: no activation for hook {hook.name!r} in the cache (it holds e.g. "
                       f"{known}); cache that hook (names_filter) first") from None


def _broadcast(src: torch.Tensor, x: torch.Tensor, hook: HookPoint, what: str) -> torch.Tensor:
    try:
        return src.to(device=x.device, dtype=x.dtype).expand_as(x)
    except RuntimeError:
        raise ValueError(f"{what}: hook {hook.name!r} [{hook.shape}] is {tuple(x.shape)}, the source "
                         f"{tuple(src.shape)} does not broadcast to it") from None


# ---------------------------------------------------------------------------------------------- ablations
def zero_ablate(heads: Selection = None, positions: Selection = None):
    """Set the activation (or the selected heads / positions of it) to zero."""
    def hook_fn(x: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        mask = selection_mask(x, hook, heads, positions)
        return torch.zeros_like(x) if mask is None else x.masked_fill(mask, 0)
    return hook_fn


def mean_ablate(source, heads: Selection = None, positions: Selection = None, *,
                average_over: str = "batch"):
    """Replace the activation (or a selection of it) by its mean over a reference set.

    `source` is either the mean itself (a tensor broadcastable to the activation, e.g. [pos d_model]
    or [d_model]) or an ActivationCache/dict holding reference activations under the hook's name,
    averaged over `average_over` ("batch": a mean per position, so the reference and the ablated
    run need the same number of positions; "batch pos": one mean for every position).
    """
    if average_over not in ("batch", "batch pos"):
        raise ValueError(f"average_over must be 'batch' or 'batch pos', got {average_over!r}")

    def hook_fn(x: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        mean = _source(source, hook, "mean_ablate")
        if not isinstance(source, torch.Tensor):
            dims = [0] if average_over == "batch" else [0, _axis(hook, mean, POSITIONS)]
            if None in dims:
                raise ValueError(f"mean_ablate: hook {hook.name!r} [{hook.shape}] has no pos axis to "
                                 "average over")
            mean = mean.float().mean(dim=dims, keepdim=True)
        mean = _broadcast(mean, x, hook, "mean_ablate")
        return _replace(x, mean, selection_mask(x, hook, heads, positions))
    return hook_fn


def resample_ablate(source, heads: Selection = None, positions: Selection = None,
                    generator: torch.Generator | None = None):
    """Replace each batch row's activation (or a selection) by that of a randomly drawn other input.

    `source` holds the other inputs' activations, [n_inputs, ...rest of the hook's shape], as a tensor
    or under the hook's name in an ActivationCache/dict. Rows are drawn with replacement, afresh on
    every call, from `generator` (on the CPU) when given, so a seeded generator makes runs repeatable.
    """
    def hook_fn(x: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        src = _source(source, hook, "resample_ablate")
        if src.shape[1:] != x.shape[1:]:
            raise ValueError(f"resample_ablate: hook {hook.name!r} [{hook.shape}] is {tuple(x.shape)}; "
                             f"source rows {tuple(src.shape)} must match it after the batch axis")
        rows = torch.randint(src.shape[0], (x.shape[0],), generator=generator)
        return _replace(x, src[rows.to(src.device)], selection_mask(x, hook, heads, positions))
    return hook_fn


def patch_from_cache(cache, heads: Selection = None, positions: Selection = None):
    """Overwrite the activation (or a selection) with the one stored under `hook.name` in `cache`.

    The usual use is clean -> corrupted: cache a clean run, then run the corrupted input with this
    hook. The cached tensor must have the activation's shape, or batch 1 (broadcast to every row).
    """
    def hook_fn(x: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        src = _source(cache, hook, "patch_from_cache")
        if src.shape[1:] != x.shape[1:] or src.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"patch_from_cache: hook {hook.name!r} [{hook.shape}] is {tuple(x.shape)}, "
                             f"the cached activation is {tuple(src.shape)}")
        return _replace(x, src.to(x.device).expand_as(x), selection_mask(x, hook, heads, positions))
    return hook_fn


# ---------------------------------------------------------------------------------------------- edits
def add_vector(vector: torch.Tensor, scale: float = 1.0, positions: Selection = None):
    """Add ``scale * vector`` (broadcastable to the activation, e.g. [d_model]) at `positions` (steering)."""
    def hook_fn(x: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        delta = _broadcast(vector * scale, x, hook, "add_vector")
        mask = selection_mask(x, hook, None, positions)
        return x + (delta if mask is None else delta * mask)
    return hook_fn


def clamp(min: float | None = None, max: float | None = None, heads: Selection = None,
          positions: Selection = None):
    """Clamp the activation (or a selection of it) into [min, max]; either bound may be None."""
    if min is None and max is None:
        raise ValueError("clamp needs min, max or both")

    def hook_fn(x: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
        return _replace(x, x.clamp(min=min, max=max), selection_mask(x, hook, heads, positions))
    return hook_fn


def record(store: dict, append: bool = False):
    """Save a detached copy of the activation into ``store[hook.name]``; changes nothing.

    With `append`, ``store[hook.name]`` is a list with one tensor per call (e.g. per decoding step);
    otherwise each call overwrites the previous one.
    """
    def hook_fn(x: torch.Tensor, *, hook: HookPoint) -> None:
        copy = x.detach().clone()
        if append:
            store.setdefault(hook.name, []).append(copy)
        else:
            store[hook.name] = copy
    return hook_fn


__all__ = ["add_vector", "clamp", "mean_ablate", "patch_from_cache", "record", "resample_ablate",
           "selection_mask", "zero_ablate"]
