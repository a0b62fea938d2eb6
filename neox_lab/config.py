"""`NeoXConfig`: the one description of a GPT-NeoX model's shape, with HuggingFace field names."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu", "swish")
ROPE_TYPES = ("linear", "dynamic")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")

# Keys transformers writes into config.json that say nothing about the computation.
_BOOKKEEPING = {
    "architectures", "torch_dtype", "dtype", "transformers_version", "model_type", "_name_or_path",
    "id2label", "label2id", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "chunk_size_feed_forward", "is_decoder", "use_return_dict", "tokenizer_class", "prefix",
    "task_specific_params", "finetuning_task", "_attn_implementation", "attn_implementation",
    "_attn_implementation_autoset", "gradient_checkpointing", "tf_legacy_loss", "use_bfloat16",
    "sep_token_id", "decoder_start_token_id", "cross_attention_hidden_size", "tie_encoder_decoder",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "output_router_logits", "rope_type",
    # gpt-neox-20b's own config.json carries these GPT-NeoX-library names next to the HF ones.
    "attention_probs_dropout_prob", "hidden_dropout_prob",
}


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """A JSON file's top-level object; an unreadable file, invalid JSON or a non-object raises `ValueError`
    (`FileNotFoundError` when missing) naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON (line {err.lineno}, column {err.colno}: "
                         f"{err.msg}); fix or re-save it") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} holds a JSON {type(data).__name__}, not an object of settings")
    return data


#: TransformerLens' config names for NeoXConfig's fields (they live on `HookedTransformer.cfg`).
LENS_NAMES = {"n_layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
              "d_head": "head_dim", "d_mlp": "intermediate_size", "d_vocab": "vocab_size",
              "d_vocab_out": "vocab_size", "n_ctx": "max_position_embeddings", "act_fn": "hidden_act",
              "eps": "layer_norm_eps", "parallel_attn_mlp": "use_parallel_residual", "rotary_base": "rotary_emb_base",
              "normalization_type": "a LayerNorm with weight and bias", "positional_embedding_type": "rotary",
              "default_prepend_bos": "a TransformerLens tokenization setting", "device": "the model's input_device",
              "original_architecture": "GPTNeoXForCausalLM"}


def _refuse_if(cond: bool, key: str, why: str) -> None:
    if cond:
        raise ValueError(f"config key {key!r}: {why}; neox_lab cannot build this model")


@dataclass(frozen=True)
class NeoXConfig:
    """Shape and hyper-parameters of a GPT-NeoX model (field names and defaults as `transformers`).

    `rope_scaling` is None or ``{"type": "linear" | "dynamic", "factor": float > 1}``.
    """

    vocab_size: int = 50432
    hidden_size: int = 6144
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    intermediate_size: int = 24576
    hidden_act: str = "gelu"
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    classifier_dropout: float = 0.1
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_cache: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_parallel_residual: bool = True
    rope_scaling: dict | None = None
    attention_bias: bool = True
    num_labels: int = 2
    problem_type: str | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.rope_scaling is not None:
            # One spelling inside: transformers writes "type" (4.x) or "rope_type" (5.x).
            scaling = dict(self.rope_scaling)
            kind = scaling.pop("type", None) or scaling.pop("rope_type", None)
            scaling.pop("rope_type", None)
            object.__setattr__(self, "rope_scaling", {"type": kind, **scaling})
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """`int(head_dim * rotary_pct)`, as transformers computes it."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def rotary_channels(self) -> int:
        """Channels actually rotated: the frequency table has ceil(rotary_dim / 2) entries and
        transformers 5.x rotates twice that many, so an odd rotary_dim rotates one extra channel."""
        return 2 * math.ceil(self.rotary_dim / 2)

    def parameter_count(self) -> int:
        """Parameters of a causal LM of this shape: the embedding, every block (fused QKV and output
        projections, the MLP, two LayerNorms; biases per `attention_bias`), the final LayerNorm and the
        unembedding (none of its own when tied)."""
        d, f = self.hidden_size, self.intermediate_size
        attention = 4 * d * d + (4 * d if self.attention_bias else 0)
        block = attention + 2 * d * f + f + d + 4 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_hidden_layers * block + 2 * d + head

    def __getattr__(self, name: str):
        # Only reached for a missing attribute: a TransformerLens config name says where it lives.
        if name in LENS_NAMES:
            raise AttributeError(f"NeoXConfig.{name}: NeoXConfig has transformers' field names ({name} is "
                                 f"{LENS_NAMES[name]}); TransformerLens' names are on HookedTransformer's cfg "
                                 "(HookedTransformer(model).cfg)")
        raise AttributeError(f"'NeoXConfig' object has no attribute {name!r}")

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"NeoXConfig.{name} = {getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size", f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            fail("rotary_pct", "must lie in [0, 1]")
        if self.rotary_channels > self.head_dim:
            fail("rotary_pct", f"rotates {self.rotary_channels} channels, more than head_dim={self.head_dim}")
        if not self.rotary_emb_base > 0:
            fail("rotary_emb_base", "must be positive")
        for name in ("attention_dropout", "hidden_dropout", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                fail(name, "must lie in [0, 1]")
        if not self.layer_norm_eps > 0:
            fail("layer_norm_eps", "must be positive")
        if self.hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"unknown activation; supported: {', '.join(ACTIVATIONS)}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                fail(name, f"must be None or a token id in [0, {self.vocab_size})")
        if self.problem_type not in PROBLEM_TYPES:
            fail("problem_type", f"must be one of {PROBLEM_TYPES}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            if kind in (None, "default"):
                object.__setattr__(self, "rope_scaling", None)
                return
            if kind not in ROPE_TYPES:
                fail("rope_scaling", f"unknown rope type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
            factor = self.rope_scaling.get("factor")
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 1:
                fail("rope_scaling", "the scaling factor must be a number > 1")
            if kind == "dynamic" and self.rotary_dim <= 2:
                # transformers' NTK formula raises the base to dim / (dim - 2).
                fail("rope_scaling", f"dynamic scaling needs rotary_dim > 2 (have {self.rotary_dim})")

    # ----------------------------------------------------------------- conversion
    def replace(self, **changes: Any) -> NeoXConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, source: dict | str | os.PathLike) -> NeoXConfig:
        """Read a transformers GPTNeoX config: a dict, a config.json path or a checkpoint directory.

        Understands transformers 4.x keys (`rotary_pct`, `rotary_emb_base`, `rope_scaling`) and 5.x keys
        (`partial_rotary_factor`, `rope_theta`, `rope_parameters`). Bookkeeping keys are ignored; keys
        that would change the computation in ways neox_lab cannot honour raise `ValueError`.
        """
        if not isinstance(source, dict):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = read_json_object(path, "config")
        d = dict(source)
        model_type = d.get("model_type", "gpt_neox")
        _refuse_if(model_type != "gpt_neox", "model_type", f"is {model_type!r}, not 'gpt_neox'")
        _refuse_if(bool(d.pop("is_encoder_decoder", False)), "is_encoder_decoder", "must be false")
        _refuse_if(bool(d.pop("add_cross_attention", False)), "add_cross_attention", "must be false")
        _refuse_if(bool(d.pop("pruned_heads", None)), "pruned_heads", "pruned checkpoints are not supported")
        _refuse_if(d.pop("sliding_window", None) is not None, "sliding_window", "NeoX has no sliding window")
        heads = d.get("num_attention_heads", cls.num_attention_heads)
        kv_heads = d.pop("num_key_value_heads", None)
        _refuse_if(kv_heads not in (None, heads), "num_key_value_heads", "grouped-query attention is not NeoX")
        head_dim = d.pop("head_dim", None)
        hidden = d.get("hidden_size", cls.hidden_size)
        sizes_valid = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (heads, hidden))
        # Invalid sizes are named by validate() below; only a valid pair has a head_dim to compare.
        _refuse_if(sizes_valid and head_dim not in (None, hidden // heads), "head_dim",
                   "must equal hidden_size // heads")

        rope = dict(d.pop("rope_parameters", None) or {})
        scaling = d.pop("rope_scaling", None)
        kwargs: dict[str, Any] = {}
        pct = [v for v in (d.pop("rotary_pct", None), d.pop("partial_rotary_factor", None),
                           rope.pop("partial_rotary_factor", None)) if v is not None]
        base = [v for v in (d.pop("rotary_emb_base", None), d.pop("rope_theta", None),
                            rope.pop("rope_theta", None)) if v is not None]
        for key, values in (("rotary_pct", pct), ("rotary_emb_base", base)):
            if len(set(values)) > 1:
                raise ValueError(f"config key {key!r}: old and new spellings disagree ({values})")
            if values:
                kwargs[key] = values[0]
        rope_kind = rope.get("rope_type", rope.get("type", "default"))
        if scaling is None and rope_kind != "default":
            scaling = rope
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k in ("type", "rope_type", "factor")}
        kwargs["rope_scaling"] = scaling or None

        if "num_labels" not in d and d.get("id2label"):
            kwargs["num_labels"] = len(d["id2label"])
        eos = d.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            d["eos_token_id"] = eos[0] if eos else None
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_scaling"}
        unknown = {}
        for key, value in d.items():
            if key in names:
                kwargs[key] = value
            elif key not in _BOOKKEEPING:
                unknown[key] = value
        if unknown:
            warnings.warn(f"ignoring config keys neox_lab does not know: {sorted(unknown)}", stacklevel=2)
        return cls(**kwargs, extra=unknown)

    def to_hf(self) -> dict:
        """A config dict that `transformers.GPTNeoXConfig(**d)` (4.x and 5.x) accepts."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if d["problem_type"] is None:
            del d["problem_type"]
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"type": self.rope_scaling["type"], "rope_type": self.rope_scaling["type"],
                                 "factor": float(self.rope_scaling["factor"])}
        d["model_type"] = "gpt_neox"
        return d


def _preset(layers: int, d_model: int, heads: int, vocab: int = 50304, **kw: Any) -> NeoXConfig:
    return NeoXConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=4 * d_model, rotary_pct=0.25,
                      bos_token_id=0, eos_token_id=0, **kw)


#: Shapes of the public Pythia suite and GPT-NeoX-20B (weights are not shipped).
PRESETS: dict[str, NeoXConfig] = {
    "pythia-14m": _preset(6, 128, 4),
    "pythia-31m": _preset(6, 256, 8),
    "pythia-70m": _preset(6, 512, 8),
    "pythia-160m": _preset(12, 768, 12),
    "pythia-410m": _preset(24, 1024, 16),
    "pythia-1b": _preset(16, 2048, 8),
    "pythia-1.4b": _preset(24, 2048, 16),
    "pythia-2.8b": _preset(32, 2560, 32),
    "pythia-6.9b": _preset(32, 4096, 32, vocab=50432),
    "pythia-12b": _preset(36, 5120, 40, vocab=50688),
    "gpt-neox-20b": _preset(44, 6144, 64, vocab=50432, layer_norm_eps=1e-5),
}
