"""`NeoXModel`: embedding, blocks and final LayerNorm, plus the base class all model classes share."""

from __future__ import annotations

import operator
import os
import warnings
from itertools import islice
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .. import axes
from ..config import NeoXConfig
from ..hooks.hooked import HookedMixin
from ..hooks.points import HookPoint
from .attention import Attention
from .block import Block
from .checkpoints import resolve_checkpoint_choice
from .conventions import LENS_ATTRIBUTES, PROCESSING_ARGS, use_hooked
from .kernels import BACKENDS, AttnMask, StaticDecodeMask, resolve_backend
from .kv_cache import KVCache
from .layernorm import LayerNorm
from .loading import load_pretrained, save_pretrained
from .memory import check_fits
from .outputs import NeoXOutput
from .padding import caller_stacklevel, warn_if_left_padded
from .placement import load_placed, stored_state_dict
from .reload import load_in_place
from .rotary import Rotary

ModelT = TypeVar("ModelT", bound="NeoXPreTrained")


class NeoXPreTrained(nn.Module, HookedMixin):
    """What every transformers-convention class has: a config, an attention backend, hooks, load and save.

    TransformerLens' surface (to_tokens, W_Q, process_weights_, logits from `model(tokens)`, ...) is the
    other front door's, `neox_lab.HookedTransformer` (neox_lab/lens/), a view of the same modules: asked
    for here, such a name raises an AttributeError saying so (model/conventions.py)."""

    cfg: NeoXConfig
    #: The transformers class a checkpoint of this class is saved as (config.json's `architectures`).
    hf_architecture: ClassVar[str]
    #: Where each placement unit lives, by module name ("model.embed", "model.blocks.3", ...,
    #: "unembed" -> "cuda:0", "cpu" or "disk") when loaded with a `device_map`; None for a model on
    #: one device.
    device_map: dict[str, str] | None = None
    _main_device: torch.device | None = None

    def __init__(self, cfg: NeoXConfig, attn_backend: str = "auto"):
        super().__init__()
        if not isinstance(cfg, NeoXConfig):
            raise TypeError(f"expected a NeoXConfig, got {type(cfg).__name__}; try NeoXConfig.from_hf(...)")
        self.cfg = cfg
        self.tokenizer = None
        #: The weight-processing steps applied so far, e.g. {"fold_ln"}: empty as loaded; TransformerLens'
        #: processing (HookedTransformer.from_pretrained / process_weights_) records its steps here.
        self.weights_processed: set[str] = set()
        self.set_attn_backend(attn_backend)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in LENS_ATTRIBUTES:
                raise
            # A TransformerLens name says where it lives, not just "no attribute".
            raise AttributeError(f"{type(self).__name__}.{name}: " + use_hooked(type(self).__name__, f"`{name}`")
                                 ) from None

    def hf(self: ModelT) -> ModelT:
        """The transformers-convention view of this model: itself (`HookedTransformer.hf()` returns it too).

        Tools that serve both conventions (neox_lab.analysis, the activation store, testing) run a model
        through this view, so they give the same numbers for either class."""
        return self

    @property
    def config(self) -> NeoXConfig:
        return self.cfg

    @property
    def body(self) -> NeoXModel:
        """The bare `NeoXModel` this model runs: itself, or the one under a task head.

        Tools that read weights (W_O, the LayerNorms) reach them through here, so they serve every
        model class without importing any."""
        raise NotImplementedError(f"{type(self).__name__} must say where its NeoXModel is")

    def set_attn_backend(self, name: str) -> None:
        """"eager" (reference), "sdpa", "flash" (CUDA fp16/bf16) or "auto" (flash where it can run, else
        sdpa; a layer whose scores / pattern are wanted runs eager for that call, silently)."""
        if name not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {name!r}")
        self.attn_backend = name

    def attn_kernels(self) -> list[str | None]:
        """The attention kernel each layer ran on its latest forward, in layer order: "eager",
        "eager (fallback)" (scores/pattern requested on a fast backend), "sdpa", or the flash kernel's
        name ("flash_attn.func", "flash_attn.kvcache", "flash_attn.varlen", "sdpa.flash", "sdpa.cudnn",
        "sdpa.efficient"); None for a layer that has not run yet."""
        layers = sorted((m for m in self.modules() if isinstance(m, Attention)), key=lambda m: m.layer)
        return [m.last_kernel for m in layers]

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' initialisation: normal(0, initializer_range) weights, zero biases, unit LayerNorms."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        for name, param in self.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                param.fill_(1.0)
            elif name.endswith(("ln1.bias", "ln2.bias", "ln_final.bias")):
                param.zero_()

    @classmethod
    def from_pretrained(cls: type[ModelT], path_or_repo_id: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, attn_backend: str = "auto",
                        revision: str | None = None, device_map: str | dict | None = None,
                        max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None,
                        checkpoint_index: int | None = None, checkpoint_value: int | None = None,
                        **unexpected: Any) -> ModelT:
        """Load a transformers GPTNeoX checkpoint (local directory or hub id), in eval mode.

        `dtype` None keeps the checkpoint's own; the tokenizer is the checkpoint's tokenizer.json when
        it has one. Weights load **unprocessed**: the model computes what transformers computes, weight
        for weight. TransformerLens' processed weights (fold_ln, centring, fold_value_biases) are
        `HookedTransformer.from_pretrained`'s default; passing those arguments here raises saying so.

        `device_map` spreads a model over several devices with accelerate (``pip install
        neox-lab[big]``): "auto" / "balanced" (blocks evenly over the GPUs, the rest to CPU RAM, then
        disk), "balanced_low_0", "sequential", or a dict of module name -> device ("cpu", "disk", an
        int CUDA index or "cuda:N"; neox_lab's module names or transformers', prefixes allowed: e.g.
        ``{"model.embed": 0, "model.blocks.0": 0, "model.blocks.1": "disk", ...}``). Blocks are never
        split. `max_memory` ({0: "20GiB", "cpu": "60GiB"}) caps a planned map; `offload_folder` is
        needed only when a .bin checkpoint has blocks on "disk" (safetensors files are read in place).
        The result's `device_map` shows the placement (accelerate also sets `hf_device_map`, the same
        dict); docs/guides/placement.md.

        `checkpoint_index` / `checkpoint_value` pick a training checkpoint as TransformerLens does: of a
        Pythia hub id (revision "step{value}"), of "neox-lab/default" (the shipped model's training
        history) or of a local folder of step directories; the value must be one of
        `get_checkpoint_labels(path_or_repo_id)`, the index indexes that list (model/checkpoints.py).
        """
        processing = sorted(set(unexpected) & set(PROCESSING_ARGS))
        if processing:
            raise TypeError(f"{cls.__name__}.from_pretrained loads the weights transformers loads; "
                            + use_hooked(cls.__name__, f"weight processing ({', '.join(processing)})"))
        if unexpected:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected arguments {sorted(unexpected)}")
        path_or_repo_id, revision = resolve_checkpoint_choice(path_or_repo_id, revision, checkpoint_index,
                                                              checkpoint_value)
        if device_map is not None:
            if device is not None:
                raise ValueError("pass either device= (one device) or device_map= (several), not both")
            return load_placed(cls, path_or_repo_id, device_map=device_map, max_memory=max_memory,
                               offload_folder=offload_folder, dtype=dtype, attn_backend=attn_backend,
                               revision=revision)
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder apply to a device_map; pass device_map='auto' too")
        return load_pretrained(cls, path_or_repo_id, dtype=dtype, device=device, attn_backend=attn_backend,
                               revision=revision)

    def load_checkpoint_(self: ModelT, path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                         checkpoint_index: int | None = None, checkpoint_value: int | None = None) -> ModelT:
        """Load another checkpoint of this model into it **in place** (the same tensors, new values);
        returns the model.

        For sweeps over training checkpoints: hooks, a `device_map` placement and the attention backend
        stay, and no parameter is reallocated. Weights processed by a `HookedTransformer` view are
        reloaded through it (`HookedTransformer.load_checkpoint_` processes them again); here they are
        refused. Checked as `from_pretrained` checks: the
        config must match this model's (shapes and everything that changes the computation), every
        tensor must be there with its shape, finite, nothing left over; a refused checkpoint raises
        CheckpointError and leaves the model untouched. `revision`, `checkpoint_index` and
        `checkpoint_value` pick the checkpoint as in `from_pretrained` (model/reload.py)."""
        path_or_repo_id, revision = resolve_checkpoint_choice(path_or_repo_id, revision, checkpoint_index,
                                                              checkpoint_value)
        load_in_place(self, path_or_repo_id, revision=revision)
        return self

    def stored_state_dict(self) -> dict[str, torch.Tensor]:
        """`state_dict()` with real values also for the offloaded parts of a model placed with
        `device_map` (whose module tensors are meta placeholders between forwards)."""
        return stored_state_dict(self)

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the device the embedding runs on (for a placed model, accelerate's main
        device, where offloaded blocks run too), else the parameters' device."""
        if self._main_device is not None:
            return self._main_device
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def set_placement(self, device_map: dict[str, str], main_device: str | torch.device) -> None:
        """Record a placement made by `accelerate.dispatch_model` (done by `from_pretrained`)."""
        for model in {id(self): self, id(self.body): self.body}.values():
            model.device_map = dict(device_map)
            model._main_device = torch.device(main_device)

    def warn_if_left_padded(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                            past_key_values=None) -> None:
        """Warn when `input_ids` look left-padded (by the tokenizer's or the config's pad token) and no
        attention mask says so (model/padding.py)."""
        pads = (getattr(self.tokenizer, "pad_token_id", None), self.cfg.pad_token_id)
        warn_if_left_padded(input_ids, attention_mask, pads, past_key_values)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that transformers loads with identical logits (a model
        placed with `device_map` writes its offloaded weights too)."""
        save_pretrained(self, directory, self.stored_state_dict())

    def _reset_buffers(self, device=None) -> None:
        for module in self.modules():
            if isinstance(module, Rotary):
                module.reset_buffers(device)


def layer_index(value: int | None, n_layers: int, name: str) -> int | None:
    """`stop_at_layer` / `start_at_layer` as a block index in [0, n_layers]: negatives count from the end,
    as TransformerLens' ``blocks[start:stop]`` does; anything else raises naming the argument."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # an int, numpy int or 0-d integer tensor; not 1.5
    except TypeError:
        raise TypeError(f"{name} must be an int layer index (or None), got {value!r} ({type(value).__name__})"
                        ) from None
    if not -n_layers <= value <= n_layers:
        raise ValueError(f"{name}={value} is outside [-{n_layers}, {n_layers}] for this {n_layers}-layer model "
                         f"({name}=L stops before block L; negative values count from the end)")
    return value + n_layers if value < 0 else value


class NeoXModel(NeoXPreTrained):
    """The bare NeoX: returns the final LayerNorm's output as `last_hidden_state`."""

    hf_architecture = "GPTNeoXModel"

    def __init__(self, cfg: NeoXConfig, attn_backend: str = "auto", *, _setup: bool = True):
        super().__init__(cfg, attn_backend)
        check_fits(cfg, torch.get_default_dtype(), torch.get_default_device())  # before allocating anything
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.hook_embed = HookPoint(axes.RESID)
        self.embed_dropout = nn.Dropout(cfg.hidden_dropout)
        self.rotary = Rotary(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.ln_final = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        # A task head checks its own inputs (with its tokenizer); only a bare model warns here.
        self._checks_padding = _setup
        if _setup:
            self.init_weights()
            self._setup_hooks()

    @property
    def body(self) -> NeoXModel:
        return self

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, past_len):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        for label, arg in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds),
                           ("attention_mask", attention_mask), ("position_ids", position_ids)):
            if arg is not None and not isinstance(arg, torch.Tensor):
                raise TypeError(f"{label} must be a torch.Tensor, got {type(arg).__name__}; wrap it, e.g. "
                                f"torch.tensor([[...]]) for [batch pos] (model.tokenizer turns text into ids)")
            if arg is not None and arg.device.type == "meta":
                raise ValueError(f"{label} is on the meta device, which holds shapes but no values; pass a tensor "
                                 f"on {self.input_device} (or the CPU)")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be an integer tensor [batch pos] (int64 or int32), got "
                                 f"{input_ids.dtype} {tuple(input_ids.shape)}; convert with input_ids.long()")
            batch, q_len = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch pos {self.cfg.hidden_size}], "
                                 f"got {tuple(inputs_embeds.shape)}")
            weight = self.embed.weight
            if inputs_embeds.dtype != weight.dtype:
                raise ValueError(f"inputs_embeds is {inputs_embeds.dtype} but the model's weights are "
                                 f"{weight.dtype}; cast with inputs_embeds.to({weight.dtype})")
            batch, q_len = inputs_embeds.shape[:2]
        if q_len == 0:
            raise ValueError("empty input: at least one position is needed")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past_len + q_len):
            raise ValueError(f"attention_mask must be [batch, past + pos] = {(batch, past_len + q_len)}, "
                             f"got {tuple(attention_mask.shape)}")
        self._check_values(input_ids, attention_mask)
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[-1] != q_len):
            raise ValueError(f"position_ids must be [batch pos] with pos={q_len}, got {tuple(position_ids.shape)}")
        return batch, q_len

    def _check_cache(self, cache, batch: int | None = None) -> None:
        """`past_key_values` must be a KVCache for every layer and, once filled, for this batch."""
        if cache is None:
            return
        if not isinstance(cache, KVCache):
            raise TypeError(f"past_key_values must be a neox_lab KVCache (returned by a call with use_cache=True, "
                            f"or KVCache(n_layers)), got {type(cache).__name__}; transformers' tuples and "
                            "Cache objects hold keys in another layout and are not accepted")
        if cache.n_layers != self.cfg.num_hidden_layers:
            raise ValueError(f"past_key_values is a KVCache for {cache.n_layers} layers; this model has "
                             f"{self.cfg.num_hidden_layers} (make it with KVCache(model.cfg.num_hidden_layers))")
        held = next((k.shape[0] for k in cache.keys if k is not None), None)
        if batch is not None and cache.length and held not in (None, batch):
            raise ValueError(f"past_key_values holds {held} rows but this call's batch is {batch}; a KVCache "
                             "belongs to the batch that filled it (KVCache.select(rows) picks rows)")

    def _check_values(self, input_ids, attention_mask) -> None:
        """Token ids inside the vocabulary and a 0/1 mask, read back in one host sync: a decoding step
        runs this once per token, and each sync stalls the launch queue."""
        checks = []
        if input_ids is not None and input_ids.numel():
            checks += [input_ids.min(), input_ids.max()]
        # Positions are the mask's running sum, so a 2 or a 0.5 would silently move every later token.
        check_mask = attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.numel()
        if check_mask:
            checks.append(((attention_mask == 0) | (attention_mask == 1)).all())
        if not checks:
            return
        values = torch.stack([c.to(checks[0].device, torch.int64) for c in checks]).tolist()
        if input_ids is not None and input_ids.numel():
            lo, hi = values[0], values[1]
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"input_ids hold token ids in [{lo}, {hi}], outside the vocabulary "
                                 f"[0, {self.cfg.vocab_size})")
        if check_mask and not values[-1]:
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token), got values "
                             f"{attention_mask.unique()[:8].tolist()}")

    def _head_masks(self, head_mask):
        if head_mask is None:
            return [None] * self.cfg.num_hidden_layers
        head_mask = torch.as_tensor(head_mask)
        n_layers, n_heads = self.cfg.num_hidden_layers, self.cfg.num_attention_heads
        if head_mask.shape == (n_heads,):
            head_mask = head_mask.expand(n_layers, n_heads)
        if head_mask.shape != (n_layers, n_heads):
            raise ValueError(f"head_mask must be [n_heads]={n_heads} or [n_layers, n_heads]={(n_layers, n_heads)}, "
                             f"got {tuple(head_mask.shape)}")
        return list(head_mask.to(self.input_device))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False, output_hidden_states: bool = False,
                output_attentions: bool = False, head_mask: torch.Tensor | None = None,
                stop_at_layer: int | None = None, start_at_layer: int | None = None) -> NeoXOutput:
        """Run the blocks. When `attention_mask` is given without `position_ids`, positions count only
        unmasked tokens (cumsum - 1), so a left-padded row computes what the unpadded row computes.

        `stop_at_layer=L` runs blocks 0..L-1 and returns the stream entering block L as
        `last_hidden_state` (no final LayerNorm); `start_at_layer=L` takes that stream as `inputs_embeds`
        and runs blocks L.. (TransformerLens' pair: the embedding and hook_embed are skipped). Both count
        from the end when negative, as TransformerLens' slice does (`stop_at_layer=-1`: every block but
        the last), and must lie in [-n_layers, n_layers]."""
        cache = past_key_values
        self._check_cache(cache)
        if use_cache and cache is None:
            cache = KVCache(self.cfg.num_hidden_layers)
        past_len = cache.length if cache is not None else 0
        batch, q_len = self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, past_len)
        self._check_cache(cache, batch)
        head_masks = self._head_masks(head_mask)
        if self._checks_padding:
            self.warn_if_left_padded(input_ids, attention_mask, past_key_values)
        device = self.input_device
        n_layers = self.cfg.num_hidden_layers
        stop_at_layer = layer_index(stop_at_layer, n_layers, "stop_at_layer")
        start_at_layer = layer_index(start_at_layer, n_layers, "start_at_layer")
        if start_at_layer is not None:
            if inputs_embeds is None:
                raise ValueError("start_at_layer needs the residual stream entering that layer as "
                                 "inputs_embeds [batch pos d_model] (TransformerLens-style: as the input)")
            x = inputs_embeds
        else:
            x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
            x = self.embed_dropout(self.hook_embed(x))

        key_mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            key_mask = attention_mask.bool()
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            if bool(key_mask.all()):
                key_mask = None
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=device)[None].expand(batch, -1)
        position_ids = position_ids.to(device).expand(batch, -1)
        mask = AttnMask(q_len=q_len, k_len=past_len + q_len, device=device, key_mask=key_mask)
        backend = resolve_backend(self.attn_backend, x)

        snapshot = None if cache is None else cache.snapshot()
        try:
            x, hidden, attentions = self.run_blocks(
                x, position_ids, mask, backend=backend, kv_cache=cache, head_masks=head_masks,
                stop_at_layer=stop_at_layer, output_hidden_states=output_hidden_states,
                output_attentions=output_attentions, start_at_layer=start_at_layer or 0)
        except BaseException:
            if snapshot is not None:  # a failing hook must not leave a half-updated cache behind
                cache.restore(snapshot)
            raise
        n_run = len(self.blocks) if stop_at_layer is None else stop_at_layer
        # Once per layer, one warning per call naming them all.
        fallen = [block.attn for block in islice(self.blocks, start_at_layer or 0, n_run)
                  if block.attn.report_fallback()]
        # "auto" promises the fastest kernel that computes the function asked for, fallback included:
        # only a backend the user named is worth a warning when a layer leaves it.
        if fallen and self.attn_backend != "auto":
            layers = ", ".join(str(attn.layer) for attn in fallen)
            warnings.warn(f"layer{'s' if len(fallen) > 1 else ''} {layers}: attention scores/pattern were "
                          f"requested, which the {backend!r} backend's kernels never materialise; "
                          f"{'these layers run' if len(fallen) > 1 else 'this layer runs'} the eager kernel "
                          "for such calls (every other layer stays on the fast kernel)",
                          stacklevel=caller_stacklevel())
        return NeoXOutput(
            last_hidden_state=x,
            past_key_values=cache if use_cache or past_key_values is not None else None,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def run_blocks(self, x: torch.Tensor, position_ids: torch.Tensor, mask: AttnMask | StaticDecodeMask, *,
                   backend: str, kv_cache=None, head_masks: list | None = None, stop_at_layer: int | None = None,
                   output_hidden_states: bool = False, output_attentions: bool = False, start_at_layer: int = 0,
                   ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The one loop over the blocks: rotary tables, blocks 0..stop_at_layer-1, then (when
        `stop_at_layer` is None) the final LayerNorm, on the embedded input x [batch pos d_model].

        `forward` runs it after checking its inputs and building `mask`; the CUDA-graph decoding step
        (fast_decode.py) runs it on its fixed buffers, which it may because nothing here reads a value
        back to the host. `backend` is a resolved one ("eager", "sdpa" or "flash"). Returns the output,
        the hidden states (each block's input, then the output; empty unless asked for) and the
        attention patterns (empty unless asked for).
        """
        cos, sin = self.rotary.cos_sin(position_ids, x.dtype)
        hidden, attentions = [], []
        n_run = len(self.blocks) if stop_at_layer is None else stop_at_layer
        # islice, not blocks[layer]: ModuleList's indexing costs microseconds a block, per decoding step.
        for layer, block in enumerate(islice(self.blocks, start_at_layer, n_run), start_at_layer):
            if output_hidden_states:
                hidden.append(x)
            # rotary and kv_cache by keyword: accelerate's hooks on a placed block move tensor arguments
            # to its device but must pass these through (placement.SKIP_KEYS).
            x, pattern = block(x, cos=cos, sin=sin, mask=mask, rotary=self.rotary, backend=backend,
                               kv_cache=kv_cache, head_mask=None if head_masks is None else head_masks[layer],
                               output_attentions=output_attentions)
            if output_attentions:
                attentions.append(pattern)
        if stop_at_layer is None:
            x = self.ln_final(x)
        if output_hidden_states:
            hidden.append(x)
        return x, hidden, attentions
