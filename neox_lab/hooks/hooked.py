"""The hook API every model class shares: run_with_hooks, hooks(), add_hook, run_with_cache."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ..axes import POSITIONS, find_axis
from .activation_cache import ActivationCache, PosSlice, check_slice, slice_pos
from .points import HookFn, HookPoint, LayerIndex
from .registry import hook_names, layer_of, unknown_hook_message

NameOrFilter = str | Callable[[str], bool]
#: What `hooks`, `run_with_hooks` and `run_with_cache` take: (hook name or filter, hook function) pairs.
HookPairs = Iterable[tuple[NameOrFilter, HookFn]]


class HookedMixin:
    """Mixed into `torch.nn.Module`s whose tree holds `HookPoint`s; names them and runs hooks."""

    _hook_points: dict[str, HookPoint]
    #: Whether `run_with_cache()` with no filter caches each head's write `attn.hook_result` (n_heads times
    #: attn_out's size, built only when hooked): TransformerLens' `use_attn_result`, off by default there too.
    use_attn_result: bool = False

    def _setup_hooks(self, strip: str = "") -> None:
        points = {}
        self._module_prefix = strip
        for path, module in self.named_modules():  # type: ignore[attr-defined]
            if isinstance(module, HookPoint):
                name = path[len(strip):] if strip and path.startswith(strip) else path
                module.name = name
                layer = layer_of(name)
                module.layer = None if layer is None else LayerIndex(layer)
                points[name] = module
        order = {name: i for i, name in enumerate(hook_names(self.cfg))}  # type: ignore[attr-defined]
        self._hook_points = dict(sorted(points.items(), key=lambda kv: order.get(kv[0], len(order))))

    # ------------------------------------------------------------------ lookup
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Make `run_with_cache()` without a filter cache `attn.hook_result` too (see `use_attn_result`)."""
        self.use_attn_result = bool(use_attn_result)

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook point by name."""
        return dict(self._hook_points)

    @property
    def mod_dict(self) -> dict[str, Any]:
        """Every submodule by its path (TransformerLens' `mod_dict`): ``model.mod_dict["blocks.0.attn"]``."""
        strip = getattr(self, "_module_prefix", "")
        return {(path[len(strip):] if strip and path.startswith(strip) else path): module
                for path, module in self.named_modules()}  # type: ignore[attr-defined]

    def hook_names(self) -> list[str]:
        """Every hook name, in forward order."""
        return list(self._hook_points)

    def _parallel(self) -> bool:
        return bool(self.cfg.use_parallel_residual)  # type: ignore[attr-defined]

    def resolve_hooks(self, name_or_filter: NameOrFilter | Iterable[str] | None) -> list[HookPoint]:
        """Hook points named by a name, a list of names, a predicate on names, or None (all)."""
        if name_or_filter is None:
            return list(self._hook_points.values())
        if callable(name_or_filter):
            return [hp for name, hp in self._hook_points.items() if name_or_filter(name)]
        names = [name_or_filter] if isinstance(name_or_filter, str) else list(name_or_filter)
        out = []
        for name in names:
            if name not in self._hook_points:
                raise KeyError(unknown_hook_message(name, list(self._hook_points), self._parallel()))
            out.append(self._hook_points[name])
        return out

    # ------------------------------------------------------------------ attaching
    def add_hook(self, name: NameOrFilter, fn: HookFn, dir: str = "fwd", permanent: bool = False) -> None:
        """Attach `fn(tensor, *, hook) -> tensor | None` to a hook point (or every one a filter selects)."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        for hp in self.resolve_hooks(name):
            hp.add(fn, dir=dir, permanent=permanent)

    def add_perma_hook(self, name: NameOrFilter, fn: HookFn, dir: str = "fwd") -> None:
        """Attach a hook that `reset_hooks()` and the end of a `hooks()` block leave in place; only
        ``reset_hooks(including_permanent=True)`` removes it (as TransformerLens)."""
        self.add_hook(name, fn, dir=dir, permanent=True)

    def reset_hooks(self, including_permanent: bool = False) -> None:
        """Remove every temporary hook (and permanent ones too if asked)."""
        for hp in self._hook_points.values():
            hp.remove(including_permanent=including_permanent)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: HookPairs = (), bwd_hooks: HookPairs = ()) -> Iterator[HookedMixin]:
        """Attach hooks for the duration of a `with` block; they are removed however the block ends.

        Every name is resolved before anything is attached, so a bad name attaches nothing.
        """
        plan = []
        for dir, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
            for name, fn in pairs:
                plan.extend((hp, dir, fn) for hp in self.resolve_hooks(name))
        added = []
        try:
            for hp, dir, fn in plan:
                entry = (fn, False)
                (hp.fwd_fns if dir == "fwd" else hp.bwd_fns).append(entry)
                added.append((hp, dir, entry))
            yield self
        finally:
            for hp, dir, entry in added:
                fns = hp.fwd_fns if dir == "fwd" else hp.bwd_fns
                for i, e in enumerate(fns):
                    if e is entry:
                        del fns[i]
                        break

    def run_with_hooks(self, *args: Any, fwd_hooks: HookPairs = (), bwd_hooks: HookPairs = (), **kwargs: Any) -> Any:
        """Forward with temporary hooks; returns what `forward` returns.

        Backward hooks are bound to the graph this forward builds, so a later `.backward()` on its
        output fires them even though the hook points are clean again by then.
        """
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(*args, **kwargs)  # type: ignore[operator]

    def run_with_cache(self, *args: Any, names_filter: NameOrFilter | Iterable[str] | None = None,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                       pos_slice: PosSlice = None, stop_at_layer: int | None = None, incl_bwd: bool = False,
                       remove_batch_dim: bool = False, **kwargs: Any) -> tuple[Any, ActivationCache]:
        """Forward once, caching activations; returns ``(output, ActivationCache)``.

        The output is what `forward` returns for these arguments (logits for TransformerLens-style
        calls, see `forward`'s `return_type`; None with `stop_at_layer`; the logits for HF-style calls).
        `names_filter` None caches every hook except each head's write `attn.hook_result` (the
        largest stream; as TransformerLens, it is cached when named, by a filter function, or after
        `set_use_attn_result(True)`). Activations are stored detached (on `device`, in `dtype` when
        given, indexed along their position axis by `pos_slice`: an int drops the axis, as in
        TransformerLens), under `torch.no_grad()` unless `incl_bwd`, in which case the output's loss
        (or the logits' sum when there is none) is backpropagated and gradients are cached under
        "<name>_grad". `stop_at_layer=L` runs blocks 0..L-1 only. `remove_batch_dim=True` (batch 1)
        drops the batch axis of every cached tensor.
        """
        check_slice(pos_slice)
        if incl_bwd and stop_at_layer is not None:
            raise ValueError("run_with_cache: incl_bwd=True needs the whole forward (a loss or logits to "
                             "backpropagate), so it cannot be combined with stop_at_layer")
        points = self.resolve_hooks(names_filter)
        if names_filter is None and not self.use_attn_result:
            points = [hp for hp in points if not hp.name.endswith("attn.hook_result")]
        store: dict[str, torch.Tensor] = {}

        def saver(suffix: str):
            def save(t: torch.Tensor, *, hook: HookPoint) -> None:
                axis = find_axis(hook.shape, POSITIONS)
                t = t.detach() if axis is None else slice_pos(t.detach(), pos_slice, dim=axis)
                store[hook.name + suffix] = t.to(device=device or t.device, dtype=dtype or t.dtype)
            return save

        fwd = [(hp.name, saver("")) for hp in points]
        bwd = [(hp.name, saver("_grad")) for hp in points] if incl_bwd else []
        grad_ctx = contextlib.nullcontext() if incl_bwd else torch.no_grad()
        with grad_ctx, self.hooks(fwd, bwd):
            out = self(*args, stop_at_layer=stop_at_layer, **kwargs)  # type: ignore[operator]
            if incl_bwd:
                target = _backprop_target(out)
                target.backward()
        cache = ActivationCache(store, self)
        if remove_batch_dim:
            cache.remove_batch_dim()
        if stop_at_layer is not None:
            return None, cache
        return (out.logits if hasattr(out, "logits") else out), cache


def _backprop_target(out: Any) -> torch.Tensor:
    """What `run_with_cache(incl_bwd=True)` backpropagates: the loss when there is one, else the logits' sum."""
    if isinstance(out, tuple):  # return_type="both": (logits, loss)
        return out[1]
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 else out.sum()
    return out.loss if out.loss is not None else out.logits.sum()
