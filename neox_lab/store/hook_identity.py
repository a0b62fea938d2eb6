"""What a hook function does, as a digest: so that a store started with "ablate head 0" is not resumed
with "ablate head 3", the same function with another argument. Also which hooks are attached to a model
(`attached_hooks`) and the manifest's record of them (`hooks_identity`).

A function's fingerprint covers its code (bytecode, constants and names, nested code included, but not
its file or line numbers), its default arguments, the values in its closure and the module globals its
code names; a `functools.partial` adds its arguments, a bound method its object, a callable object its
attributes. Values are hashed by content: numbers, strings, containers, tensors and arrays (every byte),
modules and classes by name, other functions recursively, other objects by their attributes. The model
being cached is a marker (its weights are fingerprinted on their own). A value with no content to hash
(an open file, a C object without attributes) raises `HookIdentityError`: the caller then names the
hooks' behaviour itself (`cache_dataset(..., allow_hooks="ablate L3H0 with the mean of run 7")`).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import struct
import types
from typing import Any

import numpy as np
import torch

#: Bounds on one fingerprint: a hook that reaches more objects than this is refused, not hashed forever.
MAX_OBJECTS = 200_000
MAX_DEPTH = 64

_SCALARS = (type(None), bool, int, float, complex, str, bytes, slice, range, type(Ellipsis), torch.dtype,
            torch.device, torch.Size)


class HookIdentityError(ValueError):
    """A hook function holds a value whose content cannot be fingerprinted."""


def _state_in_attributes(cls: type) -> bool:
    """Whether instances of `cls` keep all their state in __dict__ and __slots__: every class of its MRO
    is made by a class statement (or like one) and the C layout is `object`'s plus one pointer per slot,
    the weak-reference list and (where not kept before the object) the dict; a type written in C (a
    lock, a file, a generator) fails one or the other."""
    if not all(c.__flags__ & (1 << 9) for c in cls.__mro__[:-1]):  # Py_TPFLAGS_HEAPTYPE: not built in C
        return False
    slots = sum(type(v).__name__ == "member_descriptor" for c in cls.__mro__ for v in vars(c).values())
    pointers = slots + bool(cls.__weakrefoffset__) + (cls.__dictoffset__ > 0)
    return cls.__itemsize__ == 0 and cls.__basicsize__ == object.__basicsize__ + pointers * struct.calcsize("P")


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


class _Fingerprint:
    def __init__(self, model: Any):
        self.model, self.h, self.count = model, hashlib.sha256(), 0
        self.seen: dict[int, int] = {}  # id -> order of first visit
        self.alive: list = []  # what `seen` refers to, kept alive so that no id is reused meanwhile

    def put(self, tag: str, text: str = "") -> None:
        self.h.update(f"{tag}[{len(text)}]{text};".encode())

    def value(self, v: Any, where: str, depth: int = 0) -> None:
        self.count += 1
        if self.count > MAX_OBJECTS or depth > MAX_DEPTH:
            raise HookIdentityError(f"{where}: the hook reaches more than {MAX_OBJECTS:,} objects (or nests deeper "
                                    f"than {MAX_DEPTH}) to fingerprint")
        if isinstance(v, _SCALARS):
            self.put(type(v).__name__, repr(v))
            return
        if v is self.model:
            self.put("model", "the model being cached")  # its weights are fingerprinted on their own
            return
        if id(v) in self.seen:  # a cycle, or an object met twice: refer back to it
            self.put("ref", str(self.seen[id(v)]))
            return
        self.seen[id(v)] = len(self.seen)
        self.alive.append(v)
        deeper = depth + 1
        if isinstance(v, enum.Enum):
            self.put("enum", f"{type(v).__module__}.{type(v).__qualname__}.{v.name}")
        elif isinstance(v, torch.Tensor):
            if v.device.type == "meta":
                raise HookIdentityError(f"{where} is a tensor on the meta device: it holds no values")
            data = v.detach().to("cpu").contiguous()
            raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
            self.put("tensor", f"{data.dtype}{tuple(data.shape)}{hashlib.sha256(raw).hexdigest()}")
        elif isinstance(v, (np.ndarray, np.generic)):
            data = np.ascontiguousarray(v)
            if data.dtype.hasobject:
                raise HookIdentityError(f"{where}: a numpy array of Python objects cannot be fingerprinted")
            self.put("ndarray", f"{data.dtype}{data.shape}{hashlib.sha256(data.tobytes()).hexdigest()}")
        elif isinstance(v, (tuple, list)):
            self.put(type(v).__name__, str(len(v)))
            for i, item in enumerate(v):
                self.value(item, f"{where}[{i}]", deeper)
        elif isinstance(v, dict):
            self.put(type(v).__name__, str(len(v)))
            for key, item in v.items():
                self.value(key, f"{where} (a key)", deeper)
                self.value(item, f"{where}[{key!r}]", deeper)
        elif isinstance(v, (set, frozenset)):
            parts = []
            for item in v:
                sub = _Fingerprint(self.model)
                sub.value(item, f"{where} (an element)", deeper)
                parts.append(sub.h.hexdigest())
            self.put(type(v).__name__, ",".join(sorted(parts)))
        elif isinstance(v, types.ModuleType):
            self.put("module", v.__name__)
        elif isinstance(v, type):
            self.put("class", f"{v.__module__}.{v.__qualname__}")
        elif isinstance(v, types.CodeType):
            self.code(v, where, deeper)
        elif isinstance(v, types.FunctionType):
            self.function(v, where, deeper)
        elif isinstance(v, functools.partial):
            self.put("partial")
            self.value(v.func, f"{where}.func", deeper)
            self.value(v.args, f"{where}.args", deeper)
            self.value(v.keywords, f"{where}.keywords", deeper)
        elif isinstance(v, types.MethodType):
            self.put("method")
            self.value(v.__func__, f"{where}.__func__", deeper)
            self.value(v.__self__, f"{where}.__self__", deeper)
        elif isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodWrapperType,
                            types.WrapperDescriptorType, types.MethodDescriptorType)):
            owner = getattr(v, "__self__", None)
            self.put("builtin", f"{getattr(v, '__module__', None)}.{getattr(v, '__qualname__', v.__name__)}")
            if owner is not None and not isinstance(owner, types.ModuleType):
                self.value(owner, f"{where}.__self__", deeper)
        else:
            self.instance(v, where, deeper)

    def code(self, code: types.CodeType, where: str, depth: int) -> None:
        # Not the file name or line numbers: moving a function must not change what it does.
        self.put("code", f"{code.co_name}:{code.co_argcount}:{code.co_kwonlyargcount}:{code.co_flags}")
        self.put("bytecode", code.co_code.hex())
        for label in ("co_names", "co_varnames", "co_freevars", "co_cellvars"):
            self.put(label, ",".join(getattr(code, label)))
        for i, const in enumerate(code.co_consts):
            self.value(const, f"{where} (constant {i})", depth)

    def function(self, fn: types.FunctionType, where: str, depth: int) -> None:
        self.put("function", f"{fn.__module__}.{fn.__qualname__}")
        self.code(fn.__code__, where, depth)
        self.value(fn.__defaults__, f"{where} (defaults)", depth)
        self.value(fn.__kwdefaults__, f"{where} (keyword defaults)", depth)
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                self.put("empty cell", name)
                continue
            self.value(content, f"{where}, closure variable {name!r}", depth)
        globals_ = fn.__globals__
        for name in sorted(_code_names(fn.__code__)):
            if name in globals_:  # attribute names are in co_names too; only globals count
                self.put("global", name)
                self.value(globals_[name], f"{where}, global {name!r}", depth)

    def instance(self, v: Any, where: str, depth: int) -> None:
        cls = type(v)
        # Only classes written in Python keep their whole state in attributes; a C type (a file, a lock, a
        # generator) keeps it where no fingerprint can read it.
        if not _state_in_attributes(cls):
            raise HookIdentityError(f"{where} is a {cls.__module__}.{cls.__qualname__}, whose state cannot be "
                                    "read to fingerprint it")
        slots = [s for c in cls.__mro__ for s in getattr(c, "__slots__", ()) if isinstance(s, str)]
        attrs = dict(getattr(v, "__dict__", {}))
        attrs.update({s: getattr(v, s) for s in slots if s not in ("__dict__", "__weakref__") and hasattr(v, s)})
        self.put("object", f"{cls.__module__}.{cls.__qualname__}")
        for name in sorted(attrs):
            self.value(attrs[name], f"{where}.{name}", depth)


def hook_fingerprint(fn: Any, model: Any = None, where: str = "hook") -> str:
    """The sha256 of what `fn` does (see the module docstring); `HookIdentityError` when some value it
    holds cannot be fingerprinted. `model` (the model being cached) counts as a marker, not by content."""
    fingerprint = _Fingerprint(model)
    fingerprint.value(fn, where)
    return fingerprint.h.hexdigest()


def attached_hooks(model) -> dict[str, list]:
    """Forward hook functions attached to the model right now, by hook point or module name: a permanent
    ablation changes every activation, so a store must not mix runs with and without it."""
    found = {hp.name: [fn for fn, _ in hp.fwd_fns] for hp in model.resolve_hooks(None) if hp.fwd_fns}
    for name, module in model.named_modules():
        fns = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        if fns:
            found[f"module {name or '(root)'}"] = fns
    return found


def hook_name(fn) -> str:
    """A hook function's name for messages and the manifest (a partial's function's, an object's class)."""
    return getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__", None) or \
        type(fn).__qualname__


def hooks_identity(model, found: dict[str, list], allow_hooks: bool | str) -> dict:
    """The manifest's record of the attached hooks, part of the store's identity: each function's name and
    fingerprint (`hook_fingerprint`: code, closure values, partial arguments, globals), or, when
    `allow_hooks` is a string, that string as the identity the user vouches for."""
    if not found:
        return {}
    if isinstance(allow_hooks, str):
        names = {where: [hook_name(fn) for fn in fns] for where, fns in found.items()}
        return {"identity": allow_hooks, "functions": names}
    record = {}
    for where, fns in found.items():
        entries = []
        for fn in fns:
            try:
                fingerprint = hook_fingerprint(fn, model, f"hook {hook_name(fn)} on {where}")
            except HookIdentityError as err:
                raise HookIdentityError(f"{err}, so a resumed store could not tell it from another hook; pass "
                                        "allow_hooks='<a string naming what the hooks do>' to vouch for their "
                                        "identity yourself") from None
            entries.append({"function": hook_name(fn), "fingerprint": fingerprint})
        record[where] = entries
    return record
