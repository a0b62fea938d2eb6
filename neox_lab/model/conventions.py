"""Where the transformers-convention classes send a TransformerLens call: the names that belong to
`neox_lab.HookedTransformer` (neox_lab/lens/), and the error that says so.

`NeoXForCausalLM` and its siblings answer transformers' calls. A TransformerLens name used on them would
mean something else there (`model(tokens)[0]` is transformers' first output field, not batch row 0) or
does not exist there; each raises with the fix instead of answering in the wrong convention.
"""

from __future__ import annotations

#: TransformerLens attributes that live on `HookedTransformer` only.
LENS_ATTRIBUTES = frozenset({
    "to_tokens", "to_tokens_and_mask", "to_str_tokens", "to_string", "to_single_token", "to_single_str_token",
    "get_token_position", "tokens_to_residual_directions", "loss_fn", "process_weights_",
    "from_pretrained_no_processing", "set_tokenizer", "all_head_labels",
    "W_E", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in",
    "b_out", "QK", "OV", "W_pos", "W_E_pos",
})

#: Arguments of TransformerLens' forward (and its text input) that the transformers forward refuses.
LENS_FORWARD_ARGS = ("return_type", "loss_per_token", "prepend_bos", "padding_side", "input", "tokens",
                     "shortformer_pos_embed", "past_kv_cache")

#: Arguments of TransformerLens' generate that transformers' generate refuses.
LENS_GENERATE_ARGS = ("return_type", "verbose", "input", "stop_at_eos", "prepend_bos", "padding_side",
                      "use_past_kv_cache", "freq_penalty")

#: Weight-processing arguments: TransformerLens' from_pretrained applies them, transformers' has none.
PROCESSING_ARGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                   "refactor_factored_attn_matrices")


def use_hooked(cls_name: str, what: str) -> str:
    """The message for a TransformerLens call on a transformers-convention class: where it lives."""
    return (f"{what} is TransformerLens' calling convention, which {cls_name} (transformers' convention) does "
            "not answer; use the TransformerLens-convention view of the same model: `from neox_lab import "
            "HookedTransformer; hooked = HookedTransformer(model)` (shares every parameter and hook, copies "
            "nothing), or load with `HookedTransformer.from_pretrained(...)`")
