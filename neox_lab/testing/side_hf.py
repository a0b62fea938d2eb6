"""The side adapter of transformers GPTNeoX models: their streams under neox_lab hook names.

transformers exposes no hook points, so its streams are read with torch forward (pre-)hooks on the
modules that compute them, and the streams no module outputs are recomputed from what the modules
do output, with transformers' own functions where it has them (marked *):

    gpt_neox.embed_in output                       hook_embed
    layers.L input / output                        blocks.L.hook_resid_pre / hook_resid_post
    layers.L.input_layernorm input* / output       blocks.L.ln1 scale, standardized* / its output
    layers.L.attention.query_key_value output      blocks.L.attn.hook_q / hook_k / hook_v (per-head split)
    q, k + the layer's own (cos, sin) *            blocks.L.attn.hook_rot_q / hook_rot_k, through
                                                   transformers' apply_rotary_pos_emb
    rot_q . rot_k / sqrt(d_head), causal+pad mask* blocks.L.attn.hook_attn_scores
    layers.L.attention output[1] (eager)           blocks.L.attn.hook_pattern (other backends*: the
                                                   fp32 softmax of the recomputed scores)
    layers.L.attention.dense input                 blocks.L.attn.hook_z
    z and attention.dense's weight *               blocks.L.attn.hook_result (per-head writes)
    layers.L.attention output[0]                   blocks.L.hook_attn_out (post_attention_dropout is
                                                   the identity in eval mode, which compare enforces)
    layers.L.post_attention_layernorm input        blocks.L.hook_resid_mid (sequential blocks only)
    layers.L.post_attention_layernorm in*/out      blocks.L.ln2 streams
    layers.L.mlp.dense_h_to_4h output / mlp.act    blocks.L.mlp.hook_pre / hook_post
    layers.L.mlp output                            blocks.L.hook_mlp_out
    final_layer_norm input* / output               ln_final streams
    lm_head / embed_out / score / classifier /     hook_logits
    qa_outputs output

Recomputed streams check transformers' inputs to a computation, not its kernel: a bug inside its
fused attention kernel shows at hook_z, which is always read from the module.

A model whose submodules were replaced (a fused MLP, a custom attention) is compared as far as its
modules allow: a stream whose module is missing is listed as skipped with the module named.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch

from ..config import NeoXConfig
from ..hooks.registry import LN_OUTPUT_HOOK, LN_SCALE_HOOK, LN_STANDARDIZED_HOOK, block_hook, layer_of
from .side_base import Side, Variant, eval_mode, first
from .weight_diff import named_weights

HF_HEADS = ("lm_head", "embed_out", "score", "classifier", "qa_outputs")
#: rotary tables a copy keeps in fp32 whatever its dtype, as `from_pretrained(dtype=...)` leaves them
ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")

#: hook (relative to blocks.L.) -> the module path under layers.L. it is read from (or recomputed from)
BLOCK_SOURCES = {
    "hook_resid_pre": "", "hook_resid_post": "",
    "ln1.hook_ln_out": "input_layernorm", "ln1.hook_scale": "input_layernorm.eps",
    "ln1.hook_normalized": "input_layernorm.eps",
    "attn.hook_q": "attention.query_key_value", "attn.hook_k": "attention.query_key_value",
    "attn.hook_v": "attention.query_key_value",
    "attn.hook_rot_q": "attention.query_key_value", "attn.hook_rot_k": "attention.query_key_value",
    "attn.hook_attn_scores": "attention.query_key_value", "attn.hook_pattern": "attention.query_key_value",
    "attn.hook_z": "attention.dense", "attn.hook_result": "attention.dense.weight",
    "hook_attn_out": "attention",
    "hook_resid_mid": "post_attention_layernorm",
    "ln2.hook_ln_out": "post_attention_layernorm", "ln2.hook_scale": "post_attention_layernorm.eps",
    "ln2.hook_normalized": "post_attention_layernorm.eps",
    "mlp.hook_pre": "mlp.dense_h_to_4h", "mlp.hook_post": "mlp.act", "hook_mlp_out": "mlp",
}
MODEL_SOURCES = {"hook_embed": "embed_in", "ln_final.hook_ln_out": "final_layer_norm",
                 "ln_final.hook_scale": "final_layer_norm.eps", "ln_final.hook_normalized": "final_layer_norm.eps"}


def is_hf(model) -> bool:
    """A transformers model (duck-typed, so transformers need not be importable for neox_lab models)."""
    return hasattr(model, "config") and hasattr(model.config, "_attn_implementation") and \
        not hasattr(model, "hook_dict")


class HFSide(Side):
    kind = "transformers"

    @classmethod
    def accepts(cls, model) -> bool:
        return is_hf(model)

    def __init__(self, model, label: str):
        super().__init__(model, label)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.cfg = _cfg_of_hf(model)
        self.backend = "hf-" + str(model.config._attn_implementation)
        self.architecture = type(model).__name__
        self.can_step = self.can_generate = self.architecture == "GPTNeoXForCausalLM"
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def short(self) -> str:
        return f"transformers ({self.backend.removeprefix('hf-')}, {str(self.dtype).removeprefix('torch.')})"

    def unobservable(self, names):
        base = getattr(self.model, "gpt_neox", self.model)
        out = {}
        for name in names:
            layer = layer_of(name)
            if name == "hook_logits":
                if _hf_head(self.model) is None:
                    out[name] = "not observable in transformers' GPTNeoX (no head module outputs it)"
                continue
            if layer is None:
                root, path = "gpt_neox.", MODEL_SOURCES.get(name)
                owner = base
            else:
                root, path = f"gpt_neox.layers.{layer}.", BLOCK_SOURCES.get(name.split(".", 2)[2])
                owner = base.layers[layer]
            if path is None:
                out[name] = "not observable in transformers' GPTNeoX (no module outputs this stream)"
            elif _lookup(owner, path) is None:
                out[name] = f"transformers' {root}{path} is missing (a replaced module?), so there is nothing to read"
        return out

    def run(self, ids, mask, names, stop_at_layer=None):
        ids = ids.to(self.device)
        mask = None if mask is None else mask.to(self.device)
        with eval_mode(self.model), torch.no_grad():
            return _run_hf(self.model, ids, mask, set(names), stop_at_layer)

    def weights(self):
        return named_weights(self.model)

    def recast(self, dtype):
        copied = copy.deepcopy(self.model).to(dtype)
        for name, buf in copied.named_buffers():
            if name.rsplit(".", 1)[-1] in ROTARY_BUFFERS:
                _set_buffer(copied, name, buf.float())
        return HFSide(copied, self.label)

    def exact_copy(self):
        # transformers' eager attention takes its softmax in fp32 whatever the dtype; sdpa stays in fp64.
        if self.model.config._attn_implementation == "eager":
            return self.with_backend("sdpa").recast(torch.float64)
        return super().exact_copy()

    def with_backend(self, implementation: str) -> HFSide:
        copied = copy.deepcopy(self.model)
        copied.set_attn_implementation(implementation)
        return HFSide(copied, self.label)

    def step(self, ids, mask, past):
        ids = ids.to(self.device)
        kwargs = {self._cache_kw: past, "use_cache": True}
        if mask is not None:
            mask = mask.to(self.device)
            # transformers' forward counts positions from the first column; give it the real ones.
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            kwargs.update(attention_mask=mask, position_ids=positions)
        with eval_mode(self.model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.model(input_ids=ids, **kwargs)
        cache = getattr(out, "cache", None)
        return out.logits, (cache if cache is not None else out.past_key_values)

    def variants(self):
        flag = self.label[-1]
        impl = str(self.model.config._attn_implementation)
        dtype = str(self.dtype).removeprefix("torch.")
        out = []
        for other in ("sdpa", "eager"):
            if other != impl:
                out.append(Variant(f"transformers ({other}, {dtype})", f"--backend-{flag} {other}",
                                   lambda other=other: self.with_backend(other)))
        if self.dtype != torch.float32:
            out.append(Variant(f"transformers ({impl}, float32)", f"--dtype-{flag} float32",
                               lambda: self.recast(torch.float32)))
        return out


def _set_buffer(model, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    model.get_submodule(owner).register_buffer(leaf, value, persistent=False)


def _lookup(module, path: str):
    """The submodule (or attribute) at dotted `path` under `module`, or None when any step is missing."""
    obj = module
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _cfg_of_hf(model) -> NeoXConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = NeoXConfig.from_hf(model.config.to_dict())
    head, embed = _hf_head(model), getattr(getattr(model, "gpt_neox", model), "embed_in", None)
    if cfg.tie_word_embeddings and head is not None and embed is not None and head.weight is not embed.weight:
        # transformers 5 unties a checkpoint whose config says tied but that holds a different head
        # (it warns); what the model computes is the untied function.
        cfg = cfg.replace(tie_word_embeddings=False)
    return cfg


def _hf_head(model):
    return next((getattr(model, n) for n in HF_HEADS if isinstance(getattr(model, n, None), torch.nn.Module)), None)


def _ln_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(var + eps) [.. 1], (x - mean) / scale) of a LayerNorm input, in at least fp32 like torch's kernel."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    centered = xf - xf.mean(-1, keepdim=True)
    scale = (centered.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return scale.to(x.dtype), (centered / scale).to(x.dtype)


def _allowed(ids, mask) -> torch.Tensor:
    """[batch 1 query key] True where a query may attend: causal, and the key a real token."""
    n = ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
    if mask is None:
        return causal[None, None]
    return causal[None, None] & mask.bool()[:, None, None, :]


class _Stop(Exception):
    """Raised by a hook to end a transformers forward once the wanted blocks have run."""


def _run_hf(model, ids, mask, names: set[str], stop_at_layer: int | None = None):
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    base = getattr(model, "gpt_neox", model)
    cfg = model.config
    n_heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    store: dict[str, torch.Tensor] = {}
    handles = []
    rope: dict[int, tuple] = {}
    allowed = _allowed(ids, mask)

    def keep(name, t):
        if name in names and isinstance(t, torch.Tensor):
            store[name] = t.detach()

    def wants(layer, *hooks):
        return any(block_hook(layer, h) in names for h in hooks)

    def on_output(module, name_fn):
        if isinstance(module, torch.nn.Module):
            handles.append(module.register_forward_hook(lambda m, args, out: name_fn(out)))

    def on_input(module, name_fn):
        def pre(m, args, kwargs):
            name_fn(args[0] if args else kwargs.get("hidden_states"))
        if isinstance(module, torch.nn.Module):
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def layer_norm(module, prefix):
        eps = getattr(module, "eps", None)

        def stats(x):
            if f"{prefix}{LN_SCALE_HOOK}" in names or f"{prefix}{LN_STANDARDIZED_HOOK}" in names:
                scale, standardized = _ln_stats(x, eps)
                keep(f"{prefix}{LN_SCALE_HOOK}", scale)
                keep(f"{prefix}{LN_STANDARDIZED_HOOK}", standardized)
        if eps is not None:
            on_input(module, stats)
        on_output(module, lambda out: keep(f"{prefix}{LN_OUTPUT_HOOK}", first(out)))

    def split_qkv(L, attention):
        def fn(out):
            if out.shape[-1] != 3 * hidden:
                return  # a replaced projection with another layout: nothing to split
            # transformers' fused layout: per head, its q, k and v rows ((n_heads qkv d_head)).
            q, k, v = out.view(*out.shape[:-1], n_heads, -1).chunk(3, dim=-1)
            for key, t in (("q", q), ("k", k), ("v", v)):
                keep(block_hook(L, f"attn.hook_{key}"), t)
            if not wants(L, "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern"):
                return
            if rope.get(L) is None:
                return  # the attention module was called without transformers' (cos, sin)
            cos, sin = rope[L]
            rq, rk = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # [batch pos head d_head]
            keep(block_hook(L, "attn.hook_rot_q"), rq)
            keep(block_hook(L, "attn.hook_rot_k"), rk)
            if wants(L, "attn.hook_attn_scores") or (wants(L, "attn.hook_pattern")
                                                     and cfg._attn_implementation != "eager"):
                scaling = getattr(attention, "scaling", (hidden // n_heads) ** -0.5)
                scores = torch.einsum("bqhd,bkhd->bhqk", rq * scaling, rk)
                scores = scores.masked_fill(~allowed, float("-inf"))
                keep(block_hook(L, "attn.hook_attn_scores"), scores)
                if cfg._attn_implementation != "eager":
                    # What its sdpa computes: the softmax in the model's dtype, half precision via fp32.
                    wide = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
                    keep(block_hook(L, "attn.hook_pattern"), wide.softmax(-1).to(scores.dtype))
        return fn

    def attn_out(layer):
        def fn(out):
            keep(block_hook(layer, "hook_attn_out"), first(out))
            pattern = out[-1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
            if isinstance(pattern, torch.Tensor) and pattern.dim() == 4:
                keep(block_hook(layer, "attn.hook_pattern"), pattern)
        return fn

    def z_and_result(L, dense):
        def fn(x):
            z = x.reshape(*x.shape[:-1], n_heads, -1)
            keep(block_hook(L, "attn.hook_z"), z)
            weight = getattr(dense, "weight", None)
            if wants(L, "attn.hook_result") and isinstance(weight, torch.Tensor):
                w = weight.reshape(weight.shape[0], n_heads, -1)  # [d_model, head, d_head]
                keep(block_hook(L, "attn.hook_result"), torch.einsum("bphd,mhd->bphm", z, w))
        return fn

    try:
        on_output(getattr(base, "embed_in", None), lambda out: keep("hook_embed", out))
        for L, layer in enumerate(base.layers):
            on_input(layer, lambda x, L=L: keep(block_hook(L, "hook_resid_pre"), x))
            on_output(layer, lambda out, L=L: keep(block_hook(L, "hook_resid_post"), first(out)))
            layer_norm(_lookup(layer, "input_layernorm"), block_hook(L, "ln1."))
            attention = _lookup(layer, "attention")
            if isinstance(attention, torch.nn.Module):
                handles.append(attention.register_forward_pre_hook(
                    lambda m, args, kwargs, L=L: rope.__setitem__(L, kwargs.get("position_embeddings")),
                    with_kwargs=True))
                on_output(attention, attn_out(L))
            on_output(_lookup(layer, "attention.query_key_value"), split_qkv(L, attention))
            on_input(_lookup(layer, "attention.dense"), z_and_result(L, _lookup(layer, "attention.dense")))
            if not cfg.use_parallel_residual:
                on_input(_lookup(layer, "post_attention_layernorm"),
                         lambda x, L=L: keep(block_hook(L, "hook_resid_mid"), x))
            layer_norm(_lookup(layer, "post_attention_layernorm"), block_hook(L, "ln2."))
            on_output(_lookup(layer, "mlp.dense_h_to_4h"), lambda out, L=L: keep(block_hook(L, "mlp.hook_pre"), out))
            on_output(_lookup(layer, "mlp.act"), lambda out, L=L: keep(block_hook(L, "mlp.hook_post"), out))
            on_output(_lookup(layer, "mlp"), lambda out, L=L: keep(block_hook(L, "hook_mlp_out"), first(out)))
        layer_norm(_lookup(base, "final_layer_norm"), "ln_final.")
        head = _hf_head(model)
        if head is not None:
            on_output(head, lambda out: keep("hook_logits", out))
        kwargs = {}
        if mask is not None:
            # transformers counts positions from the first column; neox_lab from the first real token.
            kwargs = {"attention_mask": mask, "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}
        if stop_at_layer is not None:
            def stop(out):
                raise _Stop
            on_output(base.layers[stop_at_layer - 1], stop)
        try:
            out = model(input_ids=ids, **kwargs)
        except _Stop:
            return store, None
    finally:
        for h in handles:
            h.remove()
    logits = getattr(out, "logits", None)
    if logits is None and getattr(out, "start_logits", None) is not None:
        logits = torch.stack([out.start_logits, out.end_logits], dim=-1)  # neox_lab's [batch pos 2]
    return store, logits
