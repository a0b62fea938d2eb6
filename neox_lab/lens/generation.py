"""TransformerLens' `generate`: its signature, defaults (sampling, a progress bar, stop at eos), token
choice and return types, over the core's decoding loop (`neox_lab.model.generation.generate_ids`).

Token choice is TransformerLens' `utils.sample_logits`: temperature 0 is greedy; otherwise logits /
temperature, minus `freq_penalty` times each token's count in the sequence so far (prompt included), then
top_k *or* top_p filtering (top_k wins when both are given), then one draw from
`torch.distributions.Categorical` on the global RNG, so a seeded run draws what TransformerLens draws
from the same logits. A finished row gets the eos token from then on; `return_type="str"` decodes every
row without special tokens and returns a str when there is one row.
"""

from __future__ import annotations

import torch

from ..model.generation import generate_ids, prompt_inputs, total_length
from .text import attention_mask_for, is_text

RETURN_TYPES = ("input", "str", "tokens")


def sample_logits(final_logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  temperature: float = 1.0, freq_penalty: float = 0.0,
                  tokens: torch.Tensor | None = None) -> torch.Tensor:
    """TransformerLens' `utils.sample_logits` for ``[batch d_vocab]`` logits: the next token of each row."""
    if temperature == 0.0:
        return final_logits.argmax(dim=-1)
    final_logits = final_logits / temperature
    if freq_penalty > 0:
        if tokens is None:
            raise ValueError("freq_penalty needs the tokens so far")
        counts = torch.stack([torch.bincount(row, minlength=final_logits.shape[-1]) for row in tokens])
        final_logits = final_logits - freq_penalty * counts.to(final_logits.device, final_logits.dtype)
    if top_k is not None:
        top_k = min(top_k, final_logits.shape[-1])
        kth = final_logits.topk(top_k, dim=-1).values[..., -1:]
        final_logits = final_logits.masked_fill(final_logits < kth, -float("inf"))
    elif top_p is not None:
        sorted_logits, sorted_indices = torch.sort(final_logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        final_logits = final_logits.masked_fill(remove.scatter(-1, sorted_indices, remove), -float("inf"))
    return torch.distributions.Categorical(logits=final_logits.to(torch.float32)).sample()


def _check(return_type, top_k, top_p, temperature, freq_penalty, max_new_tokens) -> None:
    if return_type == "embeds":
        raise ValueError("return_type='embeds' (generating from embeddings) is not supported by neox_lab's "
                         "HookedTransformer; pass token ids or text and return_type 'tokens' or 'str'")
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if not isinstance(freq_penalty, (int, float)) or freq_penalty < 0:
        raise ValueError(f"freq_penalty must be a number >= 0, got {freq_penalty!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


@torch.no_grad()
def generate(model, input: str | list[str] | torch.Tensor = "", max_new_tokens: int = 10, stop_at_eos: bool = True,
             eos_token_id: int | list[int] | None = None, do_sample: bool = True, top_k: int | None = None,
             top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
             use_past_kv_cache: bool = True, prepend_bos: bool | None = None, padding_side: str | None = None,
             return_type: str = "input", verbose: bool = True, **generation_kwargs) -> str | list[str] | torch.Tensor:
    """Sample `max_new_tokens` tokens after `input`, as TransformerLens' `HookedTransformer.generate`.

    input: a str, a list of str (a batch: left-padded, whatever `padding_side` says) or token ids
        ``[batch pos]``. Text is tokenized as `to_tokens(input, prepend_bos, padding_side)`; the
        attention mask is TransformerLens' (leading pad tokens masked on left padding).
    do_sample: True (default) samples (see the module docstring); False takes the argmax.
    stop_at_eos: a row that produced `eos_token_id` (default the tokenizer's; an int or a list) is
        finished and gets the eos token from then on; decoding stops when every row is finished.
    use_past_kv_cache: decode with a KV cache (same tokens, faster).
    return_type: "input" (str for text input, tokens for tokens), "str" (each row decoded without
        special tokens; a str for one row) or "tokens" (``[batch pos + new]``, the input included).
    verbose: a progress bar (tqdm).

    Sets the model to eval mode, as TransformerLens does. Hooks attached around the call fire on every
    step (neox_lab.model.generation says what they see).
    """
    if generation_kwargs:
        raise TypeError(f"generate got arguments neox_lab's HookedTransformer does not take: "
                        f"{sorted(generation_kwargs)} (TransformerLens' output_logits is not supported)")
    _check(return_type, top_k, top_p, temperature, freq_penalty, max_new_tokens)
    text = is_text(input)
    if not text and not torch.is_tensor(input):
        raise TypeError(f"generate takes a str, a list of str or token ids, got {type(input).__name__}")
    if torch.is_tensor(input) and input.is_floating_point():
        raise TypeError("generate from embeddings is not supported by neox_lab's HookedTransformer; pass token ids")
    if return_type == "input":
        return_type = "str" if text else "tokens"
    batched = isinstance(input, (list, tuple)) and len(input) > 1
    side = "left" if batched else model.resolve_padding_side(padding_side)
    bos = model.resolve_prepend_bos(prepend_bos)
    tokens = model.to_tokens(input, prepend_bos=bos, padding_side=side) if text else input
    if tokens.dim() == 1:
        tokens = tokens[None]
    tok = model.tokenizer
    mask = None
    if tok is not None:
        mask = attention_mask_for(tokens, tok.pad_token_id, tok.bos_token_id, bos, side)
    hf = model.hf()
    tokens, mask = prompt_inputs(hf, tokens, None, mask)

    eos, fill = [], 0
    if stop_at_eos:
        if eos_token_id is None:
            if tok is None or tok.eos_token_id is None:
                raise ValueError("stop_at_eos=True needs eos_token_id= or a tokenizer with an eos token")
            eos_token_id = tok.eos_token_id
        if isinstance(eos_token_id, int):
            eos, fill = [eos_token_id], eos_token_id
        else:
            eos = list(eos_token_id)
            fill = tok.eos_token_id if tok is not None and tok.eos_token_id is not None else eos[0]

    def choose(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        return sample_logits(logits, top_k=top_k, top_p=top_p, temperature=temperature,
                             freq_penalty=freq_penalty, tokens=ids).to(ids.device)

    model.eval()
    ids = generate_ids(hf, tokens, mask, total=total_length(tokens.shape[1], None, max_new_tokens), choose=choose,
                       eos=eos, fill=fill, use_cache=use_past_kv_cache, verbose=verbose)
    if return_type == "tokens":
        return ids
    if tok is None:
        raise ValueError("return_type='str' needs a tokenizer (model.tokenizer is None)")
    texts = [tok.decode(row, skip_special_tokens=True) for row in ids]
    return texts[0] if len(texts) == 1 else texts
