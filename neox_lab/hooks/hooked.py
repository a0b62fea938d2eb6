"""The hook API every model class shares: run_with_hooks, hooks(), add_hook, run_with_cache."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ..axes import POSITIONS, find_axis
from .activation_cache import ActivationCache, PosSlice, check_slice, slice_pos
from .points import HookFn, HookPoint, LayerIndex
from .registry import FLAG_HOOKS, check_flags, hook_names, layer_of, unavailable_reason, unknown_hook_message

NameOrFilter = str | Callable[[str], bool]
#: What `hooks`, `run_with_hooks` and `run_with_cache` take: (hook name or filter, hook function) pairs.
HookPairs = Iterable[tuple[NameOrFilter, HookFn]]


def _flag_property(flag: str) -> property:
    """`model.<flag>`: whether the stream flag is on; assigning it calls `set_<flag>`."""
    return property(lambda self: flag in self.stream_flags, lambda self, on: self._set_stream_flag(flag, on),
                    doc=f"Whether TransformerLens' stream flag {flag} is on (assigning calls set_{flag}).")


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
        order = {name: i for i, name in enumerate(hook_names(self.config, flags=None))}  # type: ignore[attr-defined]
        self._hook_points = dict(sorted(points.items(), key=lambda kv: order.get(kv[0], len(order))))
        # The flags live on the hook points (born off, as in TransformerLens): a view of a model keeps its flags.
        self._apply_stream_flags(self.stream_flags)

    # ------------------------------------------------------------------ stream flags
    @property
    def stream_flags(self) -> frozenset[str]:
        """The TransformerLens stream flags that are on (`registry.FLAG_HOOKS`); none by default."""
        return frozenset(flag for flag, names in FLAG_HOOKS.items()
                         if any(hp.available for name, hp in self._hook_points.items()
                                if name.startswith("blocks.") and name.split(".", 2)[2] in names))

    def _apply_stream_flags(self, flags: frozenset[str]) -> None:
        check_flags(flags)
        reasons = {name: unavailable_reason(name, flags) for name in self._hook_points}
        # A stream about to disappear must not take hooks with it, which would then silently never fire.
        busy = [name for name, hp in self._hook_points.items() if reasons[name] is not None and hp.active]
        if busy:
            shown = ", ".join(busy[:3]) + (", ..." if len(busy) > 3 else "")
            raise ValueError(f"hooks are attached to {shown}, which would stop existing with the stream flags "
                             f"{sorted(flags) or 'all off'}; remove them first (model.reset_hooks("
                             "including_permanent=True))")
        for name, hp in self._hook_points.items():
            hp.unavailable = reasons[name]

    def _set_stream_flag(self, flag: str, on: bool) -> None:
        if not isinstance(on, bool):
            raise TypeError(f"set_{flag} takes True or False, got {on!r}")
        self._apply_stream_flags(self.stream_flags | {flag} if on else self.stream_flags - {flag})

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """TransformerLens' flag: give every head its own copy of the block input for each of q, k and v,
        as hook points `blocks.{L}.hook_q_input`, `hook_k_input`, `hook_v_input` [batch pos n_heads d_model]
        (before ln1, which then normalises each copy). Editing head h's copy changes only head h's q (k, v).
        Off by default; while on, `ln1`'s own hook points do not exist (see registry.PER_HEAD_LN1)."""
        self._set_stream_flag("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """TransformerLens' flag: give every head its own copy of the block input, read by its q, k and v,
        as hook point `blocks.{L}.hook_attn_in` [batch pos n_heads d_model] (before ln1). Off by default;
        while on, `ln1`'s own hook points do not exist. With `use_split_qkv_input` on too, the q/k/v inputs
        are copies of `hook_attn_in`'s output (TransformerLens copies resid_pre there, dropping edits
        made at hook_attn_in)."""
        self._set_stream_flag("use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """TransformerLens' flag: the MLP's input before ln2 as hook point `blocks.{L}.hook_mlp_in`
        [batch pos d_model] (resid_pre on a parallel block, resid_mid on a sequential one; an edit there
        changes only what the MLP reads). Off by default."""
        self._set_stream_flag("use_hook_mlp_in", use_hook_mlp_in)

    use_split_qkv_input = _flag_property("use_split_qkv_input")
    use_attn_in = _flag_property("use_attn_in")
    use_hook_mlp_in = _flag_property("use_hook_mlp_in")

    # ------------------------------------------------------------------ lookup
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Make `run_with_cache()` without a filter cache `attn.hook_result` too (see `use_attn_result`)."""
        self.use_attn_result = bool(use_attn_result)

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook point by name (those behind a stream flag only while it is on)."""
        return {name: hp for name, hp in self._hook_points.items() if hp.available}

    @property
    def mod_dict(self) -> dict[str, Any]:
        """Every submodule by its path (TransformerLens' `mod_dict`): ``model.mod_dict["blocks.0.attn"]``."""
        strip = getattr(self, "_module_prefix", "")
        return {(path[len(strip):] if strip and path.startswith(strip) else path): module
                for path, module in self.named_modules()}  # type: ignore[attr-defined]

    def hook_names(self) -> list[str]:
        """Every hook name, in forward order (those behind a stream flag only while it is on)."""
        return [name for name, hp in self._hook_points.items() if hp.available]

    def _parallel(self) -> bool:
        return bool(self.config.use_parallel_residual)  # type: ignore[attr-defined]

    def resolve_hooks(self, name_or_filter: NameOrFilter | Iterable[str] | None) -> list[HookPoint]:
        """Hook points named by a name, a list of names, a predicate on names, or None (all)."""
        available = self.hook_dict
        if name_or_filter is None:
            return list(available.values())
        if callable(name_or_filter):
            return [hp for name, hp in available.items() if name_or_filter(name)]
        names = [name_or_filter] if isinstance(name_or_filter, str) else list(name_or_filter)
        out = []
        for name in names:
            if name in self._hook_points and name not in available:
                raise KeyError(f"hook point {name!r} is off: {self._hook_points[name].unavailable}")
            if name not in available:
                raise KeyError(unknown_hook_message(name, list(available), self._parallel()))
            out.append(available[name])
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
    def hooks(self, fwd_hooks: HookPairs = (), bwd_hooks: HookPairs = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> Iterator[HookedMixin]:
        """Attach hooks for the duration of a `with` block; they are removed however the block ends
        (with `reset_hooks_end=False` they stay, as temporary hooks `reset_hooks()` removes, as in
        TransformerLens; `clear_contexts=True` also empties the hook points' `ctx` dicts at the end).

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
            for hp, dir, entry in added if reset_hooks_end else ():
                fns = hp.fwd_fns if dir == "fwd" else hp.bwd_fns
                for i, e in enumerate(fns):
                    if e is entry:
                        del fns[i]
                        break
            if clear_contexts:
                for hp in self._hook_points.values():
                    hp.ctx.clear()

    def run_with_hooks(self, *args: Any, fwd_hooks: HookPairs = (), bwd_hooks: HookPairs = (),
                       reset_hooks_end: bool = True, clear_contexts: bool = False, **kwargs: Any) -> Any:
        """Forward with temporary hooks; returns what `forward` returns (`hooks()` says what the two
        switches do).

        Backward hooks are bound to the graph this forward builds, so a later `.backward()` on its
        output fires them even though the hook points are clean again by then (TransformerLens removes
        them first unless `reset_hooks_end=False`, and warns).
        """
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*args, **kwargs)  # type: ignore[operator]

    def run_with_cache(self, *args: Any, names_filter: NameOrFilter | Iterable[str] | None = None,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                       pos_slice: PosSlice = None, stop_at_layer: int | None = None, incl_bwd: bool = False,
                       remove_batch_dim: bool = False, reset_hooks_end: bool = True, clear_contexts: bool = False,
                       **kwargs: Any) -> tuple[Any, ActivationCache]:
        """Forward once, caching activations; returns ``(output, ActivationCache)``, as TransformerLens.

        The output is the logits (a `HookedTransformer` returns what its forward returns for these
        arguments, see its `return_type`; a transformers-convention class the logits of its output
        object), or, with `stop_at_layer=L`, the residual stream entering block L (L < 0 counts from
        the end: -1 stops before the last block). `names_filter` None caches every hook except each
        head's write `attn.hook_result` (the largest stream; as TransformerLens, it is cached when
        named, by a filter function, or after `set_use_attn_result(True)`). Activations are stored
        detached (on `device`, in `dtype` when given, indexed along their position axis by
        `pos_slice`: an int keeps the axis with one position, as TransformerLens' `Slice.unwrap`
        makes it a one-element list; the cache methods' int `pos_slice` drops it), under
        `torch.no_grad()` unless `incl_bwd`, in which case the output's loss (or the logits' sum when
        there is none) is backpropagated and gradients are cached under "<name>_grad".
        `remove_batch_dim=True` (batch 1) drops the batch axis of every cached tensor;
        `reset_hooks_end` / `clear_contexts` are `hooks()`'s.
        """
        check_slice(pos_slice)
        if incl_bwd and stop_at_layer is not None:
            raise ValueError("run_with_cache: incl_bwd=True needs the whole forward (a loss or logits to "
                             "backpropagate), so it cannot be combined with stop_at_layer")
        points = self.resolve_hooks(names_filter)
        if names_filter is None and not self.use_attn_result:
            points = [hp for hp in points if not hp.name.endswith("attn.hook_result")]
        if isinstance(pos_slice, int) and not isinstance(pos_slice, bool):
            pos_slice = [pos_slice]  # TransformerLens' Slice.unwrap: the position axis stays
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
        with grad_ctx, self.hooks(fwd, bwd, reset_hooks_end, clear_contexts):
            out = self(*args, stop_at_layer=stop_at_layer, **kwargs)  # type: ignore[operator]
            if incl_bwd:
                target = _backprop_target(out)
                target.backward()
        cache = ActivationCache(store, self)
        if remove_batch_dim:
            cache.remove_batch_dim()
        return _model_output(out), cache


def _model_output(out: Any) -> Any:
    """What run_with_cache returns for a forward's output: the logits (or, stopped early, the stream) of a
    transformers-style output object; anything else (a TransformerLens-style return) as it is."""
    if hasattr(out, "last_hidden_state"):
        return out.logits if out.logits is not None else out.last_hidden_state
    return out


def _backprop_target(out: Any) -> torch.Tensor:
    """What `run_with_cache(incl_bwd=True)` backpropagates: the loss when there is one, else the logits' sum."""
    if isinstance(out, tuple):  # return_type="both": (logits, loss)
        return out[1]
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 else out.sum()
    return out.loss if out.loss is not None else out.logits.sum()
