"""`HookPoint`: a named identity on one activation stream that hooks can read, replace or watch backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

HookFn = Callable[..., Any]


class HookError(RuntimeError):
    """A hook function misbehaved (wrong replacement shape or dtype, or a backward hook with no grad)."""


class LayerIndex(int):
    """A hook's block index: an int, and callable as TransformerLens' ``hook.layer()`` method."""

    def __call__(self) -> int:
        return int(self)


class HookPoint(nn.Module):
    """An identity that fires the hook functions attached to it.

    Hook functions are called as ``fn(tensor, hook=self)``; returning a tensor replaces the
    activation (same shape, dtype and device required), returning None keeps it. Backward hooks get
    the gradient of the activation and may return a replacement gradient.

    `__call__` is overridden so an idle hook point costs one attribute test, not a module call.
    """

    def __init__(self, shape: str = "") -> None:
        super().__init__()
        self.name: str = ""
        self.shape = shape
        #: The block this hook point is in (`LayerIndex`, so ``hook.layer()`` works too), None outside blocks.
        self.layer: LayerIndex | None = None
        self.ctx: dict = {}
        #: Why this stream does not exist right now (a stream flag is off, see registry.FLAG_HOOKS), or
        #: None when it does. An unavailable hook point accepts no hooks and is left out of `hook_dict`.
        self.unavailable: str | None = None
        self.fwd_fns: list[tuple[HookFn, bool]] = []
        self.bwd_fns: list[tuple[HookFn, bool]] = []

    def extra_repr(self) -> str:
        return f"{self.name!r} [{self.shape}]"

    @property
    def active(self) -> bool:
        return bool(self.fwd_fns or self.bwd_fns)

    @property
    def available(self) -> bool:
        """Whether the stream exists on this model now (False while its stream flag is off)."""
        return self.unavailable is None

    def add(self, fn: HookFn, dir: str = "fwd", permanent: bool = False) -> None:
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"hook {self.name!r}: dir must be 'fwd' or 'bwd', got {dir!r}")
        if self.unavailable is not None:
            raise HookError(f"hook point {self.name!r} is off: {self.unavailable}")
        (self.fwd_fns if dir == "fwd" else self.bwd_fns).append((fn, permanent))

    def remove(self, including_permanent: bool = False, dir: str = "both") -> None:
        keep = (lambda p: p and not including_permanent)
        if dir in ("fwd", "both"):
            self.fwd_fns = [(f, p) for f, p in self.fwd_fns if keep(p)]
        if dir in ("bwd", "both"):
            self.bwd_fns = [(f, p) for f, p in self.bwd_fns if keep(p)]
        if not self.active:
            self.ctx.clear()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.fwd_fns and not self.bwd_fns:
            return x
        return self._fire(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def fire_checked(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``(self(x), untouched)``: untouched is True when the hooks left the activation as it was, i.e.
        returned None or x itself, edited nothing in place (x's version counter, shared by its views,
        did not move) and no backward hook is attached (that hands on a new view, to be differentiated).

        A caller may then compute what follows from a faster form that never needed x (the fused output
        projection instead of hook_result's heads, the fast attention kernel instead of hook_pattern's
        softmax). Edits through `x.data` bypass the version counter and are not seen: edit `x` itself.
        An inference tensor keeps no version counter, so it is reported touched whenever a hook ran."""
        if not self.fwd_fns and not self.bwd_fns:
            return x, True
        if x.is_inference():
            return self._fire(x), False
        version = x._version
        out = self._fire(x)
        return out, out is x and x._version == version

    def _checked(self, new: Any, old: torch.Tensor, what: str) -> torch.Tensor:
        if new is None:
            return old
        if not isinstance(new, torch.Tensor):
            raise HookError(f"hook {self.name!r}: {what} returned {type(new).__name__}, expected a tensor or None")
        if new.shape != old.shape or new.dtype != old.dtype or new.device != old.device:
            raise HookError(
                f"hook {self.name!r}: {what} returned a tensor of shape {tuple(new.shape)}, {new.dtype}, "
                f"{new.device}; the activation [{self.shape}] is {tuple(old.shape)}, {old.dtype}, {old.device}"
            )
        return new

    def _fire(self, x: torch.Tensor) -> torch.Tensor:
        for fn, _ in list(self.fwd_fns):
            x = self._checked(fn(x, hook=self), x, "forward hook")
        if self.bwd_fns:
            if not x.requires_grad:
                raise HookError(
                    f"hook {self.name!r}: a backward hook is attached but this activation does not require "
                    "grad (gradients disabled, or nothing upstream requires grad)"
                )
            fns = list(self.bwd_fns)

            def on_grad(grad: torch.Tensor) -> torch.Tensor:
                for fn, _ in fns:
                    grad = self._checked(fn(grad, hook=self), grad, "backward hook")
                return grad

            # Backward hooks see the activation that flows on, i.e. after forward replacements.
            x = x.view_as(x)
            x.register_hook(on_grad)
        return x
