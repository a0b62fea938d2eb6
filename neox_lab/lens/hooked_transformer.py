"""`HookedTransformer`: a NeoX in TransformerLens 3.x's convention, a view of a `NeoXForCausalLM`.

    from neox_lab import HookedTransformer                      # the one import a TransformerLens notebook changes
    model = HookedTransformer.from_pretrained("path/to/pythia-160m")   # processed weights, as TransformerLens
    hooked = HookedTransformer(hf_model)                        # a view of a loaded NeoXForCausalLM: no copy
    hooked.hf()                                                 # ... and back: the same NeoXForCausalLM

The view holds the very modules of the transformers-convention model it wraps (embedding, blocks, final
LayerNorm, unembedding, their parameters, buffers and hook points), its tokenizer, attention backend and
stream switches: a hook added through one fires when the other runs, an in-place weight edit through one
is seen by the other, and switching costs nothing. What differs is only the convention of the calls:
`model(tokens)` returns logits here, the output object there; `to_tokens` uses `cfg.default_prepend_bos`
(False for GPT-NeoX, as TransformerLens' loader sets it); `generate` samples by default; `from_pretrained`
processes weights as TransformerLens does. docs/guides/from-transformerlens.md lists what remains
different from TransformerLens itself.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import NeoXConfig
from ..dtypes import DTYPES, dtype_name
from ..hooks.hooked import HookedMixin
from ..model.checkpoints import checkpoint_label, resolve_checkpoint_choice
from ..model.conventions import PROCESSING_ARGS
from ..model.loading import resolve_checkpoint
from ..model.reload import load_in_place
from ..model.shipped import DEFAULT_MODEL_ID, attach_default_tokenizer
from ..model.tasks import NeoXForCausalLM
from . import generation
from .config import LensConfig
from .loss import lm_cross_entropy_loss
from .processing import process_weights
from .text import TextMixin, attention_mask_for, is_text
from .token_lookup import TokenLookup
from .weights import ABSENT_WEIGHTS, ModelWeights

RETURN_TYPES = ("logits", "loss", "both", None)

#: The modules a view shares with the NeoXForCausalLM it wraps, under TransformerLens' paths.
SHARED_BODY_MODULES = ("embed", "hook_embed", "embed_dropout", "rotary", "blocks", "ln_final")
SHARED_HEAD_MODULES = ("unembed", "hook_logits")


class Output(NamedTuple):
    """What `return_type="both"` returns, as TransformerLens' `Output`: ``logits, loss = model(...)``."""

    logits: torch.Tensor
    loss: torch.Tensor


class HookedTransformer(nn.Module, HookedMixin, TextMixin, TokenLookup, ModelWeights):
    """A GPT-NeoX causal LM in TransformerLens 3.x's convention (see the module docstring).

    `HookedTransformer(model)` views a `NeoXForCausalLM` (a `NeoXConfig` builds a fresh random one);
    `HookedTransformer.from_pretrained(path)` loads a checkpoint and processes its weights as
    TransformerLens does by default. `hf()` returns the transformers-convention model it views.
    """

    def __init__(self, model: NeoXForCausalLM | NeoXConfig, tokenizer=None, *, default_prepend_bos: bool = False,
                 default_padding_side: str | None = None, model_name: str = "custom",
                 tokenizer_name: str | None = None, checkpoint_index: int | None = None,
                 checkpoint_value: int | None = None):
        if isinstance(model, NeoXConfig):
            model = NeoXForCausalLM(model).eval()
        if not isinstance(model, NeoXForCausalLM):
            raise TypeError(f"HookedTransformer views a NeoXForCausalLM (or builds one from a NeoXConfig), got "
                            f"{type(model).__name__}; TransformerLens' HookedTransformer is a language model, "
                            "so the classification and QA heads have no such view")
        super().__init__()
        # After nn.Module's __init__: it sets `training`, which here is the viewed model's flag (a property).
        self.__dict__["_hf"] = model
        for name in SHARED_BODY_MODULES:
            setattr(self, name, getattr(model.body, name))
        for name in SHARED_HEAD_MODULES:
            setattr(self, name, getattr(model, name))
        self._setup_hooks()
        self.cfg = LensConfig(model, default_prepend_bos=default_prepend_bos, model_name=model_name,
                              tokenizer_name=tokenizer_name, checkpoint_index=checkpoint_index,
                              checkpoint_value=checkpoint_value)
        if tokenizer is not None or default_padding_side is not None:
            self.set_tokenizer(tokenizer if tokenizer is not None else model.tokenizer, default_padding_side)

    # ------------------------------------------------------------------ the view
    def hf(self) -> NeoXForCausalLM:
        """The transformers-convention model this views: the same modules, parameters and hooks."""
        return self._hf

    @property
    def config(self) -> NeoXConfig:
        """The model's `NeoXConfig` (transformers' field names); `cfg` is TransformerLens' view of it."""
        return self._hf.cfg

    @property
    def body(self):
        """The bare `NeoXModel` (embedding, blocks, final LayerNorm) this model runs."""
        return self._hf.body

    @property
    def tokenizer(self):
        """The viewed model's tokenizer (shared: setting it here sets it there)."""
        return self._hf.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._hf.tokenizer = tokenizer

    @property
    def training(self) -> bool:  # type: ignore[override]
        return self.__dict__["_hf"].training

    @training.setter
    def training(self, mode: bool) -> None:
        # nn.Module.train() sets this, then recurses into the shared children; nn.Module.__init__ sets it
        # before there is a model to view, and must not change the model's mode.
        hf = self.__dict__.get("_hf")
        if hf is not None:
            hf.train(mode)

    @property
    def use_attn_result(self) -> bool:  # type: ignore[override]
        return self._hf.use_attn_result

    @use_attn_result.setter
    def use_attn_result(self, value: bool) -> None:
        self._hf.use_attn_result = bool(value)

    @property
    def weights_processed(self) -> set[str]:
        """The TransformerLens processing steps applied to the weights, e.g. {"fold_ln", ...}."""
        return self._hf.weights_processed

    @property
    def attn_backend(self) -> str:
        return self._hf.attn_backend

    def set_attn_backend(self, name: str) -> None:
        """"eager" (reference), "sdpa", "flash" (CUDA fp16/bf16) or "auto" (docs/concepts/attention-paths.md)."""
        self._hf.set_attn_backend(name)

    def attn_kernels(self) -> list[str | None]:
        """The attention kernel each layer ran on its latest forward (`NeoXPreTrained.attn_kernels`)."""
        return self._hf.attn_kernels()

    @property
    def input_device(self) -> torch.device:
        return self._hf.input_device

    @property
    def device_map(self) -> dict[str, str] | None:
        return self._hf.device_map

    def set_tokenizer(self, tokenizer, default_padding_side: str | None = None) -> None:
        """Attach `tokenizer` (a `NeoXTokenizer`, or any with its encode / decode / special-token ids), and
        set its `padding_side` when given (TransformerLens' `set_tokenizer`)."""
        if default_padding_side is not None:
            if default_padding_side not in ("left", "right"):
                raise ValueError(f"default_padding_side must be 'left' or 'right', got {default_padding_side!r}")
            tokenizer.padding_side = default_padding_side
        self.tokenizer = tokenizer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ABSENT_WEIGHTS:
                raise AttributeError(f"HookedTransformer.{name}: {ABSENT_WEIGHTS[name]}") from None
            raise

    # ------------------------------------------------------------------ forward
    def forward(self, input: str | list[str] | torch.Tensor, return_type: str | None = "logits",
                loss_per_token: bool = False, prepend_bos: bool | None = None, padding_side: str | None = None,
                start_at_layer: int | None = None, tokens: torch.Tensor | None = None,
                shortformer_pos_embed: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                stop_at_layer: int | None = None, past_kv_cache: Any = None) -> Any:
        """TransformerLens' forward: `input` is a str, a list of str, token ids ``[batch pos]`` (or ``[pos]``),
        or with `start_at_layer=L` the residual stream entering block L ``[batch pos d_model]``.

        return_type: "logits" ``[batch pos d_vocab]`` (default), "loss" (mean next-token cross-entropy;
        ``[batch pos-1]`` with `loss_per_token`), "both" (an `Output(logits, loss)`), or None.
        `stop_at_layer=L` returns the residual stream entering block L (negative counts from the end:
        -1 is every block but the last); `tokens` are the ids a loss scores when the input is a stream.
        Text is tokenized with `to_tokens(input, prepend_bos, padding_side)` (defaults:
        `cfg.default_prepend_bos`, the tokenizer's `padding_side`). As TransformerLens, an attention mask
        is made only for left padding (leading pad tokens masked) or taken from `attention_mask`; right
        padding needs none, and a loss then counts every position.
        """
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        if past_kv_cache is not None:
            raise TypeError("past_kv_cache (TransformerLens' key-value cache) is not taken here; generate() "
                            "decodes with a KV cache, and model.hf()(ids, past_key_values=..., use_cache=True) "
                            "steps one with neox_lab's KVCache")
        if shortformer_pos_embed is not None:
            raise ValueError("shortformer_pos_embed: a NeoX has rotary positions, no positional embedding to add")
        if start_at_layer is not None:
            if not torch.is_tensor(input) or not input.is_floating_point():
                raise TypeError("with start_at_layer, the input is the residual stream entering that layer, "
                                "a float tensor [batch pos d_model]")
            resid = input if input.dim() == 3 else input[None]
            if attention_mask is not None:
                attention_mask = attention_mask.to(self.input_device)
        else:
            resid = None
            bos = self.resolve_prepend_bos(prepend_bos)
            side = self.resolve_padding_side(padding_side)
            tokens = self.to_tokens(input, prepend_bos=bos, padding_side=side) if is_text(input) else input
            if not torch.is_tensor(tokens):
                raise TypeError(f"input must be a str, a list of str or token ids, got {type(input).__name__}")
            if tokens.dim() == 1:
                tokens = tokens[None]
            tokens = tokens.to(self.input_device)
            if attention_mask is None and side == "left" and self.tokenizer is not None:
                attention_mask = attention_mask_for(tokens, self.tokenizer.pad_token_id, self.tokenizer.bos_token_id,
                                                    bos, side)
            if attention_mask is not None:
                attention_mask = attention_mask.to(tokens.device)
        hf = self._hf
        run = dict(attention_mask=attention_mask, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer)
        ids = None if resid is not None else tokens
        if stop_at_layer is not None or return_type is None:
            # The blocks only: TransformerLens unembeds nothing here.
            hf.warn_if_left_padded(ids, attention_mask)
            out = hf.body(ids, inputs_embeds=resid, **run)
            return out.last_hidden_state if stop_at_layer is not None else None
        logits = hf(ids, inputs_embeds=resid, **run).logits
        if return_type == "logits":
            return logits
        if tokens is None:
            raise ValueError(f"return_type={return_type!r} with start_at_layer needs tokens= (the ids to score)")
        loss = self.loss_fn(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else Output(logits, loss)

    def loss_fn(self, logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        """TransformerLens' next-token cross-entropy (lens/loss.py): the mean, or ``[batch pos-1]``."""
        return lm_cross_entropy_loss(logits, tokens, attention_mask, per_token)

    # TransformerLens' generate, bound as a method (lens/generation.py).
    generate = generation.generate

    # ------------------------------------------------------------------ weights
    def process_weights_(self, fold_ln: bool = True, center_writing_weights: bool = True,
                         center_unembed: bool = True, refactor_factored_attn_matrices: bool = False,
                         fold_value_biases: bool = True) -> HookedTransformer:
        """TransformerLens' weight processing, in place (lens/processing.py); returns the model.

        Next-token probabilities are unchanged (logits move by a per-position constant under
        `center_unembed`); weights and residual-stream hooks change as in TransformerLens. The viewed
        `NeoXForCausalLM` is the same model, so it is processed too (and, with a bias in its
        unembedding, can no longer be saved as a transformers checkpoint)."""
        process_weights(self._hf, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                        center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                        refactor_factored_attn_matrices=refactor_factored_attn_matrices)
        return self

    def load_checkpoint_(self, path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                         checkpoint_index: int | None = None, checkpoint_value: int | None = None
                         ) -> HookedTransformer:
        """Load another checkpoint of this model into it in place (the same tensors, new values; hooks,
        placement and backend stay), then process it with the steps this model's weights went through;
        returns the model. `NeoXForCausalLM.load_checkpoint_` describes the checks (model/reload.py).
        `cfg.checkpoint_index` / `cfg.checkpoint_value` follow when the checkpoint is picked by them."""
        source, revision = resolve_checkpoint_choice(path_or_repo_id, revision, checkpoint_index, checkpoint_value)
        steps = {name: name in self.weights_processed for name in PROCESSING_ARGS}
        load_in_place(self._hf, source, revision=revision, process=lambda model: process_weights(model, **steps))
        if checkpoint_index is not None or checkpoint_value is not None:
            index, value = checkpoint_label(path_or_repo_id, checkpoint_index, checkpoint_value)
            self.cfg.set_checkpoint(index, value)
        return self

    @classmethod
    def from_pretrained(cls, model_name: str | os.PathLike, fold_ln: bool = True, center_writing_weights: bool = True,
                        center_unembed: bool = True, refactor_factored_attn_matrices: bool = False,
                        checkpoint_index: int | None = None, checkpoint_value: int | None = None,
                        hf_model: NeoXForCausalLM | None = None, device: torch.device | str | None = None,
                        n_devices: int = 1, tokenizer=None, move_to_device: bool = True,
                        fold_value_biases: bool = True, default_prepend_bos: bool | None = None,
                        default_padding_side: str | None = None, dtype: torch.dtype | str = torch.float32,
                        *, attn_backend: str = "auto", revision: str | None = None,
                        device_map: str | dict | None = None, max_memory: dict | None = None,
                        offload_folder: str | os.PathLike | None = None, **unsupported: Any) -> HookedTransformer:
        """Load a GPT-NeoX checkpoint (a directory, a hub id, or "neox-lab/default", the shipped model) the
        way TransformerLens' `from_pretrained` loads one: in float32 by default, weights processed with
        fold_ln, center_writing_weights, center_unembed and fold_value_biases, `default_prepend_bos` False
        (TransformerLens' GPT-NeoX setting; the shipped model was trained the same way, on windows cut
        from a token stream with no BOS put in front).

        `checkpoint_value` (a training step) / `checkpoint_index` pick a training checkpoint as
        TransformerLens does: a Pythia one (hub revision "step<N>"), and also one of "neox-lab/default"'s
        kept checkpoints or of a local folder of step directories (`neox_lab.get_checkpoint_labels`).
        `hf_model`: a loaded `NeoXForCausalLM` to take the weights from (copied,
        as TransformerLens converts them; `HookedTransformer(model)` views one without copying).
        neox_lab's own: `attn_backend`, `revision`, and `device_map` / `max_memory` / `offload_folder` to
        place a model over several devices (processing then has to be off: from_pretrained_no_processing).
        """
        if unsupported:
            raise TypeError(f"HookedTransformer.from_pretrained does not take {sorted(unsupported)} (neox_lab "
                            "supports TransformerLens' GPT-NeoX options listed in its docstring)")
        if n_devices != 1:
            raise ValueError(f"n_devices={n_devices}: pass device_map='balanced' to spread the blocks over GPUs")
        steps = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                     fold_value_biases=fold_value_biases,
                     refactor_factored_attn_matrices=refactor_factored_attn_matrices)
        if device_map is not None and any(steps.values()):
            # Offloaded weights are placeholders between forwards: processing would edit those.
            raise ValueError("weight processing (fold_ln, ...) edits weights in memory, which a model placed with "
                             "device_map does not hold for offloaded parts; use from_pretrained_no_processing "
                             "with device_map, or load without device_map")
        if checkpoint_index is not None or checkpoint_value is not None:
            # One resolver (model/checkpoints.py): Pythia's revisions, the shipped history, step folders.
            source, revision = resolve_checkpoint_choice(model_name, revision, checkpoint_index, checkpoint_value)
            checkpoint_index, checkpoint_value = checkpoint_label(model_name, checkpoint_index, checkpoint_value)
        else:
            source = model_name
        torch_dtype = DTYPES[dtype_name(dtype)]
        if hf_model is not None:
            if not isinstance(hf_model, NeoXForCausalLM):
                raise TypeError(f"hf_model must be a neox_lab NeoXForCausalLM, got {type(hf_model).__name__}; "
                                "pass the checkpoint's directory as model_name instead")
            model = copy.deepcopy(hf_model).to(dtype=torch_dtype)
            if device is not None and move_to_device:
                model = model.to(device)
        else:
            model = NeoXForCausalLM.from_pretrained(
                source, dtype=torch_dtype, device=device if move_to_device else None,
                attn_backend=attn_backend, revision=revision, device_map=device_map, max_memory=max_memory,
                offload_folder=offload_folder)
        if tokenizer is not None:
            model.tokenizer = tokenizer
        attach_default_tokenizer(model)
        if any(steps.values()):
            process_weights(model, **steps)
        name = os.fspath(model_name)
        tokenizer_name = str(resolve_checkpoint(name)) if name == DEFAULT_MODEL_ID else name
        return cls(model, default_prepend_bos=bool(default_prepend_bos), default_padding_side=default_padding_side,
                   model_name=Path(name).name or name, tokenizer_name=tokenizer_name,
                   checkpoint_index=checkpoint_index, checkpoint_value=checkpoint_value)

    @classmethod
    def from_pretrained_no_processing(cls, model_name: str | os.PathLike, fold_ln: bool = False,
                                      center_writing_weights: bool = False, center_unembed: bool = False,
                                      refactor_factored_attn_matrices: bool = False, fold_value_biases: bool = False,
                                      dtype: torch.dtype | str = torch.float32, default_prepend_bos: bool | None = None,
                                      default_padding_side: str | None = None, **kwargs: Any) -> HookedTransformer:
        """`from_pretrained` with every processing step off: the weights transformers loads, in float32."""
        return cls.from_pretrained(model_name, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                   center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                   refactor_factored_attn_matrices=refactor_factored_attn_matrices, dtype=dtype,
                                   default_prepend_bos=default_prepend_bos,
                                   default_padding_side=default_padding_side, **kwargs)

