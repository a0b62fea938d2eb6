"""Autoregressive decoding for `NeoXForCausalLM`: greedy and sampled, batched, with a KV cache and hooks.

The token-choice semantics follow `transformers`' `generate`: logits of the last position in fp32;
sampling filters them temperature -> top-k -> top-p (top-p always keeps the most likely token), then
draws from the softmax; a row that produced an eos token is finished and gets `pad_token_id` from then
on (with attention mask 1, as transformers does); decoding stops when every row is finished or the
length limit is reached. One deliberate difference: `top_k=None` means no top-k filtering, whereas
transformers' default generation config samples with top_k=50.

What hooks see. Hooks attached around the call (``with model.hooks(fwd_hooks=...): model.generate(...)``)
fire on every forward pass generation makes:

* with ``use_cache=True`` (default), the first pass runs the whole prompt: activations are
  ``[batch prompt_len ...]`` (attention scores/pattern ``[batch n_heads prompt_len prompt_len]``); each
  later pass runs one new position: ``[batch 1 ...]`` (scores/pattern ``[batch n_heads 1 key_pos]`` with
  key_pos = every position so far, the cached ones included). `hook_k`/`hook_v`/`hook_rot_k` see only
  the new position; the cached keys are not re-hooked.
* with ``use_cache=False`` every pass runs the full sequence so far, ``[batch pos ...]`` with pos growing
  by one per step.

So there are (number of new tokens) passes; a hook's return value steers the generation. With left
padding, rows of the batch are aligned on the right; pad positions are masked out of attention and
position ids count real tokens only, so every row computes what it would compute alone.

`HookedTransformer.generate` (neox_lab/lens/generation.py, TransformerLens' signature and defaults)
runs the same loop, `generate_ids`, with TransformerLens' token choice.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..hooks.activation_cache import ActivationCache
from ..hooks.hooked import NameOrFilter
from .conventions import LENS_GENERATE_ARGS, use_hooked
from .fast_decode import static_decoder
from .kv_cache import KVCache
from .padding import caller_stacklevel

_UNSET = object()
#: What chooses each next token: (fp32 logits of the last position [batch d_vocab], the ids so far
#: [batch pos]) -> next ids [batch].
Chooser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def no_tokenizer_error() -> RuntimeError:
    """What every text convenience (and `generate(prompt=...)`) raises on a model without a tokenizer."""
    return RuntimeError("model.tokenizer is None; attach one: model.tokenizer = NeoXTokenizer.default()")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor | Sequence | None = None,
             attention_mask: torch.Tensor | Sequence | None = None, *, prompt: str | list[str] | None = None,
             max_length: int | None = None, max_new_tokens: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = _UNSET,  # type: ignore[assignment]
             pad_token_id: int | None = _UNSET,  # type: ignore[assignment]
             generator: torch.Generator | None = None, use_cache: bool = True,
             return_cache: bool = False, names_filter: NameOrFilter | Iterable[str] | None = None,
             compile: bool = False, **lens_args) -> torch.Tensor | tuple[torch.Tensor, ActivationCache]:
    """Extend prompts token by token, as transformers' `generate`; returns the ids ``[batch prompt_len + new]``.

    input_ids: int ``[batch pos]`` (or ``[pos]``), left-padded with `attention_mask` ``[batch pos]``
        (1 = real token) when rows differ in length. Or `prompt`: a str or list of str, tokenized with
        `model.tokenizer` and left-padded (no attention_mask then).
    max_new_tokens: tokens to add; max_length: total length including the prompt (must exceed it).
        One of the two is required; max_new_tokens wins when both are given (as transformers).
    do_sample: False for greedy (argmax); True to sample with `temperature` (> 0), `top_k` (>= 1,
        None: off) and `top_p` (in (0, 1], None or 1: off), drawing with `generator` when given.
    eos_token_id: int, list of ints, or None (never stop early); default the config's, else the
        tokenizer's. pad_token_id: what finished rows get; default the config's, else the tokenizer's,
        else the (first) eos id, else 0.
    use_cache: decode incrementally with a preallocated `KVCache`; False recomputes the whole sequence
        each step (slower, same tokens: useful as a reference and for hooks that need every position).
    return_cache: also return an `ActivationCache` over the whole final sequence, ``(ids, cache)``.
        It is built by one extra `run_with_cache` forward over the final ids with the final attention
        mask (restricted to `names_filter`), after decoding; hooks still attached at that point fire
        in that pass too, on every position at once. Its last position is the last generated token
        (whose own logits were never needed to decode).

    compile: decode with a static KV cache and a CUDA-graph-captured one-token step
        (`neox_lab.model.fast_decode`) where it can run (CUDA, fp16/bf16, no hooks attached, use_cache);
        elsewhere it warns and decodes as usual. Same tokens up to half-precision rounding. Opt-in.

    TransformerLens' generate (text in and out, `return_type`, sampling by default, a progress bar) is
    `HookedTransformer.generate`; its arguments and text input raise here, saying so. Runs under
    `torch.no_grad()`. Module docstring: what hooks see at each step.
    """
    lens = sorted(set(lens_args) & set(LENS_GENERATE_ARGS))
    if lens:
        raise TypeError(use_hooked(type(model).__name__, f"generate({', '.join(a + '=' for a in lens)}...)"))
    if lens_args:
        raise TypeError(f"generate got unexpected arguments {sorted(lens_args)}")
    if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                      and all(isinstance(t, str) for t in input_ids)):
        raise TypeError("generate takes token ids here (transformers' convention; prompt=... tokenizes text "
                        "and still returns ids). " + use_hooked(type(model).__name__, "Text in, text out"))
    input_ids, attention_mask = prompt_inputs(model, input_ids, prompt, attention_mask)
    _check_sampling(do_sample, temperature, top_k, top_p)
    eos = _eos_ids(model, eos_token_id)
    choose = sampler(temperature, top_k, top_p, generator) if do_sample else greedy
    return generate_ids(model, input_ids, attention_mask, total=total_length(input_ids.shape[1], max_length,
                                                                            max_new_tokens),
                        choose=choose, eos=eos, fill=_pad_id(model, pad_token_id, eos), use_cache=use_cache,
                        return_cache=return_cache, names_filter=names_filter, compile=compile)


def greedy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The most likely next token of each row."""
    return logits.argmax(-1)


def sampler(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
            generator: torch.Generator | None = None) -> Chooser:
    """transformers' sampling: `filter_logits`, then one draw from the softmax (with `generator`)."""
    def choose(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
        where = generator.device if generator is not None else probs.device
        return torch.multinomial(probs.to(where), 1, generator=generator).squeeze(1).to(ids.device)
    return choose


def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, total: int, choose: Chooser,
                 eos: list[int], fill: int, use_cache: bool = True, return_cache: bool = False,
                 names_filter: NameOrFilter | Iterable[str] | None = None, compile: bool = False,
                 verbose: bool = False) -> torch.Tensor | tuple[torch.Tensor, ActivationCache]:
    """The decoding loop both conventions' `generate` run: checked, left-padded `input_ids` and their
    mask (`prompt_inputs`) are extended to `total` positions by `choose`; a row that produced a token of
    `eos` is finished and gets `fill` from then on; decoding stops when every row is finished.
    `verbose` shows a progress bar (tqdm)."""
    if names_filter is not None and not return_cache:
        raise ValueError("names_filter selects what return_cache=True caches; pass return_cache=True too")
    if return_cache:
        model.resolve_hooks(names_filter)  # a bad hook name fails now, not after decoding
    batch, prompt_len = input_ids.shape
    ids, mask = input_ids, attention_mask
    eos_t = torch.tensor(eos, device=ids.device, dtype=ids.dtype) if eos else None
    finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    cache = KVCache(model.cfg.num_hidden_layers, max_length=total) if use_cache else None
    decoder = None
    if compile and use_cache:
        decoder = static_decoder(model, ids, total)  # None (with a warning) where it cannot run
    # Decoding never pads (a finished row's fill token is attended, as in transformers), so an unpadded
    # prompt stays unpadded: the cached steps then pass no mask, and forward builds none (no running sum,
    # no all-ones test read back to the host, per token).
    padded = not bool(mask.all())
    step_ids = ids
    steps = range(total - prompt_len)
    if verbose:
        steps = tqdm(steps, desc="generate")
    for step in steps:
        if decoder is not None:
            logits = decoder(step_ids, mask, prefill=step == 0).float()
        else:
            if use_cache:
                out = model(step_ids, attention_mask=mask if padded else None, past_key_values=cache,
                            use_cache=True)
            else:
                out = model(ids, attention_mask=mask)
            # A placed model's logits come off its last device; the ids and mask stay on its first.
            logits = out.logits[:, -1].float().to(ids.device)
        next_ids = choose(logits, ids)
        next_ids = torch.where(finished, torch.full_like(next_ids, fill), next_ids)
        ids = torch.cat((ids, next_ids[:, None]), dim=1)
        mask = torch.cat((mask, mask.new_ones(batch, 1)), dim=1)
        if eos_t is not None:
            finished |= torch.isin(next_ids, eos_t)
            if bool(finished.all()):
                break
        step_ids = next_ids[:, None]

    if not return_cache:
        return ids
    _, act_cache = model.run_with_cache(ids, attention_mask=mask, names_filter=names_filter)
    return ids, act_cache


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """transformers' sampling warpers in their order: divide by temperature, keep the top_k largest
    (ties with the k-th kept), keep the smallest set whose probability reaches top_p (at least one
    token). Removed entries become -inf. logits: ``[batch d_vocab]``."""
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k is not None:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1:] = False  # the most likely token always survives
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


# ------------------------------------------------------------------------------------------ validation
def prompt_inputs(model, input_ids, prompt, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked `input_ids` ``[batch pos]`` on the model's input device and their left-padding mask (all
    ones when not given); or the same from `prompt` text, tokenized and left-padded."""
    device = model.input_device
    if (input_ids is None) == (prompt is None):
        raise ValueError("pass exactly one of input_ids and prompt")
    if prompt is not None:
        if attention_mask is not None:
            raise ValueError("attention_mask comes from the tokenizer when prompt= is used; pass input_ids "
                             "to give your own")
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("prompt must be a str or a non-empty list of str")
        if model.tokenizer is None:
            raise no_tokenizer_error()
        for i, text in enumerate(texts):
            if not model.tokenizer.encode(text):
                raise ValueError(f"prompt {i} ({text!r}) is empty: it has no tokens to continue")
        enc = model.tokenizer(list(texts), padding=True, padding_side="left", return_tensors="pt")
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids [batch pos], got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; every row needs at "
                         "least one token to continue from")
    vocab = model.cfg.vocab_size
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids hold token id {bad}, outside the model's vocabulary [0, {vocab})")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    attention_mask = torch.as_tensor(attention_mask).to(device)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must match input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    attention_mask = attention_mask.long()
    empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty prompt: row(s) {empty} of attention_mask are all padding")
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError("attention_mask has padding after a real token; generation needs left padding "
                         "(padding_side='left') so every row ends at its last real token")
    return input_ids, attention_mask


def total_length(prompt_len: int, max_length, max_new_tokens) -> int:
    """The length decoding stops at, from transformers' max_length / max_new_tokens pair."""
    if max_new_tokens is not None:
        if max_length is not None:
            warnings.warn(f"both max_new_tokens={max_new_tokens} and max_length={max_length} given; "
                          "max_new_tokens wins", stacklevel=caller_stacklevel())
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        return prompt_len + max_new_tokens
    if max_length is None:
        raise ValueError("pass max_new_tokens (tokens to add) or max_length (total length, prompt included)")
    if not isinstance(max_length, int) or max_length <= prompt_len:
        raise ValueError(f"max_length={max_length!r} counts the prompt and must exceed its length "
                         f"{prompt_len}; use max_new_tokens to count new tokens only")
    return max_length


def _check_sampling(do_sample: bool, temperature, top_k, top_p) -> None:
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None (off) or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None (off) or in (0, 1], got {top_p!r}")
    if do_sample and not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                          and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}; "
                         "for greedy decoding pass do_sample=False")


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is _UNSET:
        eos_token_id = model.cfg.eos_token_id
        if eos_token_id is None and model.tokenizer is not None:
            eos_token_id = model.tokenizer.eos_token_id
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(_as_iterable(eos_token_id))
    for i in ids:
        if not isinstance(i, int) or not 0 <= i < model.cfg.vocab_size:
            raise ValueError(f"eos_token_id {i!r} is not a token id in [0, {model.cfg.vocab_size})")
    return ids


def _pad_id(model, pad_token_id, eos: list[int]) -> int:
    if pad_token_id is _UNSET or pad_token_id is None:
        pad_token_id = model.cfg.pad_token_id
        if pad_token_id is None and model.tokenizer is not None:
            pad_token_id = model.tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    if not isinstance(pad_token_id, int) or not 0 <= pad_token_id < model.cfg.vocab_size:
        raise ValueError(f"pad_token_id {pad_token_id!r} is not a token id in [0, {model.cfg.vocab_size})")
    return pad_token_id


def _as_iterable(value) -> Iterable:
    if hasattr(value, "tolist"):
        value = value.tolist()
        return [value] if isinstance(value, int) else value
    return value
