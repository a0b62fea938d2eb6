"""One side of a comparison: run a neox_lab or a transformers GPTNeoX model and collect its streams
under neox_lab hook names.

transformers exposes no hook points, so its streams are read with torch forward (pre-)hooks on the
modules that compute them. The mapping (HF module -> neox_lab hook):

    gpt_neox.embed_in output                       hook_embed
    layers.L input / output                        blocks.L.hook_resid_pre / hook_resid_post
    layers.L.input_layernorm output                blocks.L.ln1.hook_normalized
    layers.L.attention.query_key_value output      blocks.L.attn.hook_q / hook_k / hook_v (per-head split)
    layers.L.attention output[1] (eager only)      blocks.L.attn.hook_pattern
    layers.L.attention.dense input                 blocks.L.attn.hook_z
    layers.L.attention output[0]                   blocks.L.hook_attn_out (post_attention_dropout is
                                                   the identity in eval mode, which compare enforces)
    layers.L.post_attention_layernorm input        blocks.L.hook_resid_mid (sequential blocks only)
    layers.L.post_attention_layernorm output       blocks.L.ln2.hook_normalized
    layers.L.mlp.dense_h_to_4h output / mlp.act    blocks.L.mlp.hook_pre / hook_post
    layers.L.mlp output                            blocks.L.hook_mlp_out
    final_layer_norm output                        ln_final.hook_normalized
    lm_head / embed_out / score / classifier /     hook_logits
    qa_outputs output

Not observable there (no module outputs them): the LayerNorm scale and standardized streams, the
rotated q/k, the attention scores and the per-head results.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..config import NeoXConfig
from ..hooks.registry import block_hook, hook_names
from ..model.kernels import resolve_backend

EAGER_ONLY = ("attn.hook_attn_scores", "attn.hook_pattern")
HF_HEADS = ("lm_head", "embed_out", "score", "classifier", "qa_outputs")
HF_ONLY_EAGER = "attention weights exist only in transformers' eager attention"
NOT_IN_HF = "not observable in transformers' GPTNeoX (no module outputs this stream)"


def is_hf(model) -> bool:
    """A transformers model (duck-typed, so transformers need not be importable for neox_lab models)."""
    return hasattr(model, "config") and hasattr(model.config, "_attn_implementation") and \
        not hasattr(model, "hook_dict")


def is_neox(model) -> bool:
    return hasattr(model, "hook_dict") and hasattr(model, "run_with_cache")


class Side:
    """What compare needs of a model: its config, precision, observable hooks and a capture run."""

    def __init__(self, model, label: str):
        if not (is_neox(model) or is_hf(model)):
            raise TypeError(f"{label}: expected a neox_lab model or a transformers GPTNeoX model, got "
                            f"{type(model).__name__}")
        self.model = model
        self.label = label
        self.hf = is_hf(model)
        param = next(model.parameters())
        # A model placed across devices (device_map) takes its inputs where it embeds, which an
        # offloaded first parameter (on "meta" between forwards) does not tell.
        self.dtype, self.device = param.dtype, getattr(model, "input_device", param.device)
        if self.hf:
            self.cfg = _cfg_of_hf(model.config)
            self.backend = "hf-" + str(model.config._attn_implementation)
        else:
            self.cfg = model.cfg
            self.backend = resolve_backend(model.attn_backend, torch.empty(0, dtype=self.dtype, device=self.device))

    def describe(self) -> str:
        lib = "transformers" if self.hf else "neox_lab"
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{lib} {type(self.model).__name__} {dtype}/{self.backend} on {self.device}"

    def unavailable(self) -> dict[str, str]:
        """Registry hook names this side cannot observe, with the reason."""
        names = hook_names(self.cfg)
        out = {}
        for name in names:
            if self.hf:
                if not _hf_observable(name) or (name.endswith("hook_logits") and _hf_head(self.model) is None):
                    out[name] = NOT_IN_HF
                elif name.endswith("attn.hook_pattern") and self.backend != "hf-eager":
                    out[name] = HF_ONLY_EAGER
            elif name.endswith(EAGER_ONLY) and self.backend != "eager":
                # Caching these forces the eager kernel, and the comparison would silently test eager.
                out[name] = f"attention scores/pattern exist only in the eager kernel; {self.label} runs " \
                            f"{self.backend!r} (compare an eager copy to check them)"
            elif name not in self.model.hook_dict:
                out[name] = f"{self.label} has no such hook point"
        return out

    def run(self, ids, mask, names: list[str]):
        """Forward once in eval mode; returns ({hook name: tensor}, logits or None)."""
        ids = ids.to(self.device)
        mask = None if mask is None else mask.to(self.device)
        with _eval(self.model), torch.no_grad():
            if not self.hf:
                kwargs = {} if mask is None else {"attention_mask": mask}
                logits, cache = self.model.run_with_cache(ids, names_filter=names, **kwargs)
                return dict(cache.items()), logits
            return _run_hf(self.model, ids, mask, set(names))


@contextlib.contextmanager
def _eval(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _cfg_of_hf(config) -> NeoXConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NeoXConfig.from_hf(config.to_dict())


def _hf_head(model):
    return next((getattr(model, n) for n in HF_HEADS if isinstance(getattr(model, n, None), torch.nn.Module)), None)


_HF_SUFFIXES = ("hook_resid_pre", "hook_resid_post", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k",
                "attn.hook_v", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
                "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out")


def _hf_observable(name: str) -> bool:
    if name in ("hook_embed", "ln_final.hook_normalized", "hook_logits"):
        return True
    return name.startswith("blocks.") and name.split(".", 2)[2] in _HF_SUFFIXES


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_hf(model, ids, mask, names: set[str]):
    base = getattr(model, "gpt_neox", model)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    store: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name, t):
        if name in names and isinstance(t, torch.Tensor):
            store[name] = t.detach()

    def on_output(module, name_fn):
        handles.append(module.register_forward_hook(lambda m, args, out: name_fn(out)))

    def on_input(module, name_fn):
        def pre(m, args, kwargs):
            name_fn(args[0] if args else kwargs.get("hidden_states"))
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def split_qkv(layer):
        def fn(out):
            # transformers' fused layout: per head, its q, k and v rows ((n_heads qkv d_head)).
            q, k, v = out.view(*out.shape[:-1], n_heads, -1).chunk(3, dim=-1)
            for key, t in (("q", q), ("k", k), ("v", v)):
                keep(block_hook(layer, f"attn.hook_{key}"), t)
        return fn

    def attn_out(layer):
        def fn(out):
            keep(block_hook(layer, "hook_attn_out"), _first(out))
            pattern = out[-1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
            if isinstance(pattern, torch.Tensor) and pattern.dim() == 4:
                keep(block_hook(layer, "attn.hook_pattern"), pattern)
        return fn

    try:
        on_output(base.embed_in, lambda out: keep("hook_embed", out))
        for L, layer in enumerate(base.layers):
            on_input(layer, lambda x, L=L: keep(block_hook(L, "hook_resid_pre"), x))
            on_output(layer, lambda out, L=L: keep(block_hook(L, "hook_resid_post"), _first(out)))
            on_output(layer.input_layernorm, lambda out, L=L: keep(block_hook(L, "ln1.hook_normalized"), out))
            on_output(layer.attention.query_key_value, split_qkv(L))
            on_input(layer.attention.dense,
                     lambda x, L=L: keep(block_hook(L, "attn.hook_z"), x.reshape(*x.shape[:-1], n_heads, -1)))
            on_output(layer.attention, attn_out(L))
            if not cfg.use_parallel_residual:
                on_input(layer.post_attention_layernorm, lambda x, L=L: keep(block_hook(L, "hook_resid_mid"), x))
            on_output(layer.post_attention_layernorm, lambda out, L=L: keep(block_hook(L, "ln2.hook_normalized"), out))
            on_output(layer.mlp.dense_h_to_4h, lambda out, L=L: keep(block_hook(L, "mlp.hook_pre"), out))
            on_output(layer.mlp.act, lambda out, L=L: keep(block_hook(L, "mlp.hook_post"), out))
            on_output(layer.mlp, lambda out, L=L: keep(block_hook(L, "hook_mlp_out"), _first(out)))
        on_output(base.final_layer_norm, lambda out: keep("ln_final.hook_normalized", out))
        head = _hf_head(model)
        if head is not None:
            on_output(head, lambda out: keep("hook_logits", out))
        kwargs = {}
        if mask is not None:
            # transformers counts positions from the first column; neox_lab from the first real token.
            kwargs = {"attention_mask": mask, "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}
        out = model(input_ids=ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
    logits = getattr(out, "logits", None)
    if logits is None and getattr(out, "start_logits", None) is not None:
        logits = torch.stack([out.start_logits, out.end_logits], dim=-1)  # neox_lab's [batch pos 2]
    return store, logits
