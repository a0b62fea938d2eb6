"""The NeoX itself, in the order a forward pass meets it, and its transformers convention.

    rotary        rotary position tables and the rotation (rotate-half, partial, scaled)
    kernels       attention masks, the "eager" and "sdpa" kernels, and the backend choice (a *backend*
                  is what the user picks, "auto" / "eager" / "sdpa" / "flash"; a *kernel* is what ran)
    flash         the "flash" backend's kernels: flash-attn, else torch's fused CUDA kernels
    attention     fused QKV, rotary, a kernel, per-head hook points
    mlp, layernorm, block
    base          `NeoXPreTrained` (what every model class shares) and the bare `NeoXModel`
    tasks         the task models in transformers' convention: causal LM, sequence / token
                  classification, question answering (`model(input_ids=...)` -> an output object)
    weights       per-module views in TransformerLens' layout (attn.W_Q, W_O, QK, OV, mlp.W_in), which
                  attention reads and both conventions share
    conventions   the TransformerLens names these classes refuse, pointing at `HookedTransformer`
    padding       the left-padding warning
    kv_cache, outputs, loading (checkpoints in and out),
    placement (device_map: blocks over GPUs, CPU RAM and disk with accelerate),
    generation (transformers' generate and the decoding loop), fast_decode (CUDA-graph decoding)

Builds on `neox_lab.hooks`, `config`, `axes`, `dtypes`, `factored_matrix` and `tokenizer` only. The
TransformerLens convention (`HookedTransformer`, neox_lab/lens/) is a view of these modules one layer
up; analysis, the activation store, the demo, testing and the CLI build on both.
"""
