"""Activation patching: put clean activations into a corrupted run, one cell at a time.

    from neox_lab import patching
    metric = patching.logit_diff(correct=mary_id, incorrect=john_id)
    res = patching.activation_patch(model, clean, corrupted, metric, target="resid_pre")
    patching_heatmap(patching.normalize(res).values, row_labels=res.row_labels,
                     col_labels=res.col_labels, xlabel="position", ylabel="layer")

A *cell* is one (layer, position), (layer, head) or (layer, position, head) of a target stream; its
value is ``metric(logits)`` of the corrupted run with the clean activation patched into that cell
(for every batch row at once). Batched patching (the default) stacks many cells' corrupted runs on
the batch axis, so one forward evaluates up to ``batch_size // batch`` cells; ``batched=False`` runs
the plain one-forward-per-cell loop built on `interventions.patch_from_cache`.

`attribution_patch` gives the first-order (gradient) approximation of the same grid: patching cell c
changes the metric by about ``(clean_act - corrupted_act)[c] . d metric / d act[c]``, the gradient
taken on the corrupted run. One clean forward (to cache activations), one corrupted forward and one
backward give every cell of every layer at once. The approximation is exact where the metric is
linear in the patched activation and degrades as patches move the run into non-linear regimes
(LayerNorm scales, softmax saturation, large clean/corrupted differences).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..axes import POSITIONS, find_axis
from ..dtypes import widen
from ..hooks.registry import block_hook
from . import interventions
from .metrics import kl_to_clean, logit_diff, loss, prob

#: target -> (hook name relative to the block, cell axes after the layer axis).
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "resid_pre": ("hook_resid_pre", ("pos",)),
    "resid_mid": ("hook_resid_mid", ("pos",)),
    "resid_post": ("hook_resid_post", ("pos",)),
    "attn_out": ("hook_attn_out", ("pos",)),
    "mlp_out": ("hook_mlp_out", ("pos",)),
    "z": ("attn.hook_z", ("head",)),
    "z_pos": ("attn.hook_z", ("pos", "head")),  # [layer pos head], TransformerLens' order
    "q": ("attn.hook_q", ("head",)),
    "k": ("attn.hook_k", ("head",)),
    "v": ("attn.hook_v", ("head",)),
    "pattern": ("attn.hook_pattern", ("head",)),
}
#: cell axis -> the names it has in hook shape strings.
AXIS_NAMES = {"head": "n_heads", "pos": POSITIONS}

Metric = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PatchResult:
    """A patching grid. `values` is [layer, *cell axes, *metric shape] (metric shape is () for scalar
    metrics, [batch] for per-row ones); `axes` names the cell axes in order, e.g. ("layer", "pos") or
    ("layer", "pos", "head") (TransformerLens' order), and `row_labels` / `col_labels` /
    `depth_labels` label them (`labels` maps each axis name to its labels). An int `positions=` /
    `heads=` drops that axis, as an int index does in TransformerLens."""

    values: torch.Tensor
    target: str
    axes: tuple[str, ...]
    row_labels: list[str]
    col_labels: list[str]
    depth_labels: list[str] | None = None
    clean_value: torch.Tensor | None = None
    corrupted_value: torch.Tensor | None = None
    method: str = "activation"

    @property
    def labels(self) -> dict[str, list[str]]:
        """Each cell axis's labels by its name, e.g. ``{"layer": [...], "pos": [...], "head": [...]}``."""
        per_axis = [self.row_labels, self.col_labels, self.depth_labels]
        return {axis: labels for axis, labels in zip(self.axes, per_axis, strict=False)}


def normalize(result, clean_value=None, corrupted_value=None):
    """``(v - corrupted) / (clean - corrupted)``: 1 where a patch restores the clean metric, 0 where it does
    nothing. Takes a PatchResult (baselines default to its own) or a tensor; returns the same kind."""
    values = result.values if isinstance(result, PatchResult) else torch.as_tensor(result)
    clean = result.clean_value if clean_value is None and isinstance(result, PatchResult) else clean_value
    corrupted = (result.corrupted_value if corrupted_value is None and isinstance(result, PatchResult)
                 else corrupted_value)
    if clean is None or corrupted is None:
        raise ValueError("normalize needs clean_value and corrupted_value")
    clean, corrupted = torch.as_tensor(clean), torch.as_tensor(corrupted)
    out = (values - corrupted) / (clean - corrupted)
    return dataclasses.replace(result, values=out) if isinstance(result, PatchResult) else out


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class _Plan:
    target: str
    names: list[str]               # hook name per selected layer
    layers: list[int]
    cell_axes: tuple[str, ...]     # after the layer axis
    choices: list[list[int]]       # selected indices per cell axis
    hook_axes: dict[str, int]      # cell axis -> axis in the hook's tensor
    dropped: tuple[str, ...] = ()  # cell axes selected by an int: left out of the result

    @property
    def result_axes(self) -> tuple[str, ...]:
        return ("layer", *(a for a in self.cell_axes if a not in self.dropped))

    def squeeze(self, values: torch.Tensor) -> torch.Tensor:
        """[layer, *cell axes, ...] -> the int-selected cell axes (length 1) removed."""
        for k in reversed(range(len(self.cell_axes))):
            if self.cell_axes[k] in self.dropped:
                values = values.select(k + 1, 0)
        return values

    def cells(self):
        """(layer index into `layers`, index values per cell axis) for every cell, row-major."""
        return itertools.product(range(len(self.layers)), *self.choices)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return (len(self.layers), *(len(c) for c in self.choices))


def _as_batch(tokens: torch.Tensor, what: str) -> torch.Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2:
        raise ValueError(f"{what} must be token ids [batch pos], got {tuple(tokens.shape)}")
    return tokens


def _select(sel, size: int, what: str) -> list[int]:
    if sel is None:
        return list(range(size))
    out = []
    for i in ([sel] if isinstance(sel, int) else list(sel)):
        if not -size <= int(i) < size:
            raise IndexError(f"{what} {int(i)} out of range for {size} {what}s")
        out.append(int(i) % size)
    return out


def _plan(model, target: str, seq_len: int, layers, positions, heads) -> _Plan:
    if target not in TARGETS:
        raise ValueError(f"unknown patching target {target!r}; choose one of {sorted(TARGETS)}")
    if target == "resid_mid" and model.cfg.use_parallel_residual:
        raise ValueError("target 'resid_mid' does not exist in this model: it uses the parallel residual "
                         "(resid_post = resid_pre + attn_out + mlp_out), so attention and MLP both read "
                         "resid_pre; patch 'resid_pre', 'attn_out' or 'mlp_out' instead")
    hook, cell_axes = TARGETS[target]
    layers = _select(layers, model.cfg.num_hidden_layers, "layer")
    names = [block_hook(layer, hook) for layer in layers]
    hp = model.hook_dict[names[0]]
    hook_axes = {}
    for axis in cell_axes:
        found = find_axis(hp.shape, AXIS_NAMES[axis])
        if found is None:
            raise ValueError(f"hook {hp.name!r} [{hp.shape}] has no {axis} axis")
        hook_axes[axis] = found
    sizes = {"pos": seq_len, "head": model.cfg.num_attention_heads}
    picks = {"pos": positions, "head": heads}
    for axis, what in (("pos", "positions"), ("head", "heads")):
        if picks[axis] is not None and axis not in cell_axes:
            raise ValueError(f"{what}= was given, but target {target!r} has no {axis} axis (its cells are "
                             f"layer x {' x '.join(cell_axes)}); 'z_pos' is per head and position")
    if model.training:
        warnings.warn("the model is in training mode, so dropout makes patched runs noisy; call model.eval()",
                      stacklevel=3)
    choices = [_select(picks[a], sizes[a], {"pos": "position", "head": "head"}[a]) for a in cell_axes]
    dropped = tuple(a for a in cell_axes if isinstance(picks[a], int))
    return _Plan(target, names, layers, cell_axes, choices, hook_axes, dropped)


def _labels(plan: _Plan) -> dict:
    labels = [[str(layer) for layer in plan.layers]]
    labels += [[str(i) for i in c] for a, c in zip(plan.cell_axes, plan.choices, strict=True)
               if a not in plan.dropped]
    return dict(row_labels=labels[0], col_labels=labels[1] if len(labels) > 1 else [],
                depth_labels=labels[2] if len(labels) > 2 else None)


def _inputs(model, clean_tokens, corrupted_tokens, attention_mask, clean_attention_mask,
            corrupted_attention_mask):
    device = model.input_device
    clean = _as_batch(clean_tokens, "clean_tokens").to(device)
    corrupted = _as_batch(corrupted_tokens, "corrupted_tokens").to(device)
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean_tokens {tuple(clean.shape)} and corrupted_tokens {tuple(corrupted.shape)} "
                         "must have the same shape: patching swaps activations cell by cell (pad the "
                         "shorter prompt, or align the pair to the same length)")
    clean_mask = clean_attention_mask if clean_attention_mask is not None else attention_mask
    corrupted_mask = corrupted_attention_mask if corrupted_attention_mask is not None else attention_mask
    clean_mask, corrupted_mask = (None if m is None else torch.as_tensor(m).to(device)
                                  for m in (clean_mask, corrupted_mask))
    return clean, corrupted, clean_mask, corrupted_mask


def _forward_kwargs(logits_to_keep: int) -> dict:
    # Passed only when asked for: it is a causal-LM argument, and the other heads refuse it.
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got {logits_to_keep!r}")
    return {"logits_to_keep": logits_to_keep} if logits_to_keep else {}


def _record(model, tokens, mask, names, fwd: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    store: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = model.run_with_hooks(tokens, attention_mask=mask,
                                   fwd_hooks=[(n, interventions.record(store)) for n in names], **fwd)
    return out.logits, store


def _stack(values: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    flat = torch.stack([torch.as_tensor(v).detach().float().cpu() for v in values])
    return flat.reshape(*shape, *flat.shape[1:])


# ---------------------------------------------------------------------------------------------- patching
def _batched_hook(clean: torch.Tensor, plan: _Plan, entries: list[tuple[int, tuple[int, ...]]], batch: int):
    """Patch cell `idx` into rows [v*batch, (v+1)*batch) for each (v, idx) in `entries`."""
    device = clean.device
    rows = torch.cat([v * batch + torch.arange(batch) for v, _ in entries]).to(device)
    src_rows = torch.arange(batch, device=device).repeat(len(entries))
    per_axis = [torch.tensor([idx[k] for _, idx in entries], device=device).repeat_interleave(batch)
                for k in range(len(plan.cell_axes))]

    def hook_fn(x: torch.Tensor, *, hook) -> torch.Tensor:
        dst = [slice(None)] * x.dim()
        src = [slice(None)] * x.dim()
        dst[0], src[0] = rows, src_rows
        for axis, idx in zip(plan.cell_axes, per_axis, strict=True):
            dst[plan.hook_axes[axis]] = src[plan.hook_axes[axis]] = idx
        x = x.clone()
        if x.device != device:  # a clean value recorded (or gathered) elsewhere than this layer runs now
            dst = [i.to(x.device) if torch.is_tensor(i) else i for i in dst]
        x[tuple(dst)] = clean[tuple(src)].to(x.device, x.dtype)
        return x
    return hook_fn


def activation_patch(model, clean_tokens, corrupted_tokens, metric: Metric, target: str = "resid_pre", *,
                     batch_size: int = 64, batched: bool = True, attention_mask=None,
                     clean_attention_mask=None, corrupted_attention_mask=None, layers=None, positions=None,
                     heads=None, logits_to_keep: int = 0) -> PatchResult:
    """Patch each cell of `target` from the clean run into the corrupted run; return ``metric`` per cell.

    Targets: "resid_pre", "resid_mid" (sequential-residual models only), "resid_post", "attn_out",
    "mlp_out" (layer x pos); "z", "q", "k", "v", "pattern" (layer x head, every position); "z_pos"
    (layer x pos x head, TransformerLens' order). `layers`, `positions`, `heads` restrict the grid
    (default: all); an int position or head drops that axis from the result.
    `metric(logits)` sees the B corrupted rows of one cell and returns a scalar or a [B] tensor.
    `attention_mask` applies to both runs unless `clean_attention_mask` / `corrupted_attention_mask`
    override it. Batched (default): up to ``max(1, batch_size // B)`` cells per forward; ``batched=False``
    runs one forward per cell (the reference loop, for checking and timing).

    `logits_to_keep=N` (causal LMs) unembeds only the last N positions of every run, so `metric` sees
    [B N d_vocab] logits: with a large vocabulary and a metric that reads the last position only
    (``logit_diff(..., pos=-1)``), ``logits_to_keep=1`` skips nearly all of the unembedding, which
    otherwise costs more than the blocks. 0 (default) keeps every position.
    """
    model = model.hf()  # either convention's class: run through the transformers view, same modules
    fwd = _forward_kwargs(logits_to_keep)
    clean, corrupted, clean_mask, corrupted_mask = _inputs(
        model, clean_tokens, corrupted_tokens, attention_mask, clean_attention_mask, corrupted_attention_mask)
    plan = _plan(model, target, clean.shape[1], layers, positions, heads)
    clean_logits, cache = _record(model, clean, clean_mask, plan.names, fwd)
    values = []
    with torch.no_grad():
        corrupted_logits = model(corrupted, attention_mask=corrupted_mask, **fwd).logits
        if batched:
            values = _patch_batched(model, corrupted, corrupted_mask, cache, plan, metric, batch_size, fwd)
        else:
            for cell in plan.cells():
                layer, idx = cell[0], dict(zip(plan.cell_axes, cell[1:], strict=True))
                fn = interventions.patch_from_cache(cache, heads=idx.get("head"), positions=idx.get("pos"))
                out = model.run_with_hooks(corrupted, attention_mask=corrupted_mask,
                                           fwd_hooks=[(plan.names[layer], fn)], **fwd)
                values.append(metric(out.logits))
        clean_value = torch.as_tensor(metric(clean_logits))
        corrupted_value = torch.as_tensor(metric(corrupted_logits))
    return PatchResult(values=plan.squeeze(_stack(values, plan.grid_shape)), target=target, axes=plan.result_axes,
                       clean_value=clean_value.detach().float().cpu(),
                       corrupted_value=corrupted_value.detach().float().cpu(), **_labels(plan))


def _patch_batched(model, corrupted, mask, cache, plan: _Plan, metric: Metric, batch_size: int, fwd: dict):
    batch = corrupted.shape[0]
    per_forward = max(1, batch_size // batch)
    cells = list(plan.cells())
    values = []
    for start in range(0, len(cells), per_forward):
        chunk = cells[start:start + per_forward]
        by_layer: dict[int, list] = {}
        for v, (layer, *idx) in enumerate(chunk):
            by_layer.setdefault(layer, []).append((v, tuple(idx)))
        hooks = [(plan.names[layer], _batched_hook(cache[plan.names[layer]], plan, entries, batch))
                 for layer, entries in by_layer.items()]
        tokens = corrupted.repeat(len(chunk), 1)
        rep_mask = None if mask is None else mask.repeat(len(chunk), 1)
        logits = model.run_with_hooks(tokens, attention_mask=rep_mask, fwd_hooks=hooks, **fwd).logits
        values.extend(metric(logits[v * batch:(v + 1) * batch]) for v in range(len(chunk)))
    return values


# ---------------------------------------------------------------------------------------------- attribution
def attribution_patch(model, clean_tokens, corrupted_tokens, metric: Metric, target: str = "resid_pre", *,
                      attention_mask=None, clean_attention_mask=None, corrupted_attention_mask=None,
                      layers=None, positions=None, heads=None, logits_to_keep: int = 0) -> PatchResult:
    """Estimate `activation_patch`'s grid (same arguments, targets and output shapes) from gradients.

    `metric` must return a scalar or a [batch] tensor (rows never interact, so one backward of the sum
    gives each row its own gradient). Parameter gradients are neither needed nor touched: only the
    activations' gradients are taken, so frozen models work and `.grad` fields stay as they were.
    """
    model = model.hf()  # either convention's class: run through the transformers view, same modules
    fwd = _forward_kwargs(logits_to_keep)
    clean, corrupted, clean_mask, corrupted_mask = _inputs(
        model, clean_tokens, corrupted_tokens, attention_mask, clean_attention_mask, corrupted_attention_mask)
    plan = _plan(model, target, clean.shape[1], layers, positions, heads)
    clean_logits, clean_acts = _record(model, clean, clean_mask, plan.names, fwd)
    acts: dict[str, torch.Tensor] = {}

    def grad_from_here(x: torch.Tensor, *, hook) -> torch.Tensor:
        # A frozen model builds no graph; start one at the embeddings.
        return x if x.requires_grad else x.detach().requires_grad_()

    def keep(x: torch.Tensor, *, hook) -> None:
        acts[hook.name] = x

    with torch.enable_grad():
        hooks = [("hook_embed", grad_from_here)] + [(n, keep) for n in plan.names]
        out = model.run_with_hooks(corrupted, attention_mask=corrupted_mask, fwd_hooks=hooks, **fwd)
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
        # In at least fp32 (fp64 models stay fp64 until the grid is stored as activation_patch stores it).
        corrupted_act = widen(acts[name].detach())
        grad = torch.zeros_like(corrupted_act) if grad is None else widen(grad)
        contrib = (widen(clean_acts[name]) - corrupted_act) * grad
        keep_axes = [0] + [plan.hook_axes[a] for a in plan.cell_axes]
        summed = contrib.sum(dim=[d for d in range(contrib.dim()) if d not in keep_axes])
        # `summed` keeps its axes in tensor order; put them in (batch, *cell axes) order.
        summed = summed.permute([sorted(keep_axes).index(a) for a in keep_axes])
        for k, chosen in enumerate(plan.choices):
            summed = summed.index_select(k + 1, torch.tensor(chosen, device=summed.device))
        per_layer.append((summed.sum(0) if value.dim() == 0 else summed.movedim(0, -1)).float())

    with torch.no_grad():
        clean_value = torch.as_tensor(metric(clean_logits))
    # Gathered per layer: a model placed across devices leaves each layer's values on its own.
    return PatchResult(values=plan.squeeze(torch.stack([t.detach().cpu() for t in per_layer])), target=target,
                       axes=plan.result_axes, clean_value=clean_value.detach().float().cpu(),
                       corrupted_value=value.detach().float().cpu(), method="attribution", **_labels(plan))



# ---------------------------------------------------------------------------------------------- TransformerLens' API
def _from_cache(model, corrupted_tokens, clean_cache, metric: Metric, target: str, batch_size: int = 64):
    """TransformerLens' patching call: clean activations from `clean_cache` (a `run_with_cache` of the
    clean input, with its batch axis and every position), corrupted run on `corrupted_tokens`."""
    model = model.hf()  # either convention's class: run through the transformers view, same modules
    device = model.input_device  # a placed model's first parameter may be an offloaded (meta) placeholder
    corrupted = _as_batch(corrupted_tokens, "corrupted_tokens").to(device)
    plan = _plan(model, target, corrupted.shape[1], None, None, None)
    for name in plan.names:
        clean, shape = clean_cache[name], model.hook_dict[name].shape
        pos_axis = find_axis(shape, POSITIONS)
        if clean.dim() != len(shape.split()) or clean.shape[0] != corrupted.shape[0] or \
                clean.shape[pos_axis] != corrupted.shape[1]:
            raise ValueError(f"clean_cache[{name!r}] is {tuple(clean.shape)}, but patching it into "
                             f"corrupted_tokens {tuple(corrupted.shape)} needs [{shape}] with the same batch "
                             "and positions: cache the clean run of the same shape, without pos_slice or "
                             "remove_batch_dim")
    values = _patch_batched(model, corrupted, None, clean_cache, plan, metric, batch_size, {})
    return plan.squeeze(_stack(values, plan.grid_shape))


def get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, patching_metric: Metric) -> torch.Tensor:
    """TransformerLens' call: patch each (layer, position) of resid_pre; [layer pos]."""
    return _from_cache(model, corrupted_tokens, clean_cache, patching_metric, "resid_pre")


def get_act_patch_resid_mid(model, corrupted_tokens, clean_cache, patching_metric: Metric) -> torch.Tensor:
    """TransformerLens' call for resid_mid (sequential-residual models only); [layer pos]."""
    return _from_cache(model, corrupted_tokens, clean_cache, patching_metric, "resid_mid")


def get_act_patch_attn_out(model, corrupted_tokens, clean_cache, patching_metric: Metric) -> torch.Tensor:
    """TransformerLens' call: patch each (layer, position) of attn_out; [layer pos]."""
    return _from_cache(model, corrupted_tokens, clean_cache, patching_metric, "attn_out")


def get_act_patch_mlp_out(model, corrupted_tokens, clean_cache, patching_metric: Metric) -> torch.Tensor:
    """TransformerLens' call: patch each (layer, position) of mlp_out; [layer pos]."""
    return _from_cache(model, corrupted_tokens, clean_cache, patching_metric, "mlp_out")


def get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache,
                                       patching_metric: Metric) -> torch.Tensor:
    """TransformerLens' call: patch each head's z at each position; [layer pos head]."""
    return _from_cache(model, corrupted_tokens, clean_cache, patching_metric, "z_pos")


def get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache,
                                        patching_metric: Metric) -> torch.Tensor:
    """TransformerLens' call: patch each head's z at every position at once; [layer head]."""
    return _from_cache(model, corrupted_tokens, clean_cache, patching_metric, "z")


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, patching_metric: Metric) -> torch.Tensor:
    """TransformerLens' call: resid_pre, attn_out and mlp_out patched per (layer, position); [3 layer pos]."""
    return torch.stack([_from_cache(model, corrupted_tokens, clean_cache, patching_metric, t)
                        for t in ("resid_pre", "attn_out", "mlp_out")])


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache,
                                          patching_metric: Metric) -> torch.Tensor:
    """TransformerLens' call: each head's z, q, k, v and pattern patched at every position; [5 layer head]."""
    return torch.stack([_from_cache(model, corrupted_tokens, clean_cache, patching_metric, t)
                        for t in ("z", "q", "k", "v", "pattern")])


__all__ = ["PatchResult", "TARGETS", "activation_patch", "attribution_patch", "get_act_patch_attn_head_all_pos_every",
           "get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_out",
           "get_act_patch_block_every", "get_act_patch_mlp_out", "get_act_patch_resid_mid",
           "get_act_patch_resid_pre", "kl_to_clean", "logit_diff", "loss", "normalize", "prob"]
