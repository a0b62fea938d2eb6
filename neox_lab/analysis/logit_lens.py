"""The logit lens: read the residual stream after every layer through the final LayerNorm and unembedding.

Row 0 is the embedding (`blocks.0.hook_resid_pre`), row l the stream after blocks 0..l-1, and the last
row the final stream (`blocks.{L-1}.hook_resid_post`), whose lens is exactly the model's own logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hooks.registry import block_hook

__all__ = ["LogitLens", "logit_lens"]


@dataclass
class LogitLens:
    """`top_ids` / `top_probs`: [layer batch pos] top-1 prediction and its probability at each depth;
    `target_probs` [layer batch pos] the probability of the actual next token (nan at the last
    position, which has none) ; `labels` name the rows."""

    top_ids: torch.Tensor
    top_probs: torch.Tensor
    target_probs: torch.Tensor
    labels: list[str]


def lens_names(n_layers: int) -> list[str]:
    """The residual-stream hooks the lens reads, shallowest first."""
    pre = [block_hook(layer, "hook_resid_pre") for layer in range(n_layers)]
    return pre + [block_hook(n_layers - 1, "hook_resid_post")]


@torch.no_grad()
def logit_lens(model, tokens: torch.Tensor) -> LogitLens:
    """Logit lens of a causal LM (`NeoXForCausalLM` or `HookedTransformer`) on tokens [batch pos]."""
    model = model.hf()  # either convention's class: run through the transformers view, same modules
    n_layers = model.cfg.num_hidden_layers
    names = lens_names(n_layers)
    device = model.input_device
    tokens = tokens.to(device)
    _, cache = model.run_with_cache(tokens, names_filter=names)
    top_ids, top_probs, target_probs = [], [], []
    for name in names:  # one depth at a time: [batch pos vocab] probabilities are large
        probs = model.unembed(model.body.ln_final(cache[name])).float().softmax(-1)
        p, i = probs.max(-1)
        top_ids.append(i.cpu())
        top_probs.append(p.cpu())
        nxt = torch.full(tokens.shape, float("nan"))
        nxt[:, :-1] = probs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0].cpu()
        target_probs.append(nxt)
    labels = ["embed"] + [f"after L{layer}" for layer in range(n_layers)]
    return LogitLens(torch.stack(top_ids), torch.stack(top_probs), torch.stack(target_probs), labels)
