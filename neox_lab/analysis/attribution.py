"""Attribution patching: the first-order (gradient) approximation of activation patching.

Patching cell c changes the metric by about ``(clean_act - corrupted_act)[c] . d metric / d act[c]``,
the gradient taken on the corrupted run. One clean forward (to cache activations), one corrupted
forward and one backward give every cell of every layer at once. The approximation is exact where the
metric is linear in the patched activation and degrades as patches move the run into non-linear regimes
(LayerNorm scales, softmax saturation, large clean/corrupted differences).
"""

from __future__ import annotations

import torch

from .patching import Metric, PatchResult, _inputs, _labels, _plan, _record


def attribution_patch(model, clean_tokens, corrupted_tokens, metric: Metric, target: str = "resid_pre", *,
                      attention_mask=None, clean_attention_mask=None, corrupted_attention_mask=None,
                      layers=None, positions=None, heads=None) -> PatchResult:
    """Estimate `activation_patch`'s grid (same arguments, targets and output shapes) from gradients.

    `metric` must return a scalar or a [batch] tensor (rows never interact, so one backward of the sum
    gives each row its own gradient). Parameter gradients are neither needed nor touched: only the
    activations' gradients are taken, so frozen models work and `.grad` fields stay as they were.
    """
    clean, corrupted, clean_mask, corrupted_mask = _inputs(
        model, clean_tokens, corrupted_tokens, attention_mask, clean_attention_mask, corrupted_attention_mask)
    plan = _plan(model, target, clean.shape[1], layers, positions, heads)
    clean_logits, clean_acts = _record(model, clean, clean_mask, plan.names)
    acts: dict[str, torch.Tensor] = {}

    def grad_from_here(x: torch.Tensor, *, hook) -> torch.Tensor:
        # A frozen model builds no graph; start one at the embeddings.
        return x if x.requires_grad else x.detach().requires_grad_()

    def keep(x: torch.Tensor, *, hook) -> None:
        acts[hook.name] = x

    with torch.enable_grad():
        hooks = [("hook_embed", grad_from_here)] + [(n, keep) for n in plan.names]
        out = model.run_with_hooks(corrupted, attention_mask=corrupted_mask, fwd_hooks=hooks)
        value = metric(out.logits)
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            raise ValueError("attribution_patch needs a metric returning a tensor differentiable in the "
                             f"logits; got {type(value).__name__} (requires_grad=False or not a tensor)")
        batch = corrupted.shape[0]
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise ValueError("attribution_patch needs a metric returning a scalar or "
                             f"[batch]={batch} values, got {tuple(value.shape)}")
        grads = torch.autograd.grad(value.sum(), [acts[n] for n in plan.names], allow_unused=True)

    per_layer = []
    for name, grad in zip(plan.names, grads, strict=True):
        corrupted_act = acts[name].detach().float()
        grad = torch.zeros_like(corrupted_act) if grad is None else grad.float()
        contrib = (clean_acts[name].float() - corrupted_act) * grad
        keep_axes = [0] + [plan.hook_axes[a] for a in plan.cell_axes]
        summed = contrib.sum(dim=[d for d in range(contrib.dim()) if d not in keep_axes])
        # `summed` keeps its axes in tensor order; put them in (batch, *cell axes) order.
        summed = summed.permute([sorted(keep_axes).index(a) for a in keep_axes])
        for k, chosen in enumerate(plan.choices):
            summed = summed.index_select(k + 1, torch.tensor(chosen, device=summed.device))
        per_layer.append(summed.sum(0) if value.dim() == 0 else summed.movedim(0, -1))

    with torch.no_grad():
        clean_value = torch.as_tensor(metric(clean_logits))
    return PatchResult(values=torch.stack(per_layer).detach().cpu(), target=target,
                       axes=("layer", *plan.cell_axes), clean_value=clean_value.detach().float().cpu(),
                       corrupted_value=value.detach().float().cpu(), method="attribution", **_labels(plan))


__all__ = ["attribution_patch"]
