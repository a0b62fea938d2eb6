"""Your own port as a side of `compare`: any `nn.Module` or callable, seen through the maps you give.

Three levels of access, each optional beyond the first:

1. logits: the module (or callable) is called as `f(input_ids, attention_mask)` and returns logits
   [batch pos vocab] (a tensor, an output with `.logits`, or a tuple whose first element they are);
   a module whose forward takes only the ids is called as `f(input_ids)` and skips padded inputs.
2. a hook map, neox_lab hook names to your module paths, read with torch forward hooks:

       {"blocks.{L}.hook_resid_post": "layers.{L}",                      # the module's output
        "blocks.{L}.hook_resid_pre": ("layers.{L}", "input"),            # its first input
        "blocks.{L}.attn.hook_z": ("layers.{L}.attn.o_proj", "input"),   # [b p (h d)] is viewed as [b p h d]
        "blocks.{L}.mlp.hook_post": ("layers.{L}.mlp.act", "output", lambda t: t.float())}

   `{L}` stands for every layer. A stream of another layout needs the transform (the last element)
   to return it in the hook's shape (`neox_lab.hooks.registry.hook_names(cfg)` lists them): a
   per-head stream [batch pos n_heads d_head] given as [batch pos d_model] and a LayerNorm scale
   given as [batch pos] are reshaped for you.
3. a weight map, your state-dict names to checkpoint names (neox_lab's `blocks.{L}.attn.qkv.weight`
   or transformers' `gpt_neox.layers.{L}.attention.query_key_value.weight`), with a transform from
   the checkpoint's layout to yours for fused tensors:

       {"layers.{L}.q_proj.weight": ("blocks.{L}.attn.qkv.weight", qkv_part("query", n_heads)),
        "layers.{L}.mlp.fc1.bias": "blocks.{L}.mlp.fc_in.bias"}

   A checkpoint name may be a tuple of names: the transform then receives one tensor per name.

Decoding: `step(input_ids, past) -> (logits, past)` (past None on the first call: the prompt) and/or
`generate(input_ids, max_new_tokens) -> ids`. `Port` bundles a module with all of these, so one
object (e.g. what a `py:package.module:factory` returns to `neox-lab compare`) carries them.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..axes import HEADS, LN_SCALE
from ..config import NeoXConfig
from ..hooks.registry import hook_names, unknown_hook_message
from ..model.loading import hf_to_neox_key
from .side_base import Side, eval_mode, first, logits_of

LAYER = "{L}"
WHERE = ("output", "input")


@dataclass
class Port:
    """A port of NeoX (an `nn.Module` or a callable) with what `compare` may use to look inside it.

    model: the module or callable; called as `model(input_ids, attention_mask)` unless `logits` is given.
    hooks: hook map (see the module docstring). weights: weight map. step / generate: decoding.
    config: the NeoX config the port implements (default: the other side's).
    logits: `(input_ids, attention_mask) -> logits`, when calling `model` directly does not give them.
    dtype: the precision it computes in (default: its parameters', else its logits').
    name: how reports call it.
    """

    model: object
    hooks: Mapping | None = None
    weights: Mapping | None = None
    step: Callable | None = None
    generate: Callable | None = None
    config: NeoXConfig | None = None
    logits: Callable | None = None
    dtype: torch.dtype | None = None
    name: str | None = None


@dataclass
class Tap:
    """One entry of a hook map after parsing: where a hook's stream is read in the port."""

    hook: str  # neox_lab hook name, layer filled in
    path: str  # module path, layer filled in
    where: str  # "output" or "input"
    transform: Callable | None


@dataclass
class WeightEntry:
    """One entry of a weight map after parsing: a port tensor and the checkpoint tensors it equals."""

    name: str  # the port's state-dict name
    sources: tuple[str, ...]  # neox_lab body-relative names
    transform: Callable | None
    layer: int | None


def qkv_part(part: str, n_heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A weight-map transform: the "query", "key" or "value" rows of the fused QKV weight or bias
    (transformers' layout, per head (n_heads qkv d_head)), as a separate projection stores them."""
    index = ("query", "key", "value").index(part)

    def pick(t: torch.Tensor) -> torch.Tensor:
        rows = t.reshape(n_heads, 3, -1, *t.shape[1:])[:, index]
        return rows.reshape(-1, *t.shape[1:])
    return pick


class PortSide(Side):
    kind = "port"

    def __init__(self, obj, label: str, *, hooks=None, weights=None, step=None, generate=None, config=None,
                 logits=None, dtype=None, name=None):
        if isinstance(obj, Port):
            given = {"hooks": hooks, "weights": weights, "step": step, "generate": generate, "config": config,
                     "logits": logits, "dtype": dtype, "name": name}
            twice = [k for k, v in given.items() if v is not None and getattr(obj, k) is not None]
            if twice:
                raise TypeError(f"{label}: {', '.join(twice)} given both in the Port and to compare; give each once")
            hooks, weights, step, generate = (hooks or obj.hooks, weights or obj.weights, step or obj.step,
                                              generate or obj.generate)
            config, logits, dtype, name = (config or obj.config, logits or obj.logits, dtype or obj.dtype,
                                           name or obj.name)
            obj = obj.model
        if not (isinstance(obj, torch.nn.Module) or callable(obj)):
            raise TypeError(f"{label}: expected a neox_lab model, a transformers GPTNeoX model, an nn.Module, a "
                            f"callable f(input_ids, attention_mask) -> logits, or a Port; got {type(obj).__name__}")
        super().__init__(obj, label)
        self.module = obj if isinstance(obj, torch.nn.Module) else None
        if (hooks or weights) and self.module is None:
            raise TypeError(f"{label}: a hook map or weight map needs an nn.Module to read (got a plain "
                            f"{type(obj).__name__}); wrap the module in Port(module, logits=your_callable, ...)")
        self.hook_spec, self.weight_spec = hooks, weights
        self.taps: dict[str, Tap] = {}
        self.weight_entries: list[WeightEntry] = []
        self._step, self._generate = step, generate
        self.can_step, self.can_generate = step is not None, generate is not None or step is not None
        self.cfg = config
        self.config_from_other = config is None  # held to the other side's config (set by bind)
        self.name = name or type(obj).__name__
        self._call = logits
        if logits is None:
            self.accepts_mask = _takes_mask(obj)
        params = [p for p in self.module.parameters() if p.is_floating_point()] if self.module is not None else []
        self.dtype_known = dtype is not None or bool(params)
        self.dtype = dtype or (params[0].dtype if params else torch.float32)
        self.device = params[0].device if params else torch.device("cpu")
        self.backend = "port"
        self.architecture = self.name

    @property
    def library(self) -> str:
        return "port"

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.") + ("" if self.dtype_known else " (from its logits)")
        return f"port {self.name} {dtype} on {self.device}"

    def short(self) -> str:
        return f"port {self.name} ({str(self.dtype).removeprefix('torch.')})"

    def bind(self, cfg: NeoXConfig) -> None:
        """Expand and check the maps against the config (`{L}` over its layers, hook names known)."""
        if self.cfg is None:
            self.cfg = cfg
        if self.hook_spec:
            self.taps = parse_hook_map(self.hook_spec, self.cfg, self.module, self.label)
        if self.weight_spec:
            self.weight_entries = parse_weight_map(self.weight_spec, self.cfg, self.module, self.label)

    def unobservable(self, names):
        why = f"not in {self.label}'s hook map" if self.hook_spec else f"{self.label} is a port without a hook map"
        return {n: why for n in names if n not in self.taps}

    def run(self, ids, mask, names, stop_at_layer=None):
        if mask is not None and not self.accepts_mask:
            raise TypeError(f"{self.label}: its forward takes no attention_mask")
        ids = ids.to(self.device)
        mask = None if mask is None else mask.to(self.device)
        raw, fired, handles = {}, {}, []
        for name in names:
            tap = self.taps.get(name)
            if tap is None:
                continue
            module = self.module.get_submodule(tap.path)

            def keep(t, tap=tap):
                fired[tap.hook] = fired.get(tap.hook, 0) + 1
                if isinstance(t, torch.Tensor):
                    raw[tap.hook] = t.detach()
            if tap.where == "output":
                handles.append(module.register_forward_hook(lambda m, a, out, keep=keep: keep(first(out))))
            else:
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, kw, keep=keep: keep(a[0] if a else next(iter(kw.values()), None)), with_kwargs=True))
        try:
            with eval_mode(self.model), torch.no_grad():
                logits = self._logits(ids, mask)
        finally:
            for h in handles:
                h.remove()
        many = {n: k for n, k in fired.items() if k > 1}
        if many:
            name, k = next(iter(many.items()))
            raise ValueError(f"{self.label}: hook map entry {name!r} ({self.taps[name].path}) fired {k} times in one "
                             "forward; map a module that runs once per forward (one per layer, with {L})")
        shapes = hook_names(self.cfg)
        store = {name: conform(self.taps[name], t, shapes[name], self.cfg, self.label, ids.shape)
                 for name, t in raw.items()}
        if not self.dtype_known:
            self.dtype = logits.dtype
        return store, logits

    def _logits(self, ids, mask):
        how = "logits(input_ids, attention_mask)" if self._call is not None else \
            f"{self.name}(input_ids{', attention_mask' if self.accepts_mask else ''})"
        try:
            if self._call is not None:
                out = self._call(ids, mask)
            elif self.accepts_mask:
                out = self.model(ids, mask)
            else:
                out = self.model(ids)
        except Exception as err:
            raise RuntimeError(f"{self.label}: calling the port as {how} on ids {tuple(ids.shape)} raised "
                               f"{type(err).__name__}: {err}") from err
        return logits_of(out)

    def step(self, ids, mask, past):
        if mask is not None:
            raise TypeError(f"{self.label}: a port's step takes no attention_mask")
        with eval_mode(self.model), torch.no_grad():
            logits, past = self._step(ids.to(self.device), past)
        return logits_of(logits), past

    def generate(self, ids, mask, n):
        if mask is not None:
            raise TypeError(f"{self.label}: a port's generate takes no attention_mask")
        ids = ids.to(self.device)
        with eval_mode(self.model), torch.no_grad():
            out = torch.as_tensor(self._generate(ids, n))
        # A generate that returns only the new tokens is accepted too.
        return out if out.shape[1] == ids.shape[1] + n else torch.cat((ids, out.to(ids.device)), dim=1)


def _takes_mask(fn) -> bool:
    """Whether `fn` (a module's forward, or a callable) takes an attention mask as well as the ids."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.name == "attention_mask" for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _expand(key: str, value, cfg: NeoXConfig):
    """(key, value) with `{L}` filled in for each layer, or once when neither has it."""
    if LAYER not in key:
        return [(key, value, None)]
    return [(key.replace(LAYER, str(L)), value, L) for L in range(cfg.num_hidden_layers)]


def _fill(text: str, layer: int | None) -> str:
    return text if layer is None else text.replace(LAYER, str(layer))


def parse_hook_map(spec: Mapping, cfg: NeoXConfig, module: torch.nn.Module, label: str) -> dict[str, Tap]:
    """neox_lab hook name -> Tap, every `{L}` expanded; names and module paths checked now, with the fix."""
    known = hook_names(cfg)
    modules = dict(module.named_modules())
    taps = {}
    for key, value in spec.items():
        path, where, transform = _hook_value(key, value, label)
        for name, _, layer in _expand(key, value, cfg):
            if name not in known:
                why = unknown_hook_message(name, list(known), cfg.use_parallel_residual)
                raise KeyError(f"{label}'s hook map: {why}")
            target = _fill(path, layer)
            if target not in modules:
                raise KeyError(f"{label}'s hook map: {name!r} -> {target!r}, but the port has no module {target!r}"
                               f"{_close(target, list(modules))}")
            taps[name] = Tap(name, target, where, transform)
    return taps


def _hook_value(key, value, label) -> tuple[str, str, Callable | None]:
    if isinstance(value, str):
        return value, "output", None
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        rest = list(value[1:])
        where = rest.pop(0) if rest and isinstance(rest[0], str) else "output"
        transform = rest.pop(0) if rest and callable(rest[0]) else None
        if where in WHERE and not rest:
            return value[0], where, transform
    raise ValueError(f"{label}'s hook map: {key!r} -> {value!r}; give a module path, (path, 'input'|'output') or "
                     "(path, 'input'|'output', transform)")


def conform(tap: Tap, t: torch.Tensor, shape: str, cfg: NeoXConfig, label: str, ids_shape) -> torch.Tensor:
    """The tapped tensor in the hook's shape: the transform, then the two reshapes that are unambiguous;
    a shape that is still not the hook's is an error naming the entry and the fix."""
    if tap.transform is not None:
        t = tap.transform(t)
    dims = shape.split()
    if shape == HEADS and t.dim() == 3 and t.shape[-1] == cfg.hidden_size:
        t = t.reshape(*t.shape[:2], cfg.num_attention_heads, cfg.head_dim)
    elif shape == LN_SCALE and t.dim() == 2:
        t = t[..., None]
    sizes = {"batch": ids_shape[0], "pos": ids_shape[1], "query_pos": ids_shape[1], "key_pos": ids_shape[1],
             "d_model": cfg.hidden_size, "n_heads": cfg.num_attention_heads, "d_head": cfg.head_dim,
             "d_mlp": cfg.intermediate_size, "1": 1}
    want = [sizes.get(d) for d in dims]
    if t.dim() != len(dims) or any(w is not None and w != n for w, n in zip(want, t.shape)):
        raise ValueError(f"{label}'s hook map: {tap.hook} ({shape}) read from {tap.path} ({tap.where}) has shape "
                         f"{tuple(t.shape)}; add a transform that returns [{shape}] (hook map entry: "
                         f"(path, {tap.where!r}, transform))")
    return t


def parse_weight_map(spec: Mapping, cfg: NeoXConfig, module: torch.nn.Module, label: str) -> list[WeightEntry]:
    """Port tensor name -> checkpoint tensor names (neox_lab body-relative), every `{L}` expanded."""
    own = module.state_dict()
    entries = []
    for key, value in spec.items():
        if isinstance(value, str) or (isinstance(value, tuple) and value and all(isinstance(v, str) for v in value)
                                      and not (len(value) == 2 and callable(value[1]))):
            sources, transform = value, None
        elif isinstance(value, tuple) and len(value) == 2 and callable(value[1]):
            sources, transform = value
        else:
            raise ValueError(f"{label}'s weight map: {key!r} -> {value!r}; give a checkpoint name, a tuple of names, "
                             "or (name or names, transform)")
        sources = (sources,) if isinstance(sources, str) else tuple(sources)
        for name, _, layer in _expand(key, value, cfg):
            if name not in own:
                raise KeyError(f"{label}'s weight map: the port has no tensor {name!r}{_close(name, list(own))}")
            entries.append(WeightEntry(name, tuple(checkpoint_name(_fill(s, layer)) for s in sources), transform,
                                       layer))
    return entries


def checkpoint_name(name: str) -> str:
    """A neox_lab or transformers parameter name as neox_lab's body-relative one."""
    if name.startswith("gpt_neox.") or name in ("embed_out.weight", "lm_head.weight"):
        return hf_to_neox_key(name, bare=True)
    return name.removeprefix("model.")


def _close(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""

