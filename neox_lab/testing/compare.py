"""`compare(model_a, model_b, inputs)`: run two NeoX models on the same tokens, hook by hook, and say
where (if anywhere) they stop computing the same thing.

Either model may be a neox_lab model or a transformers GPTNeoX model (its module outputs are mapped
onto neox_lab hook names, see `sides.py`). `model_b` is the reference: relative errors are
||a - b|| / ||b||. Everything is compared in fp64 after casting, over real (non-pad) positions only:
what a model computes at padding is unspecified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from ..hooks.registry import hook_names, layer_of, unknown_hook_message
from .report import EquivalenceReport, HookResult, LogitsResult, assert_equivalent
from .sides import Side
from .tolerance import Tolerance, policy_for

__all__ = ["EquivalenceReport", "assert_equivalent", "compare", "default_tolerance"]

#: Fields two models must share to be compared stream by stream.
STRUCTURE = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size",
             "use_parallel_residual", "vocab_size")


def compare(model_a, model_b, inputs, *, hooks="all", tolerance: Tolerance | None = None,
            attention_mask: torch.Tensor | None = None) -> EquivalenceReport:
    """Compare `model_a` against the reference `model_b` on `inputs`; returns an `EquivalenceReport`.

    inputs: token ids [batch pos], a `TokenBatch`, or a mapping with "input_ids" (and optionally
    "attention_mask", e.g. a tokenizer's output); `attention_mask` [batch pos] overrides.
    hooks: "all" (every hook both sides expose), a hook name, a list of names, a predicate on names,
    or None (logits only).
    tolerance: a `Tolerance`; None derives the noise floor of the two sides' dtypes and attention
    backends (`tolerance.policy_for`) at the models' contraction width.
    Both models run in eval mode (their mode is restored afterwards).
    """
    ids, mask = _as_inputs(inputs, attention_mask)
    a, b = Side(model_a, "model_a"), Side(model_b, "model_b")
    _check_structure(a, b)
    cfg = b.cfg
    names, skipped = _select(hooks, a, b)
    store_a, logits_a = a.run(ids, mask, names)
    store_b, logits_b = b.run(ids, mask, names)
    if tolerance is None:
        tolerance = _policy(a, b, ids.shape[-1])
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    registry = hook_names(cfg)
    n_layers = cfg.num_hidden_layers
    results = []
    for name in names:
        if name not in store_a or name not in store_b:
            skipped[name] = f"not produced by {'model_a' if name not in store_a else 'model_b'} on this input"
            continue
        ta = _real(store_a.pop(name), registry[name], real)
        tb = _real(store_b.pop(name), registry[name], real)
        if ta.shape != tb.shape:
            raise ValueError(f"hook {name!r}: model_a gives {tuple(ta.shape)}, model_b {tuple(tb.shape)} "
                             "on the real positions")
        layer = layer_of(name)
        depth = _depth(name, layer, n_layers)
        max_abs, err, ref, n = _errors(ta, tb)
        results.append(HookResult(name=name, layer=layer, shape=list(ta.shape), n=n, max_abs=max_abs,
                                  rel=_ratio(err, ref), bound=tolerance.rel_at(depth),
                                  passed=tolerance.allows(err, ref, n, depth)))
    logits = None
    if logits_a is not None and logits_b is not None:
        logits = _compare_logits(logits_a, logits_b, real, tolerance, n_layers + 1)
    return EquivalenceReport(model_a=a.describe(), model_b=b.describe(), tolerance=tolerance,
                             n_positions=int(real.sum()), hooks=results, logits=logits, skipped=skipped)


def default_tolerance(model_a, model_b, seq_len: int) -> Tolerance:
    """The policy `compare` derives for these two models (their dtypes, attention backends and
    devices, at width max(d_model, d_mlp, seq_len)); e.g. to loosen it: `.scaled(4)`."""
    return _policy(Side(model_a, "model_a"), Side(model_b, "model_b"), seq_len)


def _policy(a: Side, b: Side, seq_len: int) -> Tolerance:
    width = max(b.cfg.hidden_size, b.cfg.intermediate_size, seq_len)
    return policy_for(a.dtype, b.dtype, a.backend, b.backend, width=width, device_a=a.device, device_b=b.device)


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


def _check_structure(a: Side, b: Side) -> None:
    diffs = [f"{f}: model_a {getattr(a.cfg, f)}, model_b {getattr(b.cfg, f)}" for f in STRUCTURE
             if getattr(a.cfg, f) != getattr(b.cfg, f)]
    if diffs:
        raise ValueError("compare needs two models of one architecture; they differ in " + "; ".join(diffs))


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


# ---------------------------------------------------------------------------------------- metrics
def _real(t: torch.Tensor, shape: str, real: torch.Tensor) -> torch.Tensor:
    """The entries at real positions, as fp64 [n_real ...] (every hook stream has batch first)."""
    dims = shape.split()
    axis = next((dims.index(a) for a in ("pos", "query_pos") if a in dims), None)
    t = t.to(torch.float64)
    if axis is None or tuple(t.shape[:1]) + (t.shape[axis],) != tuple(real.shape):
        return t
    return t.movedim(axis, 1)[real.to(t.device)]


def _errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, int]:
    """(max |a - b|, ||a - b||, ||b||, n). Equal infinities (masked scores) count as agreeing; a
    non-finite value on one side only is an infinite error."""
    b = b.to(a.device)
    same = (a == b) | (a.isnan() & b.isnan())
    finite = a.isfinite() & b.isfinite()
    if bool((~same & ~finite).any()):
        return float("inf"), float("inf"), float(b[finite].norm()), a.numel()
    diff = torch.where(same, torch.zeros_like(a), a - b)
    ref = torch.where(finite, b, torch.zeros_like(b))
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    return max_abs, float(diff.norm()), float(ref.norm()), a.numel()


def _ratio(err: float, ref: float) -> float:
    if err == 0.0:
        return 0.0
    return err / ref if ref > 0 else float("inf")


def _compare_logits(la: torch.Tensor, lb: torch.Tensor, real: torch.Tensor, tol: Tolerance,
                    depth: int) -> LogitsResult:
    if la.shape != lb.shape:
        raise ValueError(f"logits: model_a gives {tuple(la.shape)}, model_b {tuple(lb.shape)}")
    a, b = la.to(torch.float64), lb.to(device=la.device, dtype=torch.float64)
    if a.dim() >= 3 and tuple(a.shape[:2]) == tuple(real.shape):
        a, b = a[real.to(a.device)], b[real.to(a.device)]  # per-position outputs: real positions only
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    max_abs, err, ref, n = _errors(a, b)
    rel_bound = tol.rel_at(depth)
    # The per-logit scale of the bound, row by row: a near tie within twice of it may flip.
    per_logit = rel_bound * b.pow(2).mean(-1).sqrt() + tol.abs
    top_a, top_b = a.argmax(-1), b.argmax(-1)
    agree = top_a == top_b
    margin = b.gather(-1, top_b[:, None]).squeeze(-1) - b.gather(-1, top_a[:, None]).squeeze(-1)
    within = agree | (margin <= 2 * per_logit)
    logp_a, logp_b = a.log_softmax(-1), b.log_softmax(-1)
    kl = (logp_b.exp() * (logp_b - logp_a)).sum(-1).clamp_min(0.0)
    kl_bound = tol.kl if tol.kl is not None else float((per_logit.pow(2) / 2).mean())
    rows = a.shape[0]
    return LogitsResult(
        shape=list(la.shape), n_rows=rows, max_abs=max_abs, rel=_ratio(err, ref), bound=rel_bound,
        passed_error=tol.allows(err, ref, n, depth),
        top1_agreement=float(agree.double().mean()) if rows else 1.0,
        top1_within_noise=float(within.double().mean()) if rows else 1.0,
        top1_required=tol.top1_agreement,
        kl_mean=float(kl.mean()) if rows else 0.0, kl_max=float(kl.max()) if rows else 0.0,
        kl_bound=kl_bound,
    )
