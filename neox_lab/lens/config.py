"""`LensConfig`: TransformerLens' `HookedTransformerConfig` fields for a NeoX, as TransformerLens 3.9's
loader sets them for a GPT-NeoX checkpoint, read live from the model they describe.

`hooked.cfg` answers every field TransformerLens' config has (its own tools read `cfg.device`,
`cfg.n_key_value_heads`, ...; notebooks `cfg.n_layers`, `cfg.default_prepend_bos`, ...). Sizes come from
the model's `NeoXConfig` (transformers' field names, `hooked.config`); `device` and `dtype` from its
parameters; `normalization_type` says "LNPre" once `fold_ln` has run, as TransformerLens reports it;
`use_attn_result` and the other stream flags are the model's own switches (setting one here sets it).
Where TransformerLens' loader reports a value that does not describe a NeoX, this reports the model:

- `rotary_base`: the checkpoint's base (TransformerLens 3.9's GPT-NeoX loader leaves its default 10000
  whatever the checkpoint says; equal for GPT-NeoX-20B and every Pythia model);
- `tokenizer_prepends_bos`: False, since `model.tokenizer` is the checkpoint's tokenizer, which adds no
  BOS (TransformerLens swaps in a copy that does, so it reports True; `to_tokens` is the same either way);
- `tie_word_embeddings`, `use_dynamic_ntk_rope`, `rotary_scaling_factor`: what the model computes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: Fields with one value for every NeoX (TransformerLens' defaults, or its GPT-NeoX loader's choice).
CONSTANT_FIELDS: dict[str, Any] = dict(
    positional_embedding_type="rotary", n_key_value_heads=None, attn_only=False, gated_mlp=False,
    uses_rms_norm=False, layer_norm_folding=False, num_experts=None, experts_per_token=None, final_rms=False,
    use_attn_scale=True, use_qk_norm=False, clip_qkv=None, use_logn_attn=False, train_seq_length=None,
    use_local_attn=False, ungroup_grouped_query_attention=False, original_architecture="GPTNeoXForCausalLM",
    window_size=None, attn_types=None, init_mode="gpt2", n_devices=1, attention_dir="causal", seed=None,
    init_weights=False, scale_attn_by_inverse_layer_idx=False, use_hook_tokens=False, post_embedding_ln=False,
    rotary_base_local=None, trust_remote_code=False, rotary_adjacent_pairs=False, load_in_4bit=False,
    quantization_method=None, relative_attention_max_distance=None, relative_attention_num_buckets=None,
    decoder_start_token_id=None, use_normalization_before_and_after=False, attn_scores_soft_cap=-1.0,
    output_logits_soft_cap=-1.0, use_NTK_by_parts_rope=False, NTK_by_parts_low_freq_factor=1.0,
    NTK_by_parts_high_freq_factor=4.0, NTK_by_parts_factor=8.0, NTK_original_ctx_len=8192, use_yarn_rope=False,
    yarn_factor=1.0, yarn_attention_factor=1.0, yarn_beta_fast=32.0, yarn_beta_slow=1.0,
    yarn_original_max_position_embeddings=4096, yarn_truncate=True, yarn_global_attn_only=False,
    use_attention_sinks=False, norm_topk_prob=False,
)

#: The model's stream switches, by TransformerLens' config name (each off by default, as there).
STREAM_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")

#: Fields a user may set: the tokenization default, and the stream switches.
SETTABLE = ("default_prepend_bos", *STREAM_FLAGS)


class LensConfig:
    """TransformerLens' config of a `HookedTransformer`, a live view of the NeoX it wraps (`model`, the
    transformers-convention model). Read-only except `default_prepend_bos` and the stream flags."""

    def __init__(self, model, *, default_prepend_bos: bool = False, model_name: str = "custom",
                 tokenizer_name: str | None = None, checkpoint_index: int | None = None,
                 checkpoint_value: int | None = None):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_settings", dict(
            default_prepend_bos=default_prepend_bos, model_name=model_name, tokenizer_name=tokenizer_name,
            from_checkpoint=checkpoint_value is not None, checkpoint_index=checkpoint_index,
            checkpoint_value=checkpoint_value, checkpoint_label_type=None if checkpoint_value is None else "step"))

    def set_checkpoint(self, index: int, value: int) -> None:
        """Record which training checkpoint the weights are (`HookedTransformer.load_checkpoint_`)."""
        self._settings.update(from_checkpoint=True, checkpoint_index=index, checkpoint_value=value,
                              checkpoint_label_type="step")

    # ------------------------------------------------------------------ sizes, from the NeoXConfig
    @property
    def _neox(self):
        return self._model.cfg

    d_model = property(lambda self: self._neox.hidden_size, doc="hidden_size")
    d_head = property(lambda self: self._neox.head_dim, doc="hidden_size // num_attention_heads")
    n_layers = property(lambda self: self._neox.num_hidden_layers, doc="num_hidden_layers")
    n_heads = property(lambda self: self._neox.num_attention_heads, doc="num_attention_heads")
    d_mlp = property(lambda self: self._neox.intermediate_size, doc="intermediate_size")
    d_vocab = property(lambda self: self._neox.vocab_size, doc="vocab_size")
    d_vocab_out = property(lambda self: self._neox.vocab_size, doc="the unembedding's width: vocab_size")
    n_ctx = property(lambda self: self._neox.max_position_embeddings, doc="max_position_embeddings")
    act_fn = property(lambda self: self._neox.hidden_act, doc="hidden_act")
    eps = property(lambda self: self._neox.layer_norm_eps, doc="layer_norm_eps")
    parallel_attn_mlp = property(lambda self: self._neox.use_parallel_residual, doc="use_parallel_residual")
    rotary_dim = property(lambda self: self._neox.rotary_dim, doc="int(d_head * rotary_pct)")
    rotary_base = property(lambda self: self._neox.rotary_emb_base, doc="rotary_emb_base (rope_theta)")
    tie_word_embeddings = property(lambda self: self._neox.tie_word_embeddings)
    attn_scale = property(lambda self: math.sqrt(self.d_head), doc="sqrt(d_head): scores are divided by it")
    initializer_range = property(lambda self: 0.8 / math.sqrt(self.d_model),
                                 doc="TransformerLens' GPT-2-style init std, 0.8 / sqrt(d_model)")

    @property
    def n_params(self) -> int:
        """TransformerLens' count: attention and MLP weight matrices, no biases, embeddings or LayerNorms."""
        return self.n_layers * (4 * self.d_model * self.d_head * self.n_heads + 2 * self.d_model * self.d_mlp)

    @property
    def use_dynamic_ntk_rope(self) -> bool:
        return (self._neox.rope_scaling or {}).get("type") == "dynamic"

    @property
    def rotary_scaling_factor(self) -> float:
        scaling = self._neox.rope_scaling or {}
        return float(scaling["factor"]) if scaling.get("type") == "linear" else 1.0

    # ------------------------------------------------------------------ live state
    @property
    def device(self) -> str:
        """Where inputs go (`model.input_device`), as a str like TransformerLens' ("cpu", "cuda:0")."""
        return str(self._model.input_device)

    @property
    def dtype(self) -> torch.dtype:
        param = next(self._model.parameters(), None)
        return param.dtype if param is not None else torch.float32

    @property
    def normalization_type(self) -> str:
        """"LN", or "LNPre" once fold_ln moved the LayerNorm weights into the next weights (as TransformerLens)."""
        return "LNPre" if "fold_ln" in self._model.weights_processed else "LN"

    @property
    def tokenizer_prepends_bos(self) -> bool | None:
        tok = self._model.tokenizer
        return None if tok is None else len(tok.encode("")) > 0

    def __getattr__(self, name: str):
        settings = self.__dict__["_settings"]
        if name in settings:
            return settings[name]
        if name in STREAM_FLAGS:
            return bool(getattr(self._model, name, False))
        if name in CONSTANT_FIELDS:
            return CONSTANT_FIELDS[name]
        raise AttributeError(f"LensConfig has no field {name!r} (TransformerLens' HookedTransformerConfig "
                             "fields are all here; the NeoXConfig with transformers' names is model.config)")

    def __setattr__(self, name: str, value) -> None:
        if name == "default_prepend_bos":
            if not isinstance(value, bool):
                raise TypeError(f"cfg.default_prepend_bos must be True or False, got {value!r}")
            self._settings[name] = value
        elif name in STREAM_FLAGS:
            getattr(self._model, f"set_{name}")(value)
        else:
            raise AttributeError(f"cfg.{name} is read-only: it describes the loaded model (settable: "
                                 f"{', '.join(SETTABLE)})")

    def to_dict(self) -> dict[str, Any]:
        """Every field, as TransformerLens' `HookedTransformerConfig.to_dict()`."""
        return {name: getattr(self, name) for name in FIELDS}

    def __repr__(self) -> str:
        return "LensConfig:\n" + "\n".join(f"  {k}: {v!r}" for k, v in self.to_dict().items())


#: Every field of TransformerLens 3.9's HookedTransformerConfig, in its order.
FIELDS = (
    "d_model", "d_head", "n_layers", "n_ctx", "n_heads", "d_mlp", "d_vocab", "device", "use_attn_result",
    "use_split_qkv_input", "default_prepend_bos", "positional_embedding_type", "n_key_value_heads", "attn_only",
    "gated_mlp", "uses_rms_norm", "eps", "layer_norm_folding", "act_fn", "normalization_type", "num_experts",
    "experts_per_token", "final_rms", "dtype", "model_name", "use_attn_scale", "attn_scale", "use_hook_mlp_in",
    "use_attn_in", "use_qk_norm", "clip_qkv", "use_logn_attn", "train_seq_length", "use_dynamic_ntk_rope",
    "use_local_attn", "ungroup_grouped_query_attention", "original_architecture", "from_checkpoint",
    "checkpoint_index", "checkpoint_label_type", "checkpoint_value", "tokenizer_name", "window_size",
    "attn_types", "init_mode", "n_devices", "attention_dir", "seed", "initializer_range", "init_weights",
    "scale_attn_by_inverse_layer_idx", "d_vocab_out", "parallel_attn_mlp", "rotary_dim", "n_params",
    "use_hook_tokens", "tokenizer_prepends_bos", "post_embedding_ln", "rotary_base", "rotary_base_local",
    "rotary_scaling_factor", "trust_remote_code", "rotary_adjacent_pairs", "load_in_4bit",
    "quantization_method", "relative_attention_max_distance", "relative_attention_num_buckets",
    "decoder_start_token_id", "tie_word_embeddings", "use_normalization_before_and_after",
    "attn_scores_soft_cap", "output_logits_soft_cap", "use_NTK_by_parts_rope", "NTK_by_parts_low_freq_factor",
    "NTK_by_parts_high_freq_factor", "NTK_by_parts_factor", "NTK_original_ctx_len", "use_yarn_rope",
    "yarn_factor", "yarn_attention_factor", "yarn_beta_fast", "yarn_beta_slow",
    "yarn_original_max_position_embeddings", "yarn_truncate", "yarn_global_attn_only", "use_attention_sinks",
    "norm_topk_prob",
)
