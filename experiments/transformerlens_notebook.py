"""A TransformerLens 3.x notebook, written the TransformerLens way, run on neox_lab with one import changed.

    python experiments/transformerlens_notebook.py        # prints each cell's result

The lines a TransformerLens user writes for an IOI-style analysis: `logits = model(tokens)`,
`model(tokens)[0][-1].argmax()`, to_tokens (no BOS: a GPT-NeoX checkpoint's default), generate, induction
heads, direct logit attribution (layers and heads), the logit lens, head ablation, activation patching
(TransformerLens' `patching` functions and a hand-written hook), attribution patching with backward hooks,
neuron attribution, weights and circuits, the attention pattern a circuitsvis view is drawn from.

`notebook(model)` is the notebook; every cell leaves its result in the returned dict. Its only neox_lab
line is the import below: under TransformerLens the notebook reads ``from transformer_lens import
HookedTransformer, ActivationCache, patching`` and ``from transformer_lens.utils import get_act_name``
(the cross-check, tests/test_transformer_lens_crosscheck.py, runs it so on TransformerLens' own model and
compares every cell; tests/test_tl_notebook.py runs it on neox_lab alone). The model is the checkpoint
shipped with neox_lab (a GPT-NeoX trained on Python code, with induction heads), loaded as
TransformerLens loads a GPT-NeoX checkpoint: ``HookedTransformer.from_pretrained(...)``, weights processed.
"""

from __future__ import annotations

from functools import partial

import einops
import torch

from neox_lab import ActivationCache, HookedTransformer, get_act_name, patching

CLEAN = "def area(width, height):\n    return width *"
CORRUPTED = "def area(height, width):\n    return width *"
ANSWERS = (" height", " width")  # (correct, incorrect) next token of the clean prompt

#: Cells whose backward hooks sit on `attn.hook_k` / `attn.hook_v` alone (no other hook in that layer).
BACKWARD_ALONE = ("backward_hook_k_alone", "backward_hook_v_alone")


def build_model() -> HookedTransformer:
    """The shipped model, as TransformerLens' from_pretrained would load it (processed weights, float32)."""
    return HookedTransformer.from_pretrained("neox-lab/default")


def notebook(model, *, patching=patching, get_act_name=get_act_name, ActivationCache=ActivationCache) -> dict:
    """Run every cell on `model`; the keyword arguments are where TransformerLens' own tools go in."""
    torch.set_grad_enabled(False)
    out = {}

    # --- the model and its config
    out["cfg"] = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head, model.cfg.d_mlp,
                  model.cfg.d_vocab, model.cfg.d_vocab_out, model.cfg.n_ctx, model.cfg.act_fn,
                  model.cfg.default_prepend_bos, model.cfg.normalization_type, model.cfg.positional_embedding_type,
                  model.cfg.original_architecture, model.cfg.parallel_attn_mlp, model.cfg.rotary_dim,
                  model.cfg.n_params, str(model.cfg.device))

    # --- tokens and logits
    tokens = model.to_tokens(CLEAN)
    out["tokens"] = tokens
    out["str_tokens"] = model.to_str_tokens(CLEAN)
    out["str_tokens_bos"] = model.to_str_tokens(CLEAN, prepend_bos=True)
    logits = model(tokens)
    out["logits"] = logits
    next_token = model(tokens)[0][-1].argmax()
    out["next_token"] = next_token.item()
    out["next_token_str"] = model.to_string(next_token)
    out["loss"] = model(tokens, return_type="loss")
    out["loss_per_token"] = model(tokens, return_type="loss", loss_per_token=True)
    prompts = [CLEAN, "import numpy as np\nimport"]
    out["batch_tokens"] = model.to_tokens(prompts)
    out["batch_logits"] = model(prompts)
    out["batch_loss"] = model(prompts, return_type="loss")
    out["left_padded_logits"] = model(prompts, padding_side="left")
    out["single_token"] = model.to_single_token(ANSWERS[0])
    out["token_position"] = model.get_token_position(" width", CLEAN, mode="last")

    # --- caching activations
    logits, cache = model.run_with_cache(tokens)
    out["cache_logits"] = logits
    out["cache_keys"] = sorted(cache.keys())
    out["resid_post_1"] = cache["resid_post", 1]
    out["pattern_1"] = cache["pattern", 1]
    out["scale_final"] = cache["scale"]
    out["q_0"] = cache[get_act_name("q", 0)]
    out["rot_k_0"] = cache["blocks.0.attn.hook_rot_k"]
    out["normalized_ln2_2"] = cache["normalized", 2, "ln2"]
    _, last = model.run_with_cache(tokens, pos_slice=-1)
    out["pos_slice_int_shape"] = tuple(last["resid_post", 0].shape)
    out["stop_at_layer"] = model(tokens, stop_at_layer=-1)
    stream, early = model.run_with_cache(tokens, stop_at_layer=2)
    out["run_with_cache_stop_at_layer"] = stream
    out["stopped_cache_keys"] = sorted(early.keys())

    # --- generation
    out["generate_greedy"] = model.generate("import numpy as", max_new_tokens=10, do_sample=False, verbose=False)
    torch.manual_seed(0)
    out["generate_sampled"] = model.generate("import numpy as", max_new_tokens=10, verbose=False)
    out["generate_tokens"] = model.generate(tokens, max_new_tokens=5, do_sample=False, verbose=False)

    # --- induction heads
    seq_len, batch = 20, 4
    gen = torch.Generator().manual_seed(0)
    rand = torch.randint(1000, 10000, (batch, seq_len), generator=gen)
    rep_tokens = torch.cat([torch.full((batch, 1), model.tokenizer.bos_token_id), rand, rand], dim=1)
    induction_scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)

    def induction_score_hook(pattern, hook):
        stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len)
        induction_scores[hook.layer(), :] = einops.reduce(stripe, "batch head pos -> head", "mean")

    model.run_with_hooks(rep_tokens, return_type=None,
                         fwd_hooks=[(lambda name: name.endswith("pattern"), induction_score_hook)])
    out["induction_scores"] = induction_scores
    top_layer, top_head = divmod(induction_scores.argmax().item(), model.cfg.n_heads)
    out["induction_top"] = (top_layer, top_head)
    out["rep_loss"] = model(rep_tokens, return_type="loss", loss_per_token=True)[:, seq_len:].mean()

    # --- direct logit attribution
    answer_tokens = torch.tensor([[model.to_single_token(ANSWERS[0]), model.to_single_token(ANSWERS[1])]])
    answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)  # [batch 2 d_model]
    logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]
    final_residual_stream = cache["resid_post", -1]
    scaled_final = cache.apply_ln_to_stack(final_residual_stream[:, -1, :], layer=-1, pos_slice=-1)
    out["logit_diff_from_stream"] = einops.einsum(scaled_final, logit_diff_directions, "batch d, batch d -> batch")
    out["logit_diff"] = logits[:, -1, answer_tokens[0, 0]] - logits[:, -1, answer_tokens[0, 1]]
    residual_stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    out["decompose_labels"] = labels
    scaled_stack = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
    out["dla_components"] = einops.einsum(scaled_stack, logit_diff_directions, "c batch d, batch d -> c batch")
    accumulated, acc_labels = cache.accumulated_resid(layer=-1, incl_mid=False, pos_slice=-1, return_labels=True)
    out["accumulated_labels"] = acc_labels
    out["dla_accumulated"] = einops.einsum(cache.apply_ln_to_stack(accumulated, layer=-1, pos_slice=-1),
                                           logit_diff_directions, "c batch d, batch d -> c batch")
    per_head_residual, head_labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    out["head_labels"] = head_labels
    per_head = einops.einsum(cache.apply_ln_to_stack(per_head_residual, layer=-1, pos_slice=-1),
                             logit_diff_directions, "c batch d, batch d -> c batch")
    out["dla_heads"] = einops.rearrange(per_head, "(layer head) batch -> layer head batch", layer=model.cfg.n_layers)
    out["logit_attrs"] = cache.logit_attrs(residual_stack, answer_tokens[:, 0], answer_tokens[:, 1], pos_slice=-1)

    # --- the logit lens
    lens_logits = model.unembed(cache.accumulated_resid(layer=-1, apply_ln=True, pos_slice=-1))
    out["logit_lens"] = lens_logits
    out["logit_lens_top"] = [model.to_string(t) for t in lens_logits[:, 0].argmax(-1)]

    # --- head ablation
    def head_ablation_hook(z, hook, head_index):
        z[:, :, head_index, :] = 0.0
        return z

    clean_loss = model(rep_tokens, return_type="loss")
    ablated_loss = model.run_with_hooks(rep_tokens, return_type="loss", fwd_hooks=[
        (get_act_name("z", top_layer), partial(head_ablation_hook, head_index=top_head))])
    out["ablation_loss_increase"] = ablated_loss - clean_loss

    def mean_ablate_mlp(post, hook):
        return post.mean(dim=1, keepdim=True).expand_as(post)

    out["mlp_mean_ablation_logits"] = model.run_with_hooks(tokens, fwd_hooks=[(get_act_name("post", 1),
                                                                               mean_ablate_mlp)])

    # --- activation patching
    clean_tokens, corrupted_tokens = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_logits = model(corrupted_tokens)

    def logits_to_logit_diff(logits, answer_tokens=answer_tokens):
        final = logits[:, -1, :]
        return (final.gather(-1, answer_tokens[:, :1]) - final.gather(-1, answer_tokens[:, 1:])).mean()

    clean_baseline, corrupted_baseline = logits_to_logit_diff(clean_logits), logits_to_logit_diff(corrupted_logits)
    out["baselines"] = torch.stack([clean_baseline, corrupted_baseline])

    def patching_metric(logits):
        return (logits_to_logit_diff(logits) - corrupted_baseline) / (clean_baseline - corrupted_baseline)

    out["patch_resid_pre"] = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, patching_metric)
    out["patch_attn_out"] = patching.get_act_patch_attn_out(model, corrupted_tokens, clean_cache, patching_metric)
    out["patch_heads_by_pos"] = patching.get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache,
                                                                            patching_metric)
    out["patch_heads_all_pos"] = patching.get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache,
                                                                              patching_metric)
    out["patch_block_every"] = patching.get_act_patch_block_every(model, corrupted_tokens, clean_cache,
                                                                  patching_metric)

    def patch_residual_component(corrupted_residual_component, hook, pos, clean_cache):
        corrupted_residual_component[:, pos, :] = clean_cache[hook.name][:, pos, :]
        return corrupted_residual_component

    position = 3  # where the two prompts differ ("width" / "height")
    hook_fn = partial(patch_residual_component, pos=position, clean_cache=clean_cache)
    patched_logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(get_act_name("resid_pre", 1), hook_fn)])
    out["patch_by_hand"] = patching_metric(patched_logits)

    # --- attribution patching: activations and their gradients from hooks
    def get_cache_fwd_and_bwd(model, tokens, metric, names_filter):
        model.reset_hooks()
        fwd_cache, grad_cache = {}, {}

        def forward_cache_hook(act, hook):
            fwd_cache[hook.name] = act.detach()

        def backward_cache_hook(act, hook):
            grad_cache[hook.name] = act.detach()

        model.add_hook(names_filter, forward_cache_hook, "fwd")
        model.add_hook(names_filter, backward_cache_hook, "bwd")
        torch.set_grad_enabled(True)
        value = metric(model(tokens))
        value.backward()
        torch.set_grad_enabled(False)
        model.reset_hooks()
        return value.item(), ActivationCache(fwd_cache, model), ActivationCache(grad_cache, model)

    def wanted(name):
        return name.endswith(("resid_pre", "attn_out", "mlp_out", "hook_z", "hook_q", "hook_k", "hook_v",
                              "hook_pattern", "hook_post"))

    clean_value, clean_fwd, clean_grad = get_cache_fwd_and_bwd(model, clean_tokens, patching_metric, wanted)
    corrupted_value, corrupted_fwd, corrupted_grad = get_cache_fwd_and_bwd(model, corrupted_tokens,
                                                                         patching_metric, wanted)
    out["attribution_values"] = (clean_value, corrupted_value)
    resid_names = [get_act_name("resid_pre", layer) for layer in range(model.cfg.n_layers)]
    out["attr_resid_pre"] = torch.stack([
        ((clean_fwd[n] - corrupted_fwd[n]) * corrupted_grad[n]).sum(-1)[0] for n in resid_names])
    for stream in ("z", "q", "k", "v"):
        out[f"attr_{stream}"] = torch.stack([
            ((clean_fwd[stream, layer] - corrupted_fwd[stream, layer]) * corrupted_grad[stream, layer]).sum((0, 1, 3))
            for layer in range(model.cfg.n_layers)])
    out["attr_pattern"] = torch.stack([
        ((clean_fwd["pattern", layer] - corrupted_fwd["pattern", layer]) * corrupted_grad["pattern", layer])
        .sum((0, 2, 3)) for layer in range(model.cfg.n_layers)])
    out["grad_keys"] = sorted(clean_grad.keys())

    # Backward hooks on one stream alone (no other hook point of the layer hooked)
    grads = {}

    def grad_hook(grad, hook):
        grads[hook.name] = grad.detach()

    for stream in ("k", "v"):
        torch.set_grad_enabled(True)
        value = patching_metric(model.run_with_hooks(corrupted_tokens, bwd_hooks=[(get_act_name(stream, 1), grad_hook)],
                                                     reset_hooks_end=False))
        value.backward()
        torch.set_grad_enabled(False)
        model.reset_hooks()
        out[f"backward_hook_{stream}_alone"] = grads.get(get_act_name(stream, 1))

    # --- neuron attribution: each final-layer neuron's direct effect on the logit difference
    layer = model.cfg.n_layers - 1
    neuron_acts = cache["post", layer][0, -1]  # [d_mlp]
    scale = cache["scale"][0, -1]
    neuron_attribution = neuron_acts * (model.W_out[layer] @ logit_diff_directions[0]) / scale
    out["neuron_attribution"] = neuron_attribution
    out["top_neurons"] = neuron_attribution.abs().topk(5).indices
    out["neuron_results"] = cache.get_neuron_results(layer, pos_slice=-1)

    # --- weights and circuits
    out["W_E_norm"] = model.W_E.norm()
    out["W_U"] = model.W_U
    out["b_U"] = model.b_U
    out["W_Q_1"] = model.W_Q[1]
    out["OV_norms"] = model.OV.norm()
    out["OV_singular_values"] = model.OV[1, 2].S
    out["QK_layer_1_head_0_eigenvalues"] = model.QK[1, 0].eigenvalues.abs().sort(descending=True).values
    out["head_labels_all"] = model.all_head_labels()

    # --- the attention view (what circuitsvis.attention.attention_heads draws)
    attention_pattern = cache["pattern", 1][0]  # [head query_pos key_pos]
    out["attention_view"] = (attention_pattern, model.to_str_tokens(tokens[0]))
    return out


def main() -> int:
    for key, value in notebook(build_model()).items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
