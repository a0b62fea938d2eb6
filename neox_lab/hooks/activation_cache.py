"""`ActivationCache`: what `run_with_cache` returns — activations by hook name, plus the residual-stream
arithmetic of interpretability work (logit lens, direct logit attribution), correct for parallel blocks.

Stacks are [n_components batch pos d_model]; component labels follow TransformerLens ("embed",
"3_attn_out", "L3H1", "5_pre", "final_post").
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import weakref
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from safetensors import safe_open
from safetensors.torch import save_file

from .. import axes
from ..config import NeoXConfig
from ..version import __version__
from .registry import LN_STREAMS, block_hook, expand_shorthand, flag_of, hook_names, unknown_hook_message

PosSlice = int | slice | list | torch.Tensor | None


def check_slice(sel: object, label: str = "pos_slice") -> None:
    """A selection TransformerLens' `Slice` accepts (None, an int, a slice, a list / array / tensor of
    ints), else a TypeError naming the argument."""
    if sel is None or isinstance(sel, slice):
        return
    try:
        index = torch.as_tensor(sel)
    except (TypeError, ValueError, RuntimeError):
        index = None
    if index is None or index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise TypeError(f"{label} must be None, an int, a slice or a list / tensor of int indices, got {sel!r}")


def slice_dim(t: torch.Tensor, sel: PosSlice, dim: int) -> torch.Tensor:
    """`t` indexed by `sel` along `dim` as TransformerLens' `Slice` does: None keeps everything, an int
    picks one index and drops the axis (negative counts from the end), a slice or a list / tensor of
    indices keeps the axis."""
    if sel is None:
        return t
    dim = dim % t.dim()
    if isinstance(sel, int):
        return t.select(dim, sel)
    if isinstance(sel, slice):
        return t[(slice(None),) * dim + (sel,)]
    index = torch.as_tensor(sel, device=t.device, dtype=torch.long)
    if index.dim() == 0:
        return t.select(dim, int(index))
    # Negative indices count from the end, as in t[..., [-1]]; out-of-range ones still raise.
    return t.index_select(dim, torch.where(index < 0, index + t.shape[dim], index))


def slice_pos(t: torch.Tensor, pos_slice: PosSlice, dim: int = -2) -> torch.Tensor:
    """Positions `pos_slice` of `t` along `dim` (see `slice_dim`: an int drops the axis, as in
    TransformerLens). What `run_with_cache(pos_slice=)` and every stack method of the cache slice with."""
    return slice_dim(t, pos_slice, dim)


def _config_hash(cfg: NeoXConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_hf(), sort_keys=True).encode()).hexdigest()[:16]


class ActivationCache(Mapping):
    """Activations of one forward pass, by hook name: ``cache["blocks.0.hook_resid_post"]``.

    Shorthand keys as TransformerLens: ``cache["resid_post", 3]``, ``cache["pattern", 0]``,
    ``cache["scale", 2, "ln2"]``, ``cache["scale"]`` (ln_final), negative layers counting from the end,
    and ``cache["resid_post_grad", 3]`` for gradients cached with ``incl_bwd=True``.

    Only a weak reference to the model is kept, so a cache never keeps a model's weights alive; the
    methods that need weights (W_O, LayerNorm weights, the unembedding) raise if the model is gone —
    re-attach one with ``cache.model = model``. The config is kept (it is small), so name lookup and
    the methods that only read activations keep working.
    """

    def __init__(self, store: Mapping[str, torch.Tensor], model=None, *, cfg: NeoXConfig | None = None,
                 has_batch_dim: bool = True):
        self._store: dict[str, torch.Tensor] = dict(store)
        #: False after `remove_batch_dim` (or an int batch slice): tensors then lack the batch axis.
        self.has_batch_dim = has_batch_dim
        self._model_ref = None
        self.cfg = cfg
        if model is not None:
            self.model = model
        if self.cfg is None:
            raise ValueError("ActivationCache needs a model or a cfg")

    # ------------------------------------------------------------------ the model
    @property
    def model(self):
        """The model this cache was made from; raises if it has been garbage-collected or was never set."""
        model = self._model_ref() if self._model_ref is not None else None
        if model is None:
            why = "was garbage-collected" if self._model_ref is not None else "was not given (loaded cache)"
            raise RuntimeError(f"this ActivationCache needs model weights, but its model {why}; "
                               "attach one with `cache.model = model`")
        return model

    @model.setter
    def model(self, model) -> None:
        if self.cfg is not None and model.config != self.cfg:
            raise ValueError("this model's config differs from the config the cache was made with")
        self.cfg = model.config
        self._model_ref = weakref.ref(model)

    def _body(self):
        """The model's bare NeoX, whose weights (W_O, LayerNorms) some methods read."""
        body = getattr(self.model, "body", None)
        if body is None:
            raise TypeError(f"{type(self.model).__name__} is not a neox_lab model (it has no `.body`)")
        return body

    @property
    def n_layers(self) -> int:
        """Blocks in the model the cache came from (what negative layers count back from)."""
        return self.cfg.num_hidden_layers

    # ------------------------------------------------------------------ mapping
    def _resolve(self, key) -> str:
        if isinstance(key, str) and key in self._store:
            return key
        grad = ""
        head = key if isinstance(key, str) else (key[0] if key else "")
        if isinstance(head, str) and head.endswith("_grad") and head not in self._store:
            grad, head = "_grad", head[: -len("_grad")]
            key = head if isinstance(key, str) else (head, *key[1:])
        if isinstance(key, str) and key in LN_STREAMS:
            key = (key,)  # a bare LayerNorm stream means ln_final's
        try:
            name = expand_shorthand(key, self.n_layers)
        except KeyError as err:
            raise KeyError(f"{err.args[0]}; {self._holds()}") from None
        return name + grad

    def _holds(self) -> str:
        names = list(self._store)
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        return f"the cache holds: {shown}" if names else "the cache is empty"

    def __getitem__(self, key) -> torch.Tensor:
        name = self._resolve(key)
        if name in self._store:
            return self._store[name]
        base = name[: -len("_grad")] if name.endswith("_grad") else name
        known = hook_names(self.cfg, flags=None)
        if base in known:
            flag = flag_of(base)
            why = (f"hook {name!r} exists but was not cached (check run_with_cache's names_filter"
                   + (" and incl_bwd=True" if name != base else "") + ")"
                   + (f"; it is behind a stream flag: call model.set_{flag}(True) before run_with_cache"
                      if flag else ""))
        else:
            why = unknown_hook_message(base, list(known), bool(self.cfg.use_parallel_residual))
        raise KeyError(f"{why}; {self._holds()}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key) -> bool:
        try:
            return self._resolve(key) in self._store
        except KeyError:
            return False

    # Tensors have no single truth value, so Mapping's value equality cannot work: compare by identity.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations; {self._holds()})"

    def _new(self, store: dict[str, torch.Tensor], has_batch_dim: bool | None = None) -> ActivationCache:
        out = ActivationCache(store, cfg=self.cfg,
                              has_batch_dim=self.has_batch_dim if has_batch_dim is None else has_batch_dim)
        out._model_ref = self._model_ref
        return out

    def to(self, device=None, dtype: torch.dtype | None = None) -> ActivationCache:
        """A new cache with every tensor moved to `device` (and floating tensors cast to `dtype`)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        return self._new({k: move(v) for k, v in self._store.items()})

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> None:
        """Write the cache as a safetensors file; the config and key order go into its metadata."""
        tensors, seen = {}, set()
        for name, t in self._store.items():
            t = t.detach().cpu().contiguous()
            # safetensors refuses tensors sharing storage (e.g. rot_k is k itself when nothing rotates).
            ptr = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if ptr in seen else t
            seen.add(ptr)
        meta = {"format": "pt", "neox_lab.version": __version__, "neox_lab.keys": json.dumps(list(tensors)),
                "neox_lab.config": json.dumps(self.cfg.to_hf()),
                "neox_lab.config_hash": _config_hash(self.cfg), "neox_lab.has_batch_dim": str(self.has_batch_dim)}
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, device="cpu") -> ActivationCache:
        """Read a cache written by `save`. With `model`, its config must match the saved one."""
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as fh:
            meta = fh.metadata() or {}
            if "neox_lab.config" not in meta:
                raise ValueError(f"{path}: not an ActivationCache file (no neox_lab.config metadata)")
            keys = json.loads(meta["neox_lab.keys"])
            store = {k: fh.get_tensor(k) for k in keys}
        cfg = NeoXConfig.from_hf(json.loads(meta["neox_lab.config"]))
        if model is not None and _config_hash(model.config) != meta.get("neox_lab.config_hash"):
            raise ValueError(f"{path}: the cache was made by a model with another config than the one given")
        return cls(store, model, cfg=cfg, has_batch_dim=meta.get("neox_lab.has_batch_dim", "True") == "True")

    # ------------------------------------------------------------------ batch axis
    def _batch_size(self) -> int:
        sizes = [t.shape[0] for t in self._store.values() if t.dim()]
        return max(set(sizes), key=sizes.count) if sizes else 1

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch axis of every tensor of a batch-1 cache, in place (as TransformerLens); returns
        the cache. Every stack method then returns tensors without it."""
        if not self.has_batch_dim:
            warnings.warn("remove_batch_dim: this cache has no batch axis any more", stacklevel=2)
            return self
        batch = self._batch_size()
        if batch != 1:
            raise ValueError(f"remove_batch_dim needs a batch of 1, this cache holds a batch of {batch}; "
                             "use apply_slice_to_batch_dim(i) to pick one row")
        self._store = {k: v[0] for k, v in self._store.items()}
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: PosSlice) -> ActivationCache:
        """A new cache holding rows `batch_slice` of every tensor (an int drops the batch axis)."""
        if not self.has_batch_dim:
            raise ValueError("apply_slice_to_batch_dim: this cache has no batch axis (remove_batch_dim ran)")
        return self._new({k: slice_dim(v, batch_slice, 0) for k, v in self._store.items()},
                         has_batch_dim=not isinstance(batch_slice, int))

    def toggle_autodiff(self, mode: bool = False) -> None:
        """`torch.set_grad_enabled(mode)`, globally, as TransformerLens' helper of this name does; prefer
        `torch.no_grad()` / `torch.inference_mode()` blocks, which do not leak into other code."""
        warnings.warn(f"toggle_autodiff changed torch's global grad mode to {mode}", stacklevel=2)
        torch.set_grad_enabled(mode)

    # ------------------------------------------------------------------ residual stacks
    def _layer_arg(self, layer: int | None) -> int:
        """None and negative layers count as TransformerLens does: None / -1 mean n_layers (the end)."""
        n = self.n_layers
        if layer is None:
            return n
        if layer < 0:
            layer += n + 1
        if not 0 <= layer <= n:
            raise ValueError(f"layer must lie in [0, {n}] (or -1 / None for the end), got {layer}")
        return layer

    def _reader(self, layer: int, mlp_input: bool) -> tuple[str, str]:
        """(hook prefix, module path) of the LayerNorm reading the stream entering `layer` (its MLP's
        with `mlp_input`): ln_final at the end, else ln1 / ln2 of block `layer`."""
        if layer == self.n_layers:
            if mlp_input:
                raise ValueError(f"mlp_input=True needs a layer in [0, {self.n_layers - 1}]: there is no MLP "
                                 "after the last block")
            return "ln_final", "ln_final"
        which = "ln2" if mlp_input else "ln1"
        return block_hook(layer, which), f"blocks.{layer}.{which}"

    def _ln_module(self, path: str):
        return self._body().get_submodule(path)

    def _fresh_ln(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm `path` applied to x with x's own statistics, as the model computes it (at least
        fp32), without calling the module: its hook points must not fire for an analysis."""
        ln = self._ln_module(path)
        wide = torch.promote_types(x.dtype, torch.float32)
        w, b = (t.detach().to(x.device, wide) for t in (ln.weight, ln.bias))
        return F.layer_norm(x.to(wide), w.shape, w, b, ln.eps).to(x.dtype)

    def _stream_into(self, layer: int, mlp_input: bool = False) -> torch.Tensor:
        """The whole residual stream the LayerNorm of `_reader(layer, mlp_input)` reads."""
        if layer == self.n_layers:
            return self[block_hook(layer - 1, "hook_resid_post")]
        if mlp_input and not self.cfg.use_parallel_residual:
            return self[block_hook(layer, "hook_resid_mid")]
        return self[block_hook(layer, "hook_resid_pre")]

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: PosSlice = None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream as it accumulates: [n_components batch pos d_model].

        Components are resid_pre of layers 0..layer (inclusive; each is the whole stream entering that
        block), plus the final resid_post when `layer` is None / -1 / n_layers. `incl_mid` interleaves
        resid_mid of the layers before `layer`; `mlp_input` appends `layer`'s resid_mid, what its MLP
        reads (both sequential-residual only: a parallel block's MLP reads resid_pre, so there
        `mlp_input` adds nothing and `incl_mid` raises).

        `apply_ln` puts every stream through the LayerNorm that reads stream `layer` (ln_final at the
        end, else `layer`'s ln1, ln2 with `mlp_input`) with *its own* statistics, weight and bias
        included: each entry is what that LayerNorm would output had the model stopped there, so
        `model.unembed(stack)` is the logit lens (`neox_lab.logit_lens`) and its last entry the model's
        logits. (TransformerLens recomputes the statistics at the end only; at an inner layer it
        divides every stream by that layer's cached scale, which is right for the last stream alone.)
        """
        layer = self._layer_arg(layer)
        parallel = bool(self.cfg.use_parallel_residual)
        if incl_mid and parallel:
            raise ValueError("incl_mid=True: this model uses the parallel residual (attention and MLP both "
                             "read resid_pre), so its blocks have no resid_mid stream")
        prefix, path = self._reader(layer, mlp_input)
        parts, labels = [], []
        for i in range(min(layer + 1, self.n_layers)):
            parts.append(self[block_hook(i, "hook_resid_pre")])
            labels.append(f"{i}_pre")
            if not parallel and ((incl_mid and i < layer) or (mlp_input and i == layer)):
                parts.append(self[block_hook(i, "hook_resid_mid")])
                labels.append(f"{i}_mid")
        if layer == self.n_layers:
            parts.append(self[block_hook(self.n_layers - 1, "hook_resid_post")])
            labels.append("final_post")
        stack = torch.stack([slice_pos(p, pos_slice) for p in parts])
        if apply_ln:
            stack = self._fresh_ln(path, stack)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: PosSlice = None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The stream entering `layer` split into what wrote it: [n_components batch pos d_model].

        Components: embed, then attn_out and mlp_out of every layer before `layer` (None / -1: all
        layers, summing to the final resid_post). They sum to resid_pre[layer] exactly (up to rounding),
        in parallel and sequential blocks alike — a parallel block's output is resid_pre + attn_out +
        mlp_out, so nothing is counted twice. `mode` "attn" / "mlp" keeps only those components,
        `incl_embeds=False` drops the embedding (as TransformerLens).

        `mlp_input=True` decomposes what the MLP of `layer` reads. In a sequential block that is
        resid_mid = resid_pre + attn_out, so `layer`'s attn_out is appended. In a parallel block the MLP
        reads resid_pre, the same stream as attention, so `layer`'s attention is *not* included and the
        components are those of `mlp_input=False` (TransformerLens appends it there too, wrongly).
        `apply_ln` applies that reader's LayerNorm (ln2 for the MLP, ln1 for attention, ln_final at
        the end) per component with its cached scale, without the bias (see `apply_ln_to_stack`).
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._layer_arg(layer)
        self._reader(layer, mlp_input)  # validates mlp_input against layer
        parts, labels = [], []
        if incl_embeds:
            parts.append(self["hook_embed"])
            labels.append("embed")
        for i in range(layer):
            if mode != "mlp":
                parts.append(self[block_hook(i, "hook_attn_out")])
                labels.append(f"{i}_attn_out")
            if mode != "attn":
                parts.append(self[block_hook(i, "hook_mlp_out")])
                labels.append(f"{i}_mlp_out")
        if mlp_input and mode != "mlp" and not self.cfg.use_parallel_residual:
            parts.append(self[block_hook(layer, "hook_attn_out")])
            labels.append(f"{layer}_attn_out")
        stack = self._stack(parts, pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _stack(self, parts: list[torch.Tensor], pos_slice: PosSlice) -> torch.Tensor:
        """The stack of `parts` sliced by `pos_slice`; [0 ...] shaped as the embedding when empty."""
        if parts:
            return torch.stack([slice_pos(p, pos_slice) for p in parts])
        return slice_pos(self["hook_embed"], pos_slice)[None][:0]

    def _head_result(self, i: int) -> torch.Tensor:
        name = block_hook(i, "attn.hook_result")
        if name in self._store:
            return self._store[name]
        # hook_result is opt-in (n_heads times attn_out's size); z @ W_O gives it exactly.
        z = self[block_hook(i, "attn.hook_z")]
        W_O = self._body().blocks[i].attn.W_O.detach()
        return einsum(z, W_O.to(z.device, z.dtype), axes.HEAD_RESULT_ANY)

    def compute_head_results(self) -> None:
        """Cache every layer's per-head write `attn.hook_result` (z @ W_O), where it is not cached yet."""
        for i in range(self.n_layers):
            name = block_hook(i, "attn.hook_result")
            if name not in self._store:
                self._store[name] = self._head_result(i)

    def stack_head_results(self, layer: int | None = -1, return_labels: bool = False,
                           incl_remainder: bool = False, pos_slice: PosSlice = None, apply_ln: bool = False):
        """Each head's write into the residual stream, for every head of layers before `layer`.

        Returns [n_components batch pos d_model], n_components = layer * n_heads, labels "L{l}H{h}"
        (layer -1 / None: all layers). Uses the cached hook_result where present, else z @ W_O from
        the model. Heads exclude the attention output bias: summed over a layer's heads plus
        `blocks[l].attn.out.bias` they give that layer's attn_out. `incl_remainder` appends
        "remainder", the stream entering `layer` minus the heads' sum. `apply_ln` as in
        `decompose_resid` (no bias; the LayerNorm is the one reading stream `layer`).
        """
        layer = self._layer_arg(layer)
        parts, labels = [], []
        for i in range(layer):
            result = slice_pos(self._head_result(i), pos_slice, dim=-3)
            parts.append(rearrange(result, "... n_heads d_model -> n_heads ... d_model"))
            labels += [f"L{i}H{h}" for h in range(result.shape[-2])]
        stack = torch.cat(parts) if parts else self._stack([], pos_slice)
        if incl_remainder:
            whole = slice_pos(self._stream_into(layer), pos_slice)
            stack = torch.cat([stack, (whole - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_activation(self, activation_name: str, layer: int | None = -1,
                         sublayer_type: str | None = None) -> torch.Tensor:
        """`cache[activation_name, l, sublayer_type]` stacked over the layers l before `layer`."""
        layer = self._layer_arg(layer)
        return torch.stack([self[(activation_name, i, sublayer_type)] for i in range(layer)])

    # ------------------------------------------------------------------ neurons
    def _neuron_dirs(self, i: int, neuron_slice) -> torch.Tensor:
        """[d_mlp d_model] rows: what one unit of neuron n of layer i writes (W_out as TransformerLens)."""
        W_out = self._body().blocks[i].mlp.fc_out.weight.detach().T
        return slice_dim(W_out, [neuron_slice] if isinstance(neuron_slice, int) else neuron_slice, 0)

    def get_neuron_results(self, layer: int, neuron_slice: PosSlice = None, pos_slice: PosSlice = None,
                           project_output_onto: torch.Tensor | None = None) -> torch.Tensor:
        """Each neuron's write into the residual stream, [batch pos d_mlp d_model] (post * W_out row),
        without the MLP output bias. `project_output_onto` ([d_model] or [d_model k]) projects each
        write first, so the d_mlp x d_model product is never built."""
        acts = slice_pos(self[block_hook(layer, "mlp.hook_post")], pos_slice)
        acts = slice_dim(acts, [neuron_slice] if isinstance(neuron_slice, int) else neuron_slice, -1)
        dirs = self._neuron_dirs(layer, neuron_slice).to(acts.device, acts.dtype)
        if project_output_onto is None:
            return acts[..., None] * dirs
        projected = dirs @ project_output_onto.to(acts.device, acts.dtype)
        return acts * projected if projected.dim() == 1 else acts[..., None] * projected

    def stack_neuron_results(self, layer: int | None, pos_slice: PosSlice = None, neuron_slice: PosSlice = None,
                             return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False,
                             project_output_onto: torch.Tensor | None = None, mlp_input: bool = False):
        """Every neuron's write for the layers before `layer`: [layer*d_mlp batch pos d_model], labels
        "L{l}N{n}". `incl_remainder` appends the stream `layer` reads minus the neurons' sum;
        `apply_ln` applies that stream's LayerNorm with its cached scale (no bias), folded into the
        neuron directions so no d_mlp x d_model x pos tensor is built beyond the result."""
        layer = self._layer_arg(layer)
        prefix, path = self._reader(layer, mlp_input)
        neurons = [neuron_slice] if isinstance(neuron_slice, int) else neuron_slice
        ids = slice_dim(torch.arange(self.cfg.intermediate_size), neurons, 0).tolist()
        labels = [f"L{i}N{n}" for i in range(layer) for n in ids]
        scale = slice_pos(self[f"{prefix}.hook_scale"], pos_slice) if apply_ln else None
        ln = self._ln_module(path) if apply_ln else None

        def to_stream(v: torch.Tensor) -> torch.Tensor:
            # The frozen-scale LayerNorm is linear: centre and weight each direction, divide by scale later.
            if apply_ln:
                v = (v - v.mean(-1, keepdim=True)) * ln.weight.detach().to(v.device, v.dtype)
            if project_output_onto is not None:
                v = v @ project_output_onto.to(v.device, v.dtype)
            return v

        parts = []
        for i in range(layer):
            acts = slice_dim(slice_pos(self[block_hook(i, "mlp.hook_post")], pos_slice), neurons, -1)
            dirs = to_stream(self._neuron_dirs(i, neuron_slice).to(acts.device, acts.dtype))
            if scale is not None:
                acts = acts / scale.to(acts.dtype)
            per = acts * dirs if dirs.dim() == 1 else acts[..., None] * dirs
            parts.append(per.movedim(-1 if dirs.dim() == 1 else -2, 0))
        if parts:
            stack = torch.cat(parts)
        else:
            empty = to_stream(slice_pos(self["hook_embed"], pos_slice))
            stack = empty[None][:0]
        if incl_remainder:
            whole = to_stream(slice_pos(self._stream_into(layer, mlp_input), pos_slice))
            if scale is not None:
                whole = whole / (scale if whole.dim() == scale.dim() else scale[..., 0])
            stack = torch.cat([stack, (whole - stack.sum(0))[None]])
            labels.append("remainder")
        return (stack, labels) if return_labels else stack

    def accumulated_bias(self, layer: int | None, mlp_input: bool = False,
                         include_mlp_biases: bool = True) -> torch.Tensor:
        """[d_model]: the biases written into the stream entering `layer` (attention output biases, and
        MLP output biases with `include_mlp_biases`), `layer`'s own attention bias with `mlp_input`
        on a sequential block."""
        layer = self._layer_arg(layer)
        body = self._body()
        total = torch.zeros(self.cfg.hidden_size, dtype=body.ln_final.weight.dtype,
                            device=body.ln_final.weight.device)
        with_attn = list(range(layer)) + ([layer] if mlp_input and not self.cfg.use_parallel_residual else [])
        for i in with_attn:
            if body.blocks[i].attn.out.bias is not None:
                total = total + body.blocks[i].attn.out.bias.detach()
            if include_mlp_biases and i < layer:
                total = total + body.blocks[i].mlp.fc_out.bias.detach()
        return total

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: PosSlice = None, return_labels: bool = False,
                                     project_output_onto: torch.Tensor | None = None):
        """The stream `layer` reads, split into every head, every neuron (or each MLP's output with
        `expand_neurons=False`), the embedding and "bias" (all output biases): the components sum to
        the stream, in parallel and sequential blocks alike (with `mlp_input` on a parallel block the
        MLP reads resid_pre, so `layer`'s heads are not included). `apply_ln` as in `decompose_resid`;
        `project_output_onto` ([d_model] or [d_model k]) projects every component."""
        layer = self._layer_arg(layer)
        self._reader(layer, mlp_input)
        with_heads = layer + (1 if mlp_input and not self.cfg.use_parallel_residual else 0)
        heads, labels = self.stack_head_results(with_heads, pos_slice=pos_slice, return_labels=True)
        parts = [heads]
        if expand_neurons:
            neurons, more = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
        else:
            neurons, more = self.decompose_resid(layer, mode="mlp", pos_slice=pos_slice, incl_embeds=False,
                                                 return_labels=True)
        parts.append(neurons)
        labels += more
        parts.append(slice_pos(self["hook_embed"], pos_slice)[None])
        labels.append("embed")
        bias = self.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        parts.append(bias.to(heads.device, heads.dtype).expand_as(parts[-1]))
        labels.append("bias")
        stack = torch.cat(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        if project_output_onto is not None:
            stack = stack @ project_output_onto.to(stack.device, stack.dtype)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ LayerNorm and logits
    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: PosSlice = None, batch_slice: PosSlice = None, has_batch_dim: bool = True,
                          recompute_ln: bool = False, add_bias: bool = False) -> torch.Tensor:
        """Apply a LayerNorm to each component of [n_components batch pos d_model] with the scale frozen at
        its cached value: it is linear then, so components stay additive.

        The LayerNorm is ln_final for `layer` None / -1 / n_layers, else block `layer`'s ln1 (ln2 with
        `mlp_input`); its `hook_scale` must be cached. Each component is centred, divided by the
        scale and multiplied by the LayerNorm weight. TransformerLens divides by the scale only, which
        equals this once `fold_ln` has moved the weight into the next layer's weights; applying the
        weight here makes the result right on unprocessed weights too. The bias belongs to no single
        component, so it is added only with `add_bias=True`. `pos_slice` / `batch_slice` are applied to
        the cached scale (the stack must already be sliced by `pos_slice`; `batch_slice` is applied to
        the stack's batch axis here, as TransformerLens). `recompute_ln=True` instead puts each
        component through the LayerNorm with its own statistics, bias included (right for whole
        streams, as `accumulated_resid` uses it; meaningless for a decomposition).
        """
        layer = self._layer_arg(layer)
        prefix, path = self._reader(layer, mlp_input)
        module = self._ln_module(path)
        if has_batch_dim and batch_slice is not None:
            residual_stack = slice_dim(residual_stack, batch_slice, 1)
        if recompute_ln:
            return self._fresh_ln(path, residual_stack)
        scale = slice_pos(self[f"{prefix}.hook_scale"], pos_slice)
        if self.has_batch_dim and batch_slice is not None:
            scale = slice_dim(scale, batch_slice, 0)
        centered = residual_stack - residual_stack.mean(-1, keepdim=True)
        out = centered / scale * module.weight.detach().to(residual_stack.device, residual_stack.dtype)
        if add_bias:
            out = out + module.bias.detach().to(residual_stack.device, residual_stack.dtype)
        return out

    def _token_ids(self, tokens) -> torch.Tensor:
        if isinstance(tokens, str):
            tok = getattr(self.model, "tokenizer", None)
            if tok is None:
                raise ValueError("string tokens need a model with a tokenizer attached")
            ids = tok.encode(tokens, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"{tokens!r} is {len(ids)} tokens, not one")
            return torch.tensor(ids[0])
        return torch.as_tensor(tokens, dtype=torch.long)

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None,
                    pos_slice: PosSlice = None, batch_slice: PosSlice = None,
                    has_batch_dim: bool = True) -> torch.Tensor:
        """Direct logit attribution, as TransformerLens: the final LayerNorm's cached scaling is applied
        to `residual_stack` (the raw decomposition, e.g. `decompose_resid()`), then each component is
        dotted with the unembedding direction of `tokens` (minus that of `incorrect_tokens`).
        Returns the stack's shape without d_model.

        Tokens: an int or a one-token str (everywhere), [batch] (one per sequence, at every position),
        [pos] of another length than batch (one per position, shared by the rows) or [batch pos].
        Token tensors must already match any slicing. `pos_slice` / `batch_slice` are those the stack
        was made with (`batch_slice` is applied to it here) and select the cached scale;
        `has_batch_dim=False` for a stack without a batch axis. Summed over the components of
        `decompose_resid()`, plus the final LayerNorm bias's term, they give the logit (difference).
        """
        unembed = getattr(self.model, "unembed", None)
        if unembed is None:
            raise TypeError(f"logit_attrs needs a causal LM (with an unembedding); this cache's model is "
                            f"{type(self.model).__name__}")
        W_U_rows = unembed.weight.detach()  # [d_vocab d_model]: row t is W_U's column for token t
        ids = self._token_ids(tokens)
        if incorrect_tokens is not None:
            wrong = self._token_ids(incorrect_tokens)
            if wrong.shape != ids.shape:
                raise ValueError(f"tokens {tuple(ids.shape)} and incorrect_tokens {tuple(wrong.shape)} must "
                                 "have the same shape")
        if ids.dim() > 2:
            raise ValueError(f"tokens must be an int, a str, [batch], [pos] or [batch pos]; got {tuple(ids.shape)}")
        dirs = W_U_rows[ids.to(W_U_rows.device)]
        if incorrect_tokens is not None:
            dirs = dirs - W_U_rows[wrong.to(W_U_rows.device)]
        stack = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                                       has_batch_dim=has_batch_dim)
        batched = has_batch_dim and not isinstance(batch_slice, int)
        if ids.dim() == 1 and batched and stack.dim() == 4 and ids.shape[0] == stack.shape[1]:
            dirs = dirs[:, None]  # one token per row, at every position
        return (stack * dirs.to(stack.device, stack.dtype)).sum(-1)
