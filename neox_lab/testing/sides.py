"""One side of a comparison: run a neox_lab or a transformers GPTNeoX model and collect its streams
under neox_lab hook names.

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
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..config import NeoXConfig
from ..hooks.registry import LN_OUTPUT_HOOK, LN_SCALE_HOOK, LN_STANDARDIZED_HOOK, block_hook, hook_names
from ..model.kernels import resolve_backend

EAGER_ONLY = ("attn.hook_attn_scores", "attn.hook_pattern")
HF_HEADS = ("lm_head", "embed_out", "score", "classifier", "qa_outputs")
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
        self.hf = is_hf(model)
        # A HookedTransformer runs through its transformers-convention view: the same modules and hooks.
        self.model = model if self.hf else model.hf()
        model = self.model
        self.label = label
        param = next(model.parameters())
        # A model placed across devices (device_map) takes its inputs where it embeds, which an
        # offloaded first parameter (on "meta" between forwards) does not tell.
        self.dtype, self.device = param.dtype, getattr(model, "input_device", param.device)
        if self.hf:
            self.cfg = _cfg_of_hf(model)
            self.backend = "hf-" + str(model.config._attn_implementation)
            self.architecture = type(model).__name__
        else:
            self.cfg = model.cfg
            self.backend = resolve_backend(model.attn_backend, torch.empty(0, dtype=self.dtype, device=self.device))
            self.architecture = getattr(model, "hf_architecture", type(model).__name__)

    def describe(self) -> str:
        lib = "transformers" if self.hf else "neox_lab"
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{lib} {type(self.model).__name__} {dtype}/{self.backend} on {self.device}"

    def info(self) -> dict:
        """Provenance of this side for the JSON report."""
        return {"library": "transformers" if self.hf else "neox_lab", "class": type(self.model).__name__,
                "dtype": str(self.dtype).removeprefix("torch."), "backend": self.backend,
                "device": str(self.device), "architecture": self.architecture}

    def unavailable(self) -> dict[str, str]:
        """Registry hook names this side cannot observe, with the reason."""
        names = hook_names(self.cfg)
        out = {}
        for name in names:
            if self.hf:
                if name.endswith("hook_logits") and _hf_head(self.model) is None:
                    out[name] = NOT_IN_HF
            elif name.endswith(EAGER_ONLY) and self.backend != "eager":
                # Caching these forces the eager kernel, and the comparison would silently test eager.
                out[name] = f"attention scores/pattern exist only in the eager kernel; {self.label} runs " \
                            f"{self.backend!r} (compare an eager copy to check them)"
            elif name not in self.model.hook_dict:
                out[name] = f"{self.label} has no such hook point"
        return out

    def run(self, ids, mask, names: list[str], stop_at_layer: int | None = None):
        """Forward once in eval mode; returns ({hook name: tensor}, logits or None). stop_at_layer=n
        runs only blocks 0..n-1 (no logits then)."""
        ids = ids.to(self.device)
        mask = None if mask is None else mask.to(self.device)
        with _eval(self.model), torch.no_grad():
            if not self.hf:
                kwargs = {} if mask is None else {"attention_mask": mask}
                if stop_at_layer is not None:
                    kwargs["stop_at_layer"] = stop_at_layer
                logits, cache = self.model.run_with_cache(ids, names_filter=names, **kwargs)
                return dict(cache.items()), (logits if stop_at_layer is None else None)
            return _run_hf(self.model, ids, mask, set(names), stop_at_layer)


@contextlib.contextmanager
def _eval(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


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


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


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
    n_heads = cfg.num_attention_heads
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
        handles.append(module.register_forward_hook(lambda m, args, out: name_fn(out)))

    def on_input(module, name_fn):
        def pre(m, args, kwargs):
            name_fn(args[0] if args else kwargs.get("hidden_states"))
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def layer_norm(module, prefix):
        def stats(x):
            if f"{prefix}{LN_SCALE_HOOK}" in names or f"{prefix}{LN_STANDARDIZED_HOOK}" in names:
                scale, standardized = _ln_stats(x, module.eps)
                keep(f"{prefix}{LN_SCALE_HOOK}", scale)
                keep(f"{prefix}{LN_STANDARDIZED_HOOK}", standardized)
        on_input(module, stats)
        on_output(module, lambda out: keep(f"{prefix}{LN_OUTPUT_HOOK}", out))

    def split_qkv(L, attention):
        def fn(out):
            # transformers' fused layout: per head, its q, k and v rows ((n_heads qkv d_head)).
            q, k, v = out.view(*out.shape[:-1], n_heads, -1).chunk(3, dim=-1)
            for key, t in (("q", q), ("k", k), ("v", v)):
                keep(block_hook(L, f"attn.hook_{key}"), t)
            if not wants(L, "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern"):
                return
            cos, sin = rope[L]
            rq, rk = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # [batch pos head d_head]
            keep(block_hook(L, "attn.hook_rot_q"), rq)
            keep(block_hook(L, "attn.hook_rot_k"), rk)
            if wants(L, "attn.hook_attn_scores") or (wants(L, "attn.hook_pattern")
                                                     and cfg._attn_implementation != "eager"):
                scores = torch.einsum("bqhd,bkhd->bhqk", rq * attention.scaling, rk)
                scores = scores.masked_fill(~allowed, float("-inf"))
                keep(block_hook(L, "attn.hook_attn_scores"), scores)
                if cfg._attn_implementation != "eager":
                    # What its sdpa computes: the softmax in the model's dtype, half precision via fp32.
                    wide = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
                    keep(block_hook(L, "attn.hook_pattern"), wide.softmax(-1).to(scores.dtype))
        return fn

    def attn_out(layer):
        def fn(out):
            keep(block_hook(layer, "hook_attn_out"), _first(out))
            pattern = out[-1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
            if isinstance(pattern, torch.Tensor) and pattern.dim() == 4:
                keep(block_hook(layer, "attn.hook_pattern"), pattern)
        return fn

    def z_and_result(L, dense):
        def fn(x):
            z = x.reshape(*x.shape[:-1], n_heads, -1)
            keep(block_hook(L, "attn.hook_z"), z)
            if wants(L, "attn.hook_result"):
                w = dense.weight.reshape(dense.weight.shape[0], n_heads, -1)  # [d_model, head, d_head]
                keep(block_hook(L, "attn.hook_result"), torch.einsum("bphd,mhd->bphm", z, w))
        return fn

    try:
        on_output(base.embed_in, lambda out: keep("hook_embed", out))
        for L, layer in enumerate(base.layers):
            on_input(layer, lambda x, L=L: keep(block_hook(L, "hook_resid_pre"), x))
            on_output(layer, lambda out, L=L: keep(block_hook(L, "hook_resid_post"), _first(out)))
            layer_norm(layer.input_layernorm, block_hook(L, "ln1."))
            handles.append(layer.attention.register_forward_pre_hook(
                lambda m, args, kwargs, L=L: rope.__setitem__(L, kwargs.get("position_embeddings")),
                with_kwargs=True))
            on_output(layer.attention.query_key_value, split_qkv(L, layer.attention))
            on_input(layer.attention.dense, z_and_result(L, layer.attention.dense))
            on_output(layer.attention, attn_out(L))
            if not cfg.use_parallel_residual:
                on_input(layer.post_attention_layernorm, lambda x, L=L: keep(block_hook(L, "hook_resid_mid"), x))
            layer_norm(layer.post_attention_layernorm, block_hook(L, "ln2."))
            on_output(layer.mlp.dense_h_to_4h, lambda out, L=L: keep(block_hook(L, "mlp.hook_pre"), out))
            on_output(layer.mlp.act, lambda out, L=L: keep(block_hook(L, "mlp.hook_post"), out))
            on_output(layer.mlp, lambda out, L=L: keep(block_hook(L, "hook_mlp_out"), _first(out)))
        layer_norm(base.final_layer_norm, "ln_final.")
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

