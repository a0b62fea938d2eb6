"""Task heads on top of `NeoXModel`, with transformers' losses and pooling.

Losses are taken in at least fp32 (`widen`), as transformers takes them, whatever the model's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import axes
from ..config import NeoXConfig
from ..dtypes import widen
from ..hooks.points import HookPoint
from . import generation
from .base import NeoXModel, NeoXPreTrained
from .conventions import LENS_FORWARD_ARGS, use_hooked
from .loading import checkpoint_architecture
from .outputs import NeoXOutput

_BODY_ARGS = ("attention_mask", "position_ids", "inputs_embeds", "past_key_values", "use_cache",
              "output_hidden_states", "output_attentions", "head_mask", "stop_at_layer", "start_at_layer")


class _Head(NeoXPreTrained):
    """A NeoXModel at `.model` plus a head; hook names are the body's plus `hook_logits`.

    Subclasses define `_build_head(cfg)` (their layers) and `forward`.
    """

    #: Modules (state-dict prefixes) a causal-LM checkpoint does not have, initialised fresh on load.
    head_modules: tuple[str, ...] = ()

    def __init__(self, cfg: NeoXConfig, attn_backend: str = "auto"):
        super().__init__(cfg, attn_backend)
        self.model = NeoXModel(cfg, attn_backend, _setup=False)
        self.hook_logits = HookPoint(axes.LOGITS)
        self._build_head(cfg)
        self.init_weights()
        self.tie_weights()
        self._setup_hooks(strip="model.")

    @property
    def body(self) -> NeoXModel:
        return self.model

    @property
    def blocks(self) -> nn.ModuleList:
        """The body's blocks, so ``model.blocks[L].attn.W_Q`` works on every class (TransformerLens' path)."""
        return self.model.blocks

    def tie_weights(self) -> None:
        """Share the embedding with the unembedding where the config says so (causal LM only)."""

    def set_attn_backend(self, name: str) -> None:
        super().set_attn_backend(name)
        if "model" in self._modules:
            self.model.set_attn_backend(name)

    def _body(self, input_ids, kwargs) -> NeoXOutput:
        self.refuse_lens_call(input_ids, kwargs)
        unknown = set(kwargs) - set(_BODY_ARGS)
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward got unexpected arguments {sorted(unknown)}")
        self.warn_if_left_padded(input_ids, kwargs.get("attention_mask"), kwargs.get("past_key_values"))
        return self.model(input_ids, **kwargs)

    def refuse_lens_call(self, input_ids: Any, kwargs: dict) -> None:
        """Raise, naming `HookedTransformer`, for a TransformerLens-style call: text input, a residual
        stream as the positional input, or one of TransformerLens' forward arguments (`return_type`,
        `prepend_bos`, ...). Each would mean something else in transformers' convention, or nothing."""
        name = type(self).__name__
        lens = [a for a in LENS_FORWARD_ARGS if a in kwargs]
        if lens:
            raise TypeError(use_hooked(name, f"model(..., {', '.join(a + '=' for a in lens)})"))
        if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                          and all(isinstance(t, str) for t in input_ids)):
            raise TypeError(use_hooked(name, "Text input"))
        if isinstance(kwargs.get("attention_mask"), str):  # TransformerLens' positional return_type
            raise TypeError(f"attention_mask={kwargs['attention_mask']!r}: the second positional argument is "
                            "transformers' attention_mask. " + use_hooked(name, "A positional return_type"))
        if torch.is_tensor(input_ids) and input_ids.is_floating_point() and input_ids.dim() == 3:
            raise TypeError(f"{name} takes token ids as input_ids; pass a residual stream or embeddings as "
                            "inputs_embeds= (with start_at_layer=L for the stream entering block L). "
                            + use_hooked(name, "A residual stream as the positional input"))


class NeoXForCausalLM(_Head):
    """NeoX with the unembedding (`embed_out` / `lm_head` in checkpoints); loss shifts labels, ignores -100."""

    hf_architecture = "GPTNeoXForCausalLM"

    def _build_head(self, cfg: NeoXConfig) -> None:
        self.unembed = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.unembed.weight = self.model.embed.weight

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs: Any) -> NeoXOutput:
        """transformers' convention: returns a `NeoXOutput` with `.logits` [batch pos d_vocab] (`out[0]`,
        `loss, logits = out` as a transformers ModelOutput) and, given `labels` (shifted inside, -100
        ignored), `.loss`. `logits_to_keep=N` unembeds only the last N positions (0: all): logits and
        `hook_logits` are [batch N d_vocab]; with a large vocabulary that is most of a short forward's cost.

        Also takes position_ids, inputs_embeds, past_key_values / use_cache (a `KVCache`),
        output_hidden_states, output_attentions, head_mask, and neox_lab's `stop_at_layer=L` (run blocks
        0..L-1; `.last_hidden_state` is the stream entering block L, `.logits` None) / `start_at_layer=L`
        (`inputs_embeds` is that stream). TransformerLens' calls (text, `return_type=`, `prepend_bos=`,
        a residual stream as the input, ...) raise, naming `HookedTransformer`, the view that takes them.
        """
        return self._forward(input_ids, labels, logits_to_keep, {**kwargs, "attention_mask": attention_mask})

    def _forward(self, input_ids, labels, logits_to_keep: int, kwargs: dict) -> NeoXOutput:
        check_targets("labels", labels, _input_shape(input_ids, kwargs), "one token id (or -100) per input token")
        out = self._body(input_ids, kwargs)
        if kwargs.get("stop_at_layer") is not None:
            return out
        hidden = out.last_hidden_state
        if logits_to_keep:
            if labels is not None:
                raise ValueError("labels= needs logits at every position; drop logits_to_keep to compute a loss")
            hidden = hidden[:, -logits_to_keep:]
        out.logits = self.hook_logits(self.unembed(hidden))
        if labels is not None:
            logits = widen(out.logits[:, :-1])
            target = labels[:, 1:].to(logits.device, torch.long)  # int32 ids are accepted as input; CE needs int64
            out.loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        return out

    # Greedy or sampled decoding with a KV cache: generation.generate, bound as a method (its
    # signature and docstring come along).
    generate = generation.generate


class NeoXForSequenceClassification(_Head):
    """Scores every position, returns the rightmost non-pad token's scores (as transformers)."""

    hf_architecture = "GPTNeoXForSequenceClassification"
    head_modules = ("score",)

    def _build_head(self, cfg: NeoXConfig) -> None:
        self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor | None = None, *, labels: torch.Tensor | None = None,
                **kwargs: Any) -> NeoXOutput:
        check_targets("labels", labels, _input_shape(input_ids, kwargs)[:1], "one label (or row of labels) per "
                      "input row", leading=True)
        out = self._body(input_ids, kwargs)
        if kwargs.get("stop_at_layer") is not None:
            return out
        scores = self.hook_logits(self.score(out.last_hidden_state))
        batch = scores.shape[0]
        pad = self.cfg.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("sequence classification of a batch > 1 needs config.pad_token_id to find each "
                             "row's last token")
        if pad is None or input_ids is None:
            last = torch.full((batch,), scores.shape[1] - 1, device=scores.device)
        else:
            not_pad = (input_ids != pad).to(scores.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=scores.device, dtype=torch.int32) * not_pad).argmax(-1)
        out.logits = scores[torch.arange(batch, device=scores.device), last]
        if labels is not None:
            out.loss = self._loss(out.logits, labels.to(scores.device))
        return out

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = self.cfg.num_labels
        kind = self.cfg.problem_type
        if kind is None:
            if n == 1:
                kind = "regression"
            elif labels.dtype in (torch.long, torch.int):
                kind = "single_label_classification"
            else:
                kind = "multi_label_classification"
        if kind == "regression":
            return F.mse_loss(widen(logits.squeeze()), labels.squeeze().to(widen(logits).dtype)) if n == 1 else \
                F.mse_loss(widen(logits), labels.to(widen(logits).dtype))
        if kind == "single_label_classification":
            return F.cross_entropy(widen(logits.view(-1, n)), labels.view(-1))
        return F.binary_cross_entropy_with_logits(widen(logits), labels.to(widen(logits).dtype))


class NeoXForTokenClassification(_Head):
    """Per-token labels through `classifier_dropout` and a linear classifier; loss ignores -100."""

    hf_architecture = "GPTNeoXForTokenClassification"
    head_modules = ("classifier",)

    def _build_head(self, cfg: NeoXConfig) -> None:
        self.dropout = nn.Dropout(cfg.classifier_dropout or 0.0)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, input_ids: torch.Tensor | None = None, *, labels: torch.Tensor | None = None,
                **kwargs: Any) -> NeoXOutput:
        check_targets("labels", labels, _input_shape(input_ids, kwargs), "one label (or -100) per input token")
        out = self._body(input_ids, kwargs)
        if kwargs.get("stop_at_layer") is not None:
            return out
        out.logits = self.hook_logits(self.classifier(self.dropout(out.last_hidden_state)))
        if labels is not None:
            logits = widen(out.logits)
            out.loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.to(logits.device).view(-1),
                                       ignore_index=-100)
        return out


class NeoXForQuestionAnswering(_Head):
    """Span start/end logits; the loss clamps positions to [0, T] and ignores T (as transformers)."""

    hf_architecture = "GPTNeoXForQuestionAnswering"
    head_modules = ("qa_outputs",)

    def _build_head(self, cfg: NeoXConfig) -> None:
        self.qa_outputs = nn.Linear(cfg.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor | None = None, *, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, **kwargs: Any) -> NeoXOutput:
        for label, positions in (("start_positions", start_positions), ("end_positions", end_positions)):
            check_targets(label, positions, _input_shape(input_ids, kwargs)[:1], "one position per input row",
                          leading=True)
        out = self._body(input_ids, kwargs)
        if kwargs.get("stop_at_layer") is not None:
            return out
        out.logits = self.hook_logits(self.qa_outputs(out.last_hidden_state))
        out.start_logits, out.end_logits = (t.squeeze(-1).contiguous() for t in out.logits.split(1, dim=-1))
        if start_positions is not None and end_positions is not None:
            ignored = out.start_logits.shape[1]
            start = start_positions.to(out.logits.device).view(-1).clamp(0, ignored)
            end = end_positions.to(out.logits.device).view(-1).clamp(0, ignored)
            out.loss = (F.cross_entropy(widen(out.start_logits), start, ignore_index=ignored)
                        + F.cross_entropy(widen(out.end_logits), end, ignore_index=ignored)) / 2
        return out


def _input_shape(input_ids, kwargs: dict) -> tuple:
    """[batch pos] of the input (ids or embeddings); () when there is none to read it from."""
    x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    return tuple(x.shape[:2]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else ()


def check_targets(label: str, targets, shape: tuple, what: str, leading: bool = False) -> None:
    """Loss targets must be a tensor of the input's `shape` (only its leading axes, with `leading`), checked
    before the forward so that a mistake costs nothing and says which argument and shape are wrong."""
    if targets is None or not shape:
        return
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor ({what}), got {type(targets).__name__}")
    got = tuple(targets.shape[: len(shape)]) if leading else tuple(targets.shape)
    if got != shape and not (leading and targets.dim() == 0 and shape == (1,)):  # one row: a scalar will do
        want = f"[{', '.join(map(str, shape))}{', ...' if leading else ''}]"
        raise ValueError(f"{label} must be {want} ({what}) to match the input, got {list(targets.shape)}")


#: transformers architecture name -> the neox_lab class that loads it.
MODEL_CLASSES = {cls.hf_architecture: cls for cls in (NeoXModel, NeoXForCausalLM, NeoXForSequenceClassification,
                                                      NeoXForTokenClassification, NeoXForQuestionAnswering)}


def model_class(directory) -> type[NeoXPreTrained]:
    """The neox_lab class that loads a checkpoint directory: the one its config.json's `architectures` names."""
    arch = checkpoint_architecture(directory)
    if arch not in MODEL_CLASSES:
        raise ValueError(f"{directory}: config.json names architecture {arch!r}, not a GPTNeoX class neox_lab "
                         f"loads ({', '.join(sorted(MODEL_CLASSES))})")
    return MODEL_CLASSES[arch]
