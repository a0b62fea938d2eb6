"""The TransformerLens convention: `HookedTransformer`, a view of the core's `NeoXForCausalLM`.

    hooked_transformer  `HookedTransformer`: TransformerLens 3.x's forward, run_with_cache, loading
                        (processed weights by default) and text conveniences over the shared modules
    config              `LensConfig`: TransformerLens' config fields, read live from the model
    text                to_tokens / to_str_tokens / to_string with `cfg.default_prepend_bos`
    token_lookup        to_single_token, to_single_str_token, get_token_position
    weights             the model-wide weight stacks (W_Q [n_layers ...], W_U, QK, OV)
    processing          TransformerLens' weight processing (fold_ln, centring, fold_value_biases)
    generation, loss    TransformerLens' generate and next-token loss

Builds on `neox_lab.model` (the core and its transformers convention) and the foundations; nothing in
model/ imports it, and the tools (analysis, store, testing) run either class through its `hf()` view.
"""
