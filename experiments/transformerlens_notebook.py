"""A TransformerLens 3.x notebook, written the TransformerLens way, run unchanged on neox_lab.

    python experiments/transformerlens_notebook.py        # prints each cell's result

Induction heads, direct logit attribution, head ablation, the logit lens and activation patching, in
the lines a TransformerLens user writes (tests/test_tl_notebook.py runs it). What differs from the
TransformerLens original is only outside `notebook()`: the imports name neox_lab, and the model is a
random Pythia-shaped one (nothing can be downloaded here) where TransformerLens would say
``HookedTransformer.from_pretrained("pythia-14m")``. Lines that need weight views (`model.W_U`,
`W_Q`, `FactoredMatrix`, `to_single_token`, `process_weights`) belong to the second half of issue 13
and are left out for now; the direct-logit-attribution cell finds its answer tokens with `to_tokens`.

One call is written the way that works in both libraries rather than the shortest TransformerLens
way: ``model(tokens, return_type="logits")``. A bare ``model(tokens)`` returns transformers' output
object in neox_lab (README, "Coming from TransformerLens"); indexing it like a tensor raises.
"""

from __future__ import annotations

from functools import partial

import einops
import torch

from neox_lab import PRESETS, NeoXForCausalLM, NeoXTokenizer, get_act_name, patching


def build_model(seed: int = 0, n_layers: int = 4) -> NeoXForCausalLM:
    """A random Pythia-14m-shaped model with the GPT-NeoX tokenizer (TransformerLens: from_pretrained)."""
    torch.manual_seed(seed)
    model = NeoXForCausalLM(PRESETS["pythia-14m"].replace(num_hidden_layers=n_layers, initializer_range=0.1))
    model.tokenizer = NeoXTokenizer.default()
    return model.eval()


def notebook(model) -> dict:
    torch.set_grad_enabled(False)
    results = {}
    # --- cell 1: run the model, cache activations
    prompt = "When Mary and John went to the store, John gave a drink to"
    tokens = model.to_tokens(prompt)
    logits, cache = model.run_with_cache(tokens)
    loss = model(prompt, return_type="loss")
    str_tokens = model.to_str_tokens(prompt)
    assert len(str_tokens) == tokens.shape[-1] and logits.shape == (1, tokens.shape[-1], model.cfg.d_vocab)
    assert cache["pattern", 0].shape == (1, model.cfg.n_heads, tokens.shape[-1], tokens.shape[-1])
    results["loss"] = loss.item()

    # --- cell 2: induction heads
    seq_len, batch = 20, 4
    rand = torch.randint(1000, 10000, (batch, seq_len))
    rep_tokens = torch.cat([torch.full((batch, 1), model.tokenizer.bos_token_id), rand, rand], dim=1)
    induction_scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)

    def induction_score_hook(pattern, hook):
        stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len)
        induction_scores[hook.layer(), :] = einops.reduce(stripe, "batch head pos -> head", "mean")

    model.run_with_hooks(rep_tokens, return_type=None,
                         fwd_hooks=[(lambda name: name.endswith("pattern"), induction_score_hook)])
    top_layer, top_head = divmod(induction_scores.argmax().item(), model.cfg.n_heads)
    results["induction"] = (top_layer, top_head)

    # --- cell 3: direct logit attribution
    answer_tokens = torch.tensor([[model.to_tokens(" Mary", prepend_bos=False)[0, 0],
                                   model.to_tokens(" John", prepend_bos=False)[0, 0]]])
    residual_stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    layer_attrs = cache.logit_attrs(residual_stack, answer_tokens[:, 0], answer_tokens[:, 1], pos_slice=-1)
    per_head_residual = cache.stack_head_results(layer=-1, pos_slice=-1)
    head_attrs = cache.logit_attrs(per_head_residual, answer_tokens[:, 0], answer_tokens[:, 1], pos_slice=-1)
    head_attrs = einops.rearrange(head_attrs, "(layer head) batch -> layer head batch", layer=model.cfg.n_layers)
    assert layer_attrs.shape == (len(labels), 1) and head_attrs.shape[:2] == (model.cfg.n_layers, model.cfg.n_heads)
    results["dla_top"] = labels[layer_attrs[:, 0].abs().argmax()]

    # --- cell 4: head ablation
    def head_ablation_hook(z, hook, head_index):
        z[:, :, head_index, :] = 0.0
        return z

    clean_loss = model(rep_tokens, return_type="loss")
    ablated_loss = model.run_with_hooks(rep_tokens, return_type="loss", fwd_hooks=[
        (get_act_name("z", top_layer), partial(head_ablation_hook, head_index=top_head))])
    results["ablation"] = (ablated_loss - clean_loss).item()

    # --- cell 5: logit lens
    accumulated, labels = cache.accumulated_resid(layer=-1, apply_ln=True, pos_slice=-1, return_labels=True)
    lens_logits = model.unembed(accumulated)  # [component batch d_vocab]
    assert torch.allclose(lens_logits[-1], logits[:, -1], atol=1e-4)
    results["lens_top"] = [model.to_string(t) for t in lens_logits[:, 0].argmax(-1)]

    # --- cell 6: activation patching
    clean_tokens = model.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    corrupted_tokens = model.to_tokens(["When Mary and John went to the store, Mary gave a drink to"])
    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_logits = model(corrupted_tokens, return_type="logits")

    def logits_to_logit_diff(logits, answer_tokens=answer_tokens):
        final = logits[:, -1, :]
        return (final.gather(-1, answer_tokens[:, :1]) - final.gather(-1, answer_tokens[:, 1:])).mean()

    clean_baseline, corrupted_baseline = logits_to_logit_diff(clean_logits), logits_to_logit_diff(corrupted_logits)

    def ioi_metric(logits):
        return (logits_to_logit_diff(logits) - corrupted_baseline) / (clean_baseline - corrupted_baseline)

    resid_pre_results = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, ioi_metric)
    head_results = patching.get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, ioi_metric)
    every_block = patching.get_act_patch_block_every(model, corrupted_tokens, clean_cache, ioi_metric)
    assert resid_pre_results.shape == (model.cfg.n_layers, clean_tokens.shape[1])
    assert head_results.shape == (model.cfg.n_layers, clean_tokens.shape[1], model.cfg.n_heads)
    assert every_block.shape == (3, model.cfg.n_layers, clean_tokens.shape[1])

    def patch_residual_component(corrupted_residual_component, hook, pos, clean_cache):
        corrupted_residual_component[:, pos, :] = clean_cache[hook.name][:, pos, :]
        return corrupted_residual_component

    hook_fn = partial(patch_residual_component, pos=10, clean_cache=clean_cache)  # " John" vs " Mary"
    patched_logits = model.run_with_hooks(corrupted_tokens, return_type="logits",
                                          fwd_hooks=[(get_act_name("resid_pre", 1), hook_fn)])
    assert torch.allclose(ioi_metric(patched_logits), resid_pre_results[1, 10], atol=1e-4)
    results["patching"] = resid_pre_results
    return results


def main() -> int:
    results = notebook(build_model())
    for key, value in results.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
