"""`ActivationCache`: what `run_with_cache` returns — activations by hook name, plus the residual-stream
arithmetic of interpretability work (logit lens, direct logit attribution), correct for parallel blocks.

Stacks are [n_components batch pos d_model]; component labels follow TransformerLens ("embed",
"3_attn_out", "L3H1", "5_pre", "final_post").
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Iterator, Mapping

import torch
from einops import einsum, rearrange
from safetensors import safe_open
from safetensors.torch import save_file

from .. import axes
from ..config import NeoXConfig
from ..version import __version__
from .registry import LN_STREAMS, block_hook, expand_shorthand, hook_names, unknown_hook_message

PosSlice = int | slice | list | torch.Tensor | None


def slice_pos(t: torch.Tensor, pos_slice: PosSlice, dim: int = -2) -> torch.Tensor:
    """Positions `pos_slice` of `t` along `dim`: None (all), an int (kept as a length-1 axis; negative
    counts from the end), a slice, or a list / tensor of positions. What `run_with_cache(pos_slice=)`
    and every stack method of the cache slice with."""
    if pos_slice is None:
        return t
    if isinstance(pos_slice, int):
        pos_slice = slice(pos_slice, pos_slice + 1) if pos_slice != -1 else slice(-1, None)
    if isinstance(pos_slice, slice):
        dim = dim % t.dim()
        return t[(slice(None),) * dim + (pos_slice,)]
    index = torch.as_tensor(pos_slice, device=t.device, dtype=torch.long)
    return t.index_select(dim, index)


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

    def __init__(self, store: Mapping[str, torch.Tensor], model=None, *, cfg: NeoXConfig | None = None):
        self._store: dict[str, torch.Tensor] = dict(store)
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
        if self.cfg is not None and model.cfg != self.cfg:
            raise ValueError("this model's config differs from the config the cache was made with")
        self.cfg = model.cfg
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
        known = hook_names(self.cfg)
        if base in known:
            why = (f"hook {name!r} exists but was not cached (check run_with_cache's names_filter"
                   + (" and incl_bwd=True" if name != base else "") + ")")
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

    def _new(self, store: dict[str, torch.Tensor]) -> ActivationCache:
        out = ActivationCache(store, cfg=self.cfg)
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
                "neox_lab.config_hash": _config_hash(self.cfg)}
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
        if model is not None and _config_hash(model.cfg) != meta.get("neox_lab.config_hash"):
            raise ValueError(f"{path}: the cache was made by a model with another config than the one given")
        return cls(store, model, cfg=cfg)

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

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: PosSlice = None, return_labels: bool = False):
        """The residual stream as it accumulates: [n_components batch pos d_model].

        Components are resid_pre of layers 0..layer (inclusive; each is the whole stream entering that
        block), plus the final resid_post when `layer` is None / -1 / n_layers. `incl_mid` interleaves
        resid_mid (sequential-residual models only: a parallel block has no such stream). With
        `apply_ln`, each whole stream goes through the LayerNorm that reads stream `layer` (ln_final
        for the end, else block `layer`'s ln1) with its cached scale, bias included — so at the end
        `unembed(stack)` is a logit lens, and its last entry reproduces the model's logits.
        """
        layer = self._layer_arg(layer)
        if incl_mid and self.cfg.use_parallel_residual:
            raise ValueError("incl_mid=True: this model uses the parallel residual (attention and MLP both "
                             "read resid_pre), so its blocks have no resid_mid stream")
        parts, labels = [], []
        for i in range(min(layer + 1, self.n_layers)):
            parts.append(self[block_hook(i, "hook_resid_pre")])
            labels.append(f"{i}_pre")
            if incl_mid and i < layer:
                parts.append(self[block_hook(i, "hook_resid_mid")])
                labels.append(f"{i}_mid")
        if layer == self.n_layers:
            parts.append(self[block_hook(self.n_layers - 1, "hook_resid_post")])
            labels.append("final_post")
        stack = slice_pos(torch.stack(parts), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, add_bias=True)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, apply_ln: bool = False,
                        pos_slice: PosSlice = None, return_labels: bool = False):
        """The stream entering `layer` split into what wrote it: [n_components batch pos d_model].

        Components: embed, then attn_out and mlp_out of every layer before `layer` (None / -1: all
        layers, summing to the final resid_post). They sum to resid_pre[layer] exactly (up to rounding),
        in parallel and sequential blocks alike — a parallel block's output is resid_pre + attn_out +
        mlp_out, so nothing is counted twice.

        `mlp_input=True` decomposes what the MLP of `layer` reads. In a sequential block that is
        resid_mid = resid_pre + attn_out, so `layer`'s attn_out is appended. In a parallel block the MLP
        reads resid_pre, the same stream as attention, so `layer`'s attention is *not* included and the
        components are those of `mlp_input=False`. `apply_ln` applies that reader's LayerNorm (ln2 for
        the MLP, ln1 for attention, ln_final at the end) per component, without the bias.
        """
        layer = self._layer_arg(layer)
        if mlp_input and layer == self.n_layers:
            raise ValueError(f"mlp_input=True needs a layer in [0, {self.n_layers - 1}]: there is no MLP "
                             "after the last block")
        parts, labels = [self["hook_embed"]], ["embed"]
        for i in range(layer):
            parts += [self[block_hook(i, "hook_attn_out")], self[block_hook(i, "hook_mlp_out")]]
            labels += [f"{i}_attn_out", f"{i}_mlp_out"]
        if mlp_input and not self.cfg.use_parallel_residual:
            parts.append(self[block_hook(layer, "hook_attn_out")])
            labels.append(f"{layer}_attn_out")
        stack = slice_pos(torch.stack(parts), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int | None = -1, return_labels: bool = False, apply_ln: bool = False,
                           pos_slice: PosSlice = None):
        """Each head's write into the residual stream, for every head of layers before `layer`.

        Returns [n_components batch pos d_model], n_components = layer * n_heads, labels "L{l}H{h}"
        (layer -1 / None: all layers). Uses the cached hook_result where present, else z @ W_O from
        the model. Heads exclude the attention output bias: summed over a layer's heads plus
        `blocks[l].attn.out.bias` they give that layer's attn_out. `apply_ln` as in `decompose_resid`
        (no bias; the LayerNorm is the one reading stream `layer`).
        """
        layer = self._layer_arg(layer)
        parts, labels = [], []
        for i in range(layer):
            name = block_hook(i, "attn.hook_result")
            if name in self._store:
                result = self._store[name]
            else:
                # hook_result is opt-in (n_heads times attn_out's size); z @ W_O gives it exactly.
                z = self[block_hook(i, "attn.hook_z")]
                W_O = self._body().blocks[i].attn.W_O.detach()
                result = einsum(z, W_O.to(z.device, z.dtype), axes.HEAD_RESULT)
            parts.append(rearrange(result, "batch pos n_heads d_model -> n_heads batch pos d_model"))
            labels += [f"L{i}H{h}" for h in range(result.shape[-2])]
        if not parts:
            raise ValueError("stack_head_results(layer=0) has no heads to stack: layer counts the layers "
                             "included")
        stack = slice_pos(torch.cat(parts), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ LayerNorm and logits
    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None,
                          pos_slice: PosSlice = None, mlp_input: bool = False,
                          add_bias: bool = False) -> torch.Tensor:
        """Apply a LayerNorm to each component of [... batch pos d_model] with the scale frozen at its
        cached value (TransformerLens semantics: it is linear then, so components stay additive).

        The LayerNorm is ln_final for `layer` None / -1 / n_layers, else block `layer`'s ln1 (ln2 with
        `mlp_input`); its `hook_scale` must be cached. Each component is centred, divided by the
        scale and multiplied by the LayerNorm weight. The bias belongs to no single component, so it is
        added only with `add_bias=True` (right for whole streams; for a decomposition, the components'
        sum plus the bias is the LayerNorm output). `pos_slice` is applied to the cached scale and
        must be the one the stack was sliced with.
        """
        layer = self._layer_arg(layer)
        if layer == self.n_layers:
            prefix, ln = "ln_final", lambda body: body.ln_final
        else:
            which = "ln2" if mlp_input else "ln1"
            prefix, ln = block_hook(layer, which), lambda body: getattr(body.blocks[layer], which)
        scale = slice_pos(self[f"{prefix}.hook_scale"], pos_slice)
        module = ln(self._body())
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
                    pos_slice: PosSlice = None) -> torch.Tensor:
        """Direct logit attribution: each component dotted with the unembedding direction of `tokens`
        (minus that of `incorrect_tokens`). Returns [... batch pos].

        `residual_stack` is [... batch pos d_model], normally already through the final LayerNorm
        (`apply_ln=True`). Tokens are an int or str (one token everywhere), [batch] (one per sequence,
        at every position) or [batch pos] (per position). `pos_slice` is applied to the stack and to
        [batch pos] tokens.
        """
        unembed = getattr(self.model, "unembed", None)
        if unembed is None:
            raise TypeError(f"logit_attrs needs a causal LM (with an unembedding); this cache's model is "
                            f"{type(self.model).__name__}")
        W_U_rows = unembed.weight.detach()  # [d_vocab d_model]: row t is W_U's column for token t

        def directions(toks) -> torch.Tensor:
            ids = self._token_ids(toks).to(W_U_rows.device)
            if ids.dim() == 2:
                ids = slice_pos(ids, pos_slice, dim=-1)
            elif ids.dim() == 1:
                ids = ids[:, None]
            elif ids.dim() != 0:
                raise ValueError(f"tokens must be an int, [batch] or [batch pos]; got {tuple(ids.shape)}")
            return W_U_rows[ids]

        dirs = directions(tokens)
        if incorrect_tokens is not None:
            dirs = dirs - directions(incorrect_tokens)
        stack = slice_pos(residual_stack, pos_slice)
        return (stack * dirs.to(stack.device, stack.dtype)).sum(-1)
