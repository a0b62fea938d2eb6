"""Fast greedy/sampled decoding on CUDA: a static KV cache and one CUDA-graph-captured decoding step.

`generate(..., compile=True)` uses `static_decoder` when it can: CUDA, fp16/bf16, eval mode, no hook
point active, no dynamic rotary scaling, and a KV cache. Otherwise it warns and decodes the plain way.

How. Per (model, batch, total length) one `StaticDecoder` owns a preallocated `KVCache` of `total`
slots and small fixed-address input buffers (token ids, position ids, the slot being written, the key
mask). The prompt runs through the ordinary forward into that cache. The single-token step is captured
once into a `torch.cuda.CUDAGraph` (after two warm-up runs on a side stream, as torch's documentation
asks) and then replayed per token: ~one launch instead of ~20 per layer, which is what bounds batch-1
decoding in eager PyTorch. Each step writes its k, v into slot `col` with `index_copy_` and attends over
the whole cache under the key mask (unwritten slots are masked, and hold zeros), so no shape and no
address changes between steps. Attention in the captured step is the model's backend: "flash" runs
flash-attn's `flash_attn_with_kvcache` (lengths read on the device) when the package is there, a masked
torch fused kernel otherwise; "sdpa"/"eager" run as usual on the `StaticDecodeMask`.

Results equal the plain path up to half-precision rounding (attention reduces over `total` slots, some
zero-weighted, instead of exactly the filled ones), so greedy tokens can differ where two logits tie to
within rounding. Unverified on a GPU in the session that wrote it: `compile` stays opt-in.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from ..dtypes import HALF
from .flash import FLASH_KVCACHE_LEFTPAD, HAVE_FLASH_ATTN
from .kernels import StaticDecodeMask, resolve_backend
from .kv_cache import KVCache


def unsupported_reason(model, input_ids: torch.Tensor) -> str | None:
    """Why the captured decoding step cannot run for this model and input, or None if it can."""
    cfg = model.cfg
    param = next(model.parameters())
    if model.device_map is not None:
        return "the model is placed across devices (device_map); its KV cache lives beside each layer"
    if not (param.is_cuda and input_ids.is_cuda):
        return "the model is not on a CUDA device"
    if param.dtype not in HALF:
        return f"the model is in {param.dtype}, not float16/bfloat16"
    if model.training:
        return "the model is in training mode (dropout)"
    active = [name for name, hp in model.hook_dict.items() if hp.active]
    if active:
        return f"hooks are attached ({', '.join(active[:3])}{', ...' if len(active) > 3 else ''})"
    if cfg.rope_scaling is not None and cfg.rope_scaling["type"] == "dynamic":
        return "dynamic rotary scaling recomputes frequencies from the host-side sequence length"
    if not hasattr(model, "unembed"):
        return "only NeoXForCausalLM decodes"
    return None


# One decoder per model, beside it rather than on it: a captured graph and its buffers must not travel
# with `copy.deepcopy(model)`, `torch.save(model)` or `state_dict()`, and must go when the model does.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_of(model) -> StaticDecoder | None:
    """The `StaticDecoder` the latest `generate(compile=True)` of `model` used, if any."""
    return _DECODERS.get(model)


def static_decoder(model, input_ids: torch.Tensor, total: int, *, graph: bool = True) -> StaticDecoder | None:
    """The model's `StaticDecoder` for this batch and total length (reused across calls while the
    weights keep their storage), or None with a warning saying why the plain path must be used."""
    reason = unsupported_reason(model, input_ids)
    if reason is not None:
        warnings.warn(f"generate(compile=True): decoding without CUDA graphs because {reason}", stacklevel=4)
        return None
    key = StaticDecoder.key_for(model, input_ids.shape[0], total)
    decoder = _DECODERS.get(model)
    if decoder is None or decoder.key != key:
        # Drop both references to the old buffers and graph (the table's and ours) before allocating.
        _DECODERS.pop(model, None)
        decoder = None
        decoder = _DECODERS[model] = StaticDecoder(model, input_ids.shape[0], total, graph=graph)
    return decoder


class StaticDecoder:
    """Prefill through the ordinary forward, then replay a captured one-token step.

    Call it as generation's loop does: first with the prompt ids [batch prompt_len], its mask and
    `prefill=True`, then with each new token [batch 1] and the mask grown by one; it returns the last
    position's logits [batch d_vocab]. `graph=False` runs the same static step without capturing (any
    device: the CPU tests check the step's arithmetic that way).
    """

    def __init__(self, model, batch: int, total: int, *, graph: bool = True):
        cfg, param = model.cfg, next(model.parameters())
        self._model = weakref.ref(model)  # the model owns its decoder (_DECODERS), not the reverse
        self.batch, self.total, self.use_graph = batch, total, graph
        self.key = self.key_for(model, batch, total)
        device, dtype = param.device, param.dtype
        self.cache = KVCache.preallocated(cfg.num_hidden_layers, batch, total, cfg.num_attention_heads,
                                          cfg.head_dim, dtype=dtype, device=device)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)  # the cache slot this step writes
        self.key_mask = torch.zeros(batch, total, dtype=torch.bool, device=device)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        leftpad = torch.zeros(batch, dtype=torch.int32, device=device)
        flash_kvcache = HAVE_FLASH_ATTN and FLASH_KVCACHE_LEFTPAD and cfg.head_dim <= 256 and cfg.head_dim % 8 == 0
        self.mask = StaticDecodeMask(self.key_mask, self.cache_seqlens, leftpad if flash_kvcache else None,
                                     flash_kvcache)
        self.backend = resolve_backend(model.attn_backend, param.new_zeros(1))
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.failed: str | None = None  # why capture failed; the plain path is used from then on
        self._slot = 0  # host copy of `col`
        self._step_cache = _SlotCache(self.cache, self.col)

    @property
    def model(self):
        return self._model()

    @staticmethod
    def key_for(model, batch: int, total: int) -> tuple:
        # Parameter storage addresses: a captured graph reads the weights where they were at capture.
        # Inference mode: buffers made under it cannot be written outside it (and vice versa for autograd).
        ptrs = tuple(p.data_ptr() for p in model.parameters())
        param = next(model.parameters())
        return (batch, total, param.dtype, param.device, model.attn_backend, torch.is_inference_mode_enabled(),
                ptrs)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor, *, prefill: bool = False) -> torch.Tensor:
        if prefill:
            return self._prefill(ids, attention_mask)
        if ids.shape != (self.batch, 1) or self._slot >= self.total:
            raise ValueError(f"StaticDecoder step: expected ids of shape ({self.batch}, 1) and a free slot "
                             f"(slot {self._slot} of {self.total}), got {tuple(ids.shape)}")
        if self.failed is not None:
            return self._plain(ids, attention_mask)
        self.ids.copy_(ids)
        if not self.use_graph:
            logits = self._step()
        else:
            if self.graph is None and not self._capture(ids, attention_mask):
                return self._plain(ids, attention_mask)
            self.graph.replay()
            logits = self.logits
        self._advance()
        return logits.clone()

    # ------------------------------------------------------------------------------------------ phases
    def _prefill(self, ids, attention_mask) -> torch.Tensor:
        self.cache.reset()
        out = self.model(ids, attention_mask=attention_mask, past_key_values=self.cache, use_cache=True)
        n = ids.shape[1]
        real = attention_mask.bool()
        self.key_mask.zero_()
        self.key_mask[:, :n] = real
        self.position_ids.copy_(real.sum(-1, keepdim=True))  # the next token's position: real tokens so far
        if self.mask.leftpad is not None:
            self.mask.leftpad.copy_((~real).sum(-1))  # generation's inputs are left-padded only
        self.col.fill_(n)
        self._slot = n
        return out.logits[:, -1]

    def _step(self) -> torch.Tensor:
        """One token for every row, reading and writing only the fixed buffers (the captured part)."""
        self.key_mask.index_fill_(1, self.col, True)
        self.cache_seqlens.copy_((self.col + 1).to(torch.int32).expand(self.batch))
        body = self.model.body
        x, _, _ = body.run_blocks(body.embed(self.ids), self.position_ids, self.mask, backend=self.backend,
                                  kv_cache=self._step_cache)
        return self.model.unembed(x)[:, -1]

    def _advance(self) -> None:
        self._slot += 1
        self.col.add_(1)
        self.position_ids.add_(1)
        self.cache.set_length(self._slot)

    def _capture(self, ids, attention_mask) -> bool:
        # Warm-up runs repeat this very step (same ids, same slot), so their cache writes are the ones
        # the replay makes again: running them is harmless.
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._step()
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to the plain path
            self.failed = f"{type(err).__name__}: {err}"
            warnings.warn(f"generate(compile=True): CUDA graph capture failed ({self.failed}); decoding "
                          "without it", stacklevel=4)
            return False
        self.graph = graph
        return True

    def _plain(self, ids, attention_mask) -> torch.Tensor:
        self.cache.set_length(self._slot)
        out = self.model(ids, attention_mask=attention_mask, past_key_values=self.cache, use_cache=True)
        self._slot += ids.shape[1]
        self.col.fill_(self._slot)
        return out.logits[:, -1]


class _SlotCache:
    """What Attention sees as its kv_cache inside the captured step: writes slot `col`, returns the lot."""

    def __init__(self, cache: KVCache, col: torch.Tensor):
        self.cache, self.col = cache, col

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys.index_copy_(1, self.col, k)
        values.index_copy_(1, self.col, v)
        return keys, values
