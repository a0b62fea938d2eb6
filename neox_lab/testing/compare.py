"""`compare(model_a, model_b, inputs)`: say whether two NeoX models compute the same function and,
if not, where they stop doing so, from three layers of evidence in one report:

1. the configs (`config_diff`): a field that changes the function is non-equivalence by itself;
2. the weights (`weight_diff`), when both models have the same shapes: any element past what casting
   one original to the two dtypes can explain, named by tensor, layer, head and q/k/v part;
3. the activations, hook by hook in forward order, against the rounding noise floor of the two sides
   (`tolerance`), plus a longer one-row probe of block 0's rotated q/k, where rotary differences grow.

Either model may be a neox_lab model or a transformers GPTNeoX model (its module outputs are mapped
onto neox_lab hook names, see `sides.py`). `model_b` is the reference: relative errors are
||a - b|| / ||b||. Activations are compared in fp64 after casting, over real (non-pad) positions:
what a model computes at padding is unspecified.

mode="lossy" is for deliberate weight changes (quantisation): weights may differ by up to a floor
derived from the measured weight error, the activation floor widens in proportion (`lossy.py`), and
a tensor changed far more than the rest (a zeroed bias on top of int8) still fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from ..hooks.registry import hook_names, layer_of, unknown_hook_message
from .config_diff import diff_configs
from .lossy import accept_lossy_weights, lossy_tolerance
from .metrics import compare_logits, errors, per_head_failures, ratio, real_entries
from .report import EquivalenceReport, HookResult, assert_equivalent
from .sides import Side
from .tolerance import Tolerance, policy_for
from .weight_diff import diff_weights

__all__ = ["EquivalenceReport", "assert_equivalent", "compare", "default_tolerance"]

#: The rotated q/k are where a rotary difference shows first, and it grows with the position.
PROBE_HOOKS = ("attn.hook_rot_q", "attn.hook_rot_k")
#: Length of the long rotary probe (capped at max_position_embeddings).
PROBE_LEN = 512
MODES = ("exact", "lossy")


def compare(model_a, model_b, inputs, *, hooks="all", tolerance: Tolerance | None = None,
            attention_mask: torch.Tensor | None = None, mode: str = "exact", weights: bool = True,
            probe_len: int | None = PROBE_LEN, probe_seed: int = 0) -> EquivalenceReport:
    """Compare `model_a` against the reference `model_b` on `inputs`; returns an `EquivalenceReport`.

    inputs: token ids [batch pos], a `TokenBatch`, or a mapping with "input_ids" (and optionally
    "attention_mask", e.g. a tokenizer's output); `attention_mask` [batch pos] overrides.
    hooks: "all" (every hook both sides expose), a hook name, a list of names, a predicate on names,
    or None (logits only).
    tolerance: a `Tolerance`; None derives the noise floor of the two sides' dtypes and attention
    backends (`tolerance.policy_for`) at the models' contraction width.
    mode: "exact" (any changed weight fails) or "lossy" (weights may carry a uniform quantisation-like
    error; the floors follow from it). weights: False skips the weight diff (e.g. for models whose
    parameters live elsewhere).
    probe_len: one extra row of random ids of this length (at most max_position_embeddings) runs
    through block 0 of both models, comparing its rotated q/k; None or a length not beyond the
    inputs' skips it.
    Structurally different models (another depth, width, residual kind ...) are reported as not
    equivalent from their configs alone. Both models run in eval mode (restored afterwards).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ids, mask = _as_inputs(inputs, attention_mask)
    a, b = Side(model_a, "model_a"), Side(model_b, "model_b")
    config = diff_configs(a.cfg, b.cfg, task=b.architecture)
    report = EquivalenceReport(model_a=a.describe(), model_b=b.describe(), tolerance=tolerance, n_positions=0,
                               config=config, mode=mode, sides={"model_a": a.info(), "model_b": b.info()})
    if any(d.structural for d in config):
        report.tolerance = tolerance or _policy(a, b, ids.shape[-1])
        report.skipped_all = "the models differ structurally (see the config differences)"
        return report
    wdiff = diff_weights(model_a, model_b, b.cfg.num_attention_heads) if weights else None
    if tolerance is None:
        tolerance = _policy(a, b, ids.shape[-1])
    if mode == "lossy" and wdiff is not None:
        delta = accept_lossy_weights(wdiff)
        tolerance = lossy_tolerance(tolerance, delta)
    report.weights, report.tolerance = wdiff, tolerance
    cfg = b.cfg
    names, skipped = _select(hooks, a, b)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    report.n_positions = int(real.sum())
    report.skipped = skipped
    report.hooks = _compare_hooks(a, b, ids, mask, names, real, tolerance, skipped, want_logits=True, report=report)
    if probe_len is not None and names:
        length = min(probe_len, cfg.max_position_embeddings)
        # Block 0 only: a rotary difference (base, rotary_pct, scaling) is the same in every block,
        # and stopping there keeps the long row cheap.
        probe = [n for n in names if layer_of(n) == 0 and n.split(".", 2)[-1] in PROBE_HOOKS]
        if length > ids.shape[-1] and probe:
            gen = torch.Generator().manual_seed(probe_seed)
            pids = torch.randint(0, cfg.vocab_size, (1, length), generator=gen)
            ptol = tolerance if mode == "lossy" or tolerance.label == "custom" else _policy(a, b, length)
            report.probe = _compare_hooks(a, b, pids, None, probe, torch.ones_like(pids, dtype=torch.bool), ptol,
                                          {}, want_logits=False, report=None, stop_at_layer=1)
            report.probe_shape = [1, length]
    return report


def default_tolerance(model_a, model_b, seq_len: int) -> Tolerance:
    """The policy `compare` derives for these two models (their dtypes, attention backends and
    devices, at width max(d_model, d_mlp, seq_len)); e.g. to loosen it: `.scaled(4)`."""
    return _policy(Side(model_a, "model_a"), Side(model_b, "model_b"), seq_len)


def _policy(a: Side, b: Side, seq_len: int) -> Tolerance:
    width = max(b.cfg.hidden_size, b.cfg.intermediate_size, seq_len)
    return policy_for(a.dtype, b.dtype, a.backend, b.backend, width=width, device_a=a.device, device_b=b.device)


def _compare_hooks(a: Side, b: Side, ids, mask, names, real, tolerance, skipped, *, want_logits, report,
                   stop_at_layer=None):
    store_a, logits_a = a.run(ids, mask, names, stop_at_layer)
    store_b, logits_b = b.run(ids, mask, names, stop_at_layer)
    registry = hook_names(b.cfg)
    n_layers, n_heads = b.cfg.num_hidden_layers, b.cfg.num_attention_heads
    results = []
    for name in names:
        if name not in store_a or name not in store_b:
            skipped[name] = f"not produced by {'model_a' if name not in store_a else 'model_b'} on this input"
            continue
        ta, dims = real_entries(store_a.pop(name), registry[name], real)
        tb, _ = real_entries(store_b.pop(name), registry[name], real)
        if ta.shape != tb.shape:
            raise ValueError(f"hook {name!r}: model_a gives {tuple(ta.shape)}, model_b {tuple(tb.shape)} "
                             "on the real positions")
        layer = layer_of(name)
        depth = _depth(name, layer, n_layers)
        max_abs, err, ref, n = errors(ta, tb)
        passed = tolerance.allows(err, ref, n, depth)
        heads = [] if passed else per_head_failures(ta, tb, dims, n_heads, tolerance, depth)
        results.append(HookResult(name=name, layer=layer, shape=list(ta.shape), n=n, max_abs=max_abs,
                                  rel=ratio(err, ref), bound=tolerance.rel_at(depth), passed=passed, heads=heads))
    if want_logits and logits_a is not None and logits_b is not None:
        report.logits = compare_logits(logits_a, logits_b, real, tolerance, n_layers + 1)
    return results


# ---------------------------------------------------------------------------------------- inputs
def _as_inputs(inputs, attention_mask):
    mask = None
    if isinstance(inputs, torch.Tensor):
        ids = inputs
    elif isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError(f"inputs mapping needs an 'input_ids' key, has {sorted(inputs)}")
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    elif hasattr(inputs, "input_ids"):
        ids, mask = inputs.input_ids, getattr(inputs, "attention_mask", None)
    else:
        raise TypeError(f"inputs must be token ids [batch pos], a TokenBatch or a mapping with input_ids; got "
                        f"{type(inputs).__name__}")
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be integer token ids [batch pos], got {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"input_ids must hold at least one token, got shape {tuple(ids.shape)}")
    if attention_mask is not None:
        mask = attention_mask
    if mask is not None:
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask must match input_ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
        if not bool(mask.bool().any(-1).all()):
            raise ValueError("every row of attention_mask needs at least one real (1) token")
        if bool(mask.bool().all()):
            mask = None  # no padding: both libraries then take their plain causal path
    return ids, mask


def _select(hooks, a: Side, b: Side) -> tuple[list[str], dict[str, str]]:
    """The hook names to compare (forward order), and those left out with the reason."""
    registry = list(hook_names(b.cfg))
    missing = {**b.unavailable(), **a.unavailable()}
    if hooks is None or (isinstance(hooks, (list, tuple)) and not hooks):
        return [], {}
    if hooks == "all":
        wanted = registry
    elif isinstance(hooks, str):
        wanted = [hooks]
    elif callable(hooks):
        wanted = [n for n in registry if _call(hooks, n)]
    elif isinstance(hooks, Iterable):
        wanted = list(hooks)
    else:
        raise TypeError(f"hooks must be 'all', a name, a list of names, a predicate or None; got {hooks!r}")
    for name in wanted:
        if name not in registry:
            raise KeyError(unknown_hook_message(name, registry, b.cfg.use_parallel_residual))
    order = {n: i for i, n in enumerate(registry)}
    wanted = sorted(set(wanted), key=order.__getitem__)
    return [n for n in wanted if n not in missing], {n: missing[n] for n in wanted if n in missing}


def _call(fn: Callable[[str], bool], name: str) -> bool:
    return bool(fn(name))


def _depth(name: str, layer: int | None, n_layers: int) -> int:
    """Rounding stages behind a stream: hook_embed 1, blocks.L.* L + 1, ln_final and logits n_layers + 1."""
    if layer is not None:
        return layer + 1
    return 1 if name == "hook_embed" else n_layers + 1
