"""Interpretability tools that work on any hooked neox_lab model through its public methods.

    interventions  ready-made hook functions: ablate, patch, steer, clamp, record
    patching       activation patching and its gradient approximation, attribution patching
    metrics        what a patched run is scored by: logit difference, probability, loss, KL
    induction      repeated random tokens, induction scores, loss per copy
    logit_lens     the residual stream read through the final LayerNorm and unembedding
    plotting       matplotlib figures of patterns, patching grids, the logit lens, induction scores

Imports the hook contract (`neox_lab.hooks`) and the foundations, never the model's internals
nor the activation store.
"""
