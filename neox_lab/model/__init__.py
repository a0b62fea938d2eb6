"""The NeoX itself, in the order a forward pass meets it.

    rotary        rotary position tables and the rotation (rotate-half, partial, scaled)
    kernels       attention masks, the "eager" and "sdpa" kernels, and the backend choice (a *backend*
                  is what the user picks, "auto" / "eager" / "sdpa" / "flash"; a *kernel* is what ran)
    flash         the "flash" backend's kernels: flash-attn, else torch's fused CUDA kernels
    attention     fused QKV, rotary, a kernel, per-head hook points
    mlp, layernorm, block
    base          `NeoXPreTrained` (what every model class shares) and the bare `NeoXModel`
    tasks         the task models: causal LM, sequence / token classification, question answering
    weights       TransformerLens' weight names and layout (W_Q, W_O, W_U, QK, OV...) as views
    factored_matrix  `FactoredMatrix`, the lazy A @ B that QK and OV circuits are
    processing    TransformerLens' weight processing (fold_ln, centring, fold_value_biases)
    token_lookup  to_single_token, get_token_position
    kv_cache, outputs, text (to_tokens / to_string), loading (checkpoints in and out),
    placement (device_map: blocks over GPUs, CPU RAM and disk with accelerate),
    generation, fast_decode (CUDA-graph decoding)

Builds on `neox_lab.hooks`, `config`, `axes` and `tokenizer` only; analysis, the activation store,
the demo, testing and the CLI build on it.
"""
