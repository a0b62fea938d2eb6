"""`compare(model_a, model_b)`: say whether two NeoX implementations compute the same function and,
if not, where they stop doing so, from the layers of evidence one report holds:

1. the configs (`config_diff`): a field that changes the function is non-equivalence by itself;
2. the weights (`weight_diff`): any element past what casting one original to the two dtypes can
   explain, named by tensor, layer, head and q/k/v part (for a port: through its weight map);
3. the activations, hook by hook in forward order, on three batches: the main one (yours, or random
   ids), a left-padded one with its mask, and a long probe through every layer; each stream against
   a floor measured from the rounding of the two sides' dtypes (`floors`);
4. the activation check (`activation_check`): the MLP activation is the config's function, to the
   last bit, which a wrong GELU variant in fp16/bf16 fails;
5. decoding (`decoding`), where a side can decode: prefill + incremental steps with the KV cache
   against the full forward, and greedy tokens across sides.

Either side may be a neox_lab model, a transformers GPTNeoX model (with replaced submodules too), or
your port: an `nn.Module`, a callable `f(input_ids, attention_mask) -> logits`, or a `Port` bundling
one with its hook map, weight map and decoding callables (`side_port`). `model_b` is the reference:
relative errors are ||a - b|| / ||b||, in fp64 after casting, over real (non-pad) positions.

mode="lossy" is for deliberate weight changes (quantisation): weights may differ by up to a floor
derived from the measured weight error, the activation floor widens in proportion (`lossy.py`), and
a tensor changed far more than the rest (a zeroed bias on top of int8) still fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..hooks.registry import hook_names, layer_of, unknown_hook_message
from .activation_check import check_activation
from .config_diff import diff_configs
from .decoding import DECODE_ROWS, DECODE_STEPS, DecodingResult, check_consistency, compare_greedy, decode
from .floors import Floors
from .inputs import DEFAULT_BATCH, DEFAULT_SEQ_LEN, PROBE_LEN, Batch, as_inputs, left_padded, probe_length, random_ids
from .lossy import accept_lossy_weights, lossy_tolerance
from .metrics import compare_logits, errors, failing_positions, per_head_failures, ratio, real_entries
from .nonfinite import describe, one_sided
from .report import EquivalenceReport, HookResult, assert_equivalent
from .side_base import Side
from .side_port import PortSide
from .sides import is_port, make_side
from .tolerance import Tolerance, policy_for
from .weight_diff import diff_mapped, diff_named

__all__ = ["EquivalenceReport", "assert_equivalent", "compare", "default_tolerance"]

#: Streams the long probe compares in every layer: rotary differences show first in the rotated q/k and
#: grow with the position; hook_z is where a mask or window bug shows; resid_post carries everything on.
PROBE_HOOKS = ("attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z", "hook_resid_post")
#: Streams the left-padded batch compares (and the logits): where padding enters (positions, the mask)
#: and what carries it on; the main batch has every stream, so the CI step stays within its minute.
PADDED_HOOKS = ("attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
                "hook_attn_out", "hook_resid_post", "ln_final.hook_ln_out", "hook_logits")
MODES = ("exact", "lossy")
ACT_STREAMS = ("mlp.hook_pre", "mlp.hook_post")


def compare(model_a, model_b, inputs=None, *, hooks="all", tolerance: Tolerance | None = None,
            attention_mask: torch.Tensor | None = None, mode: str = "exact", weights: bool = True,
            probe_len: int | None = PROBE_LEN, probe_seed: int = 0, padded: bool = True,
            decode_steps: int = DECODE_STEPS, scale: float = 1.0, hook_map=None, weight_map=None,
            step: Callable | None = None, generate: Callable | None = None, config=None) -> EquivalenceReport:
    """Compare `model_a` against the reference `model_b`; returns an `EquivalenceReport` (`.verdict`).

    model_a, model_b: a neox_lab model (a `HookedTransformer` runs as its `.hf()` view), a transformers
    GPTNeoX model, an `nn.Module`, a callable
    `f(input_ids, attention_mask) -> logits [batch pos vocab]`, or a `Port` (a module with its maps).
    inputs: token ids [batch pos], a `TokenBatch`, or a mapping with "input_ids" (and optionally
    "attention_mask"); None: random ids [4 32] (seed `probe_seed`). `attention_mask` overrides.
    hooks: "all" (every hook both sides expose), a hook name, a list of names, a predicate on names,
    or None (logits only).
    tolerance: a `Tolerance` replacing the measured floors; None measures them (`floors`). `scale`
    multiplies whichever bound applies.
    mode: "exact" (any changed weight fails) or "lossy" (weights may carry a uniform quantisation-like
    error; the floors follow from it). weights: False skips the weight diff.
    probe_len: the long probe's length (capped by max_position_embeddings and memory; None or 0 skips
    it). padded: add the left-padded batch. decode_steps: incremental decoding steps and greedy tokens
    to check (0 skips decoding).
    For the side that is a port (a module or callable; both: wrap each in `Port`): hook_map (neox_lab
    hook names, `{L}` for the layer, to module paths), weight_map (its tensor names to checkpoint names),
    step(input_ids, past) -> (logits, past), generate(input_ids, max_new_tokens) -> ids, config (the
    NeoXConfig it implements; default the other side's). See `neox_lab.testing.side_port`.
    Structurally different models (another depth, width, residual kind ...) are reported as not
    equivalent from their configs alone. Both models run in eval mode (restored afterwards).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    a, b = _sides(model_a, model_b, dict(hooks=hook_map, weights=weight_map, step=step, generate=generate,
                                         config=config))
    cfg = b.cfg
    notes = []
    for side in (a, b):
        if isinstance(side, PortSide) and side.config_from_other:
            notes.append(f"{side.label} is a port without a config: it is held to the other side's "
                         f"(num_hidden_layers {cfg.num_hidden_layers}, hidden_size {cfg.hidden_size})")
    config_diff = [] if any(isinstance(s, PortSide) and s.config_from_other for s in (a, b)) else \
        diff_configs(a.cfg, b.cfg, task=b.architecture)
    ids, mask = (random_ids(cfg, DEFAULT_BATCH, DEFAULT_SEQ_LEN, probe_seed), None) if inputs is None else \
        as_inputs(inputs, attention_mask)
    main = Batch("main", ids, mask)
    base = _policy(a, b, ids.shape[-1])
    report = EquivalenceReport(model_a=a.describe(), model_b=b.describe(), tolerance=tolerance or base,
                               n_positions=int(main.real.sum()), config=config_diff, mode=mode,
                               sides={"model_a": a.info(), "model_b": b.info()}, notes=notes,
                               processed={s.label: sorted(s.processed) for s in (a, b) if s.processed})
    if any(d.structural for d in config_diff):
        report.skipped_all = "the models differ structurally (see the config differences)"
        return report
    report.weights = _weights(a, b, weights, notes)
    lossy = None
    if mode == "lossy" and report.weights is not None:
        lossy = lossy_tolerance(base, accept_lossy_weights(report.weights))
        report.tolerance = lossy
    custom = tolerance.scaled(scale) if tolerance is not None and scale != 1.0 else tolerance
    floors = Floors(a, b, base, custom=custom, lossy=lossy, scale=scale)
    names, report.skipped = _select(hooks, a, b)
    try:
        report.hooks, report.logits, act = _run_batch(a, b, main, names, floors, report)
        act_stores = [act]
        report.floors = floors.note
        if padded:
            if a.accepts_mask and b.accepts_mask:
                pad = left_padded(cfg, ids.shape[-1], probe_seed)
                padded_names = [n for n in names if n.split(".", 2)[-1] in PADDED_HOOKS or n in PADDED_HOOKS]
                report.padded, report.padded_logits, _ = _run_batch(a, b, pad, padded_names, floors, report)
                report.padded_shape = list(pad.ids.shape)
            else:
                who = a.label if not a.accepts_mask else b.label
                notes.append(f"left-padded batch skipped: {who} takes no attention_mask")
        _probe(a, b, names, floors, report, probe_len, probe_seed, ids.shape[-1])
        report.activation, why = check_activation(act_stores, cfg.hidden_act, cfg.num_hidden_layers)
        if why:
            notes.append(why)
        if decode_steps:
            report.decoding = _decoding(a, b, cfg, floors, report.tolerance, decode_steps, probe_seed)
    finally:
        floors.release()
    return report


def default_tolerance(model_a, model_b, seq_len: int) -> Tolerance:
    """The analytic policy for these two models (their dtypes, attention backends and devices, at width
    max(d_model, d_mlp, seq_len)): what `compare` holds streams to when it cannot measure the rounding,
    and the absolute floor and top-1 requirement it always uses."""
    a, b = _sides(model_a, model_b, {})
    return _policy(a, b, seq_len)


def _sides(model_a, model_b, port_options: dict) -> tuple[Side, Side]:
    given = {k: v for k, v in port_options.items() if v is not None}
    port_a, port_b = is_port(model_a), is_port(model_b)
    if given and port_a and port_b:
        raise TypeError(f"both sides are ports, so {', '.join(sorted(given))} would be ambiguous: wrap each in "
                        "neox_lab.testing.Port(module, hooks=..., weights=..., ...)")
    if given and not (port_a or port_b):
        raise TypeError(f"{', '.join(sorted(given))} apply to a port (an nn.Module or a callable); both sides are "
                        "neox_lab or transformers models, which compare reads by itself")
    a = make_side(model_a, "model_a", **(given if port_a else {}))
    b = make_side(model_b, "model_b", **(given if port_b else {}))
    cfg = b.cfg or a.cfg
    if cfg is None:
        raise ValueError("neither side has a NeoX config: give the port's, e.g. Port(module, config=NeoXConfig(...)) "
                         "or compare(..., config=...)")
    for side in (a, b):
        if isinstance(side, PortSide):
            side.bind(cfg)
    return a, b


def _policy(a: Side, b: Side, seq_len: int) -> Tolerance:
    width = max(b.cfg.hidden_size, b.cfg.intermediate_size, seq_len)
    return policy_for(a.dtype, b.dtype, _backend(a), _backend(b), width=width, device_a=a.device, device_b=b.device)


def _backend(side: Side) -> str:
    return side.backend if side.kind != "port" else "eager"


def _weights(a: Side, b: Side, enabled: bool, notes: list[str]):
    if not enabled:
        return None
    port = a if isinstance(a, PortSide) else b if isinstance(b, PortSide) else None
    if port is None:
        return diff_named(a.weights(), b.weights(), b.cfg.num_attention_heads)
    other = b if port is a else a
    if not port.weight_entries:
        notes.append(f"weights not compared: {port.label} is a port without a weight map")
        return None
    reference = other.weights()
    if reference is None:
        notes.append(f"weights not compared: {other.label} has no parameters to map onto")
        return None
    return diff_mapped(port.weight_entries, port.module.state_dict(), reference, b.cfg.num_attention_heads,
                       port.label, other.label)


def _run_batch(a: Side, b: Side, batch: Batch, names: list[str], floors: Floors, report: EquivalenceReport,
               stop_at_layer: int | None = None, want_logits: bool = True):
    """Run both sides on `batch` and compare every stream and the logits. Returns (hook results, logits
    result or None, the candidate's MLP streams for the activation check)."""
    cfg = b.cfg
    ids, mask, real = batch.ids, batch.mask, batch.real
    store_a, logits_a = a.run(ids, mask, names, stop_at_layer)
    store_b, logits_b = b.run(ids, mask, names, stop_at_layer)
    if not want_logits:
        logits_a = logits_b = None
    floors.plan()
    own = (store_b, logits_b) if floors.measurer is b else (store_a, logits_a)
    # the measurer is a neox_lab or transformers side: it can stop where no logits are wanted
    floors.measure(batch, names, own, stop_at_layer if want_logits else cfg.num_hidden_layers)
    registry = hook_names(cfg)
    seq = ids.shape[-1]
    results = []
    act = ({n: store_a[n] for n in list(store_a) if n.endswith(ACT_STREAMS)}, real, registry.get(
        "blocks.0.mlp.hook_pre", "batch pos d_mlp"))
    for name in names:
        if name not in store_a or name not in store_b:
            report.skipped[name] = f"not produced by {'model_a' if name not in store_a else 'model_b'} on this input"
            continue
        ta, dims = real_entries(store_a.pop(name), registry[name], real)
        tb, _ = real_entries(store_b.pop(name), registry[name], real)
        if ta.shape != tb.shape:
            raise ValueError(f"hook {name!r}: model_a gives {tuple(ta.shape)}, model_b {tuple(tb.shape)} "
                             f"on the real positions of {batch.describe()}")
        max_abs, err, ref, n = errors(ta, tb)
        rel = floors.rel(batch.label, name, seq, n)
        abs_ = floors.abs
        result = HookResult(name=name, layer=layer_of(name), shape=list(ta.shape), n=n, max_abs=max_abs,
                            rel=ratio(err, ref), bound=rel, passed=floors.allows(err, ref, n, rel), batch=batch.label)
        mean_bound = floors.rel_mean(batch.label, name, seq, ta[0].numel()) if dims[0] == "real" else None
        if mean_bound is not None:
            _, m_err, m_ref, m_n = errors(ta.mean(0), tb.mean(0))
            result.mean_rel, result.mean_bound = ratio(m_err, m_ref), mean_bound
            result.mean_passed = floors.allows(m_err, m_ref, m_n, mean_bound)
            result.passed = result.passed and result.mean_passed
        if not result.passed:
            result.heads = per_head_failures(ta, tb, dims, cfg.num_attention_heads, rel, abs_)
            positions, n_bad = failing_positions(ta, tb, dims, real, rel, abs_)
            # Where only some positions fail, where they start says something (a window, the padding).
            result.positions, result.n_failing_positions = (positions if 0 < n_bad < int(real.sum()) else []), n_bad
            result.nonfinite = _nonfinite(a, b, ta, tb, batch, report, name) if err == float("inf") else None
        results.append(result)
    logits = None
    if logits_a is not None and logits_b is not None:
        n_logits = int(real.sum()) * logits_b.shape[-1] if logits_b.dim() >= 3 else logits_b.numel()
        logits = compare_logits(logits_a, logits_b, real, floors.base, floors.rel(batch.label, "logits", seq, n_logits),
                                batch.label)
        if logits.rel == float("inf"):
            la = logits_a.double()[real.to(logits_a.device)]
            lb = logits_b.double().to(la.device)[real.to(la.device)]
            logits.nonfinite = _nonfinite(a, b, la, lb, batch, report, "logits")
    return results, logits, act


def _nonfinite(a: Side, b: Side, ta, tb, batch: Batch, report: EquivalenceReport, name: str) -> str:
    """Say which side is non-finite where; a non-finite reference marks the batch unusable (once), with
    the settings of the reference that are finite on it. In attention scores -inf is a masked key: a
    difference there is a difference of masks, the candidate's finding."""
    if name.endswith("attn.hook_attn_scores") and not bool(ta.isnan().any() or tb.isnan().any()):
        more = int((torch.isneginf(tb) & ta.isfinite()).sum())
        fewer = int((torch.isneginf(ta) & tb.isfinite()).sum())
        return (f"the masks differ: model_a attends {more} (query, key) pairs model_b masks (-inf), and masks "
                f"{fewer} that model_b attends")
    a_bad, b_bad = one_sided(ta, tb)
    if bool(b_bad.any()):
        text = describe(f"model_b, {b.short()}", tb, b_bad, batch.describe(), "model_a")
        if batch.label not in report.unusable_batches:
            report.unusable_batches.append(batch.label)
            report.reference_unusable.append(f"the reference is unusable on {batch.describe()}: {text}")
            report.suggestions.extend(v for v in _working_variants(b, batch) if v not in report.suggestions)
        return text
    return describe(f"model_a, {a.short()}", ta, a_bad, batch.describe(), "model_b")


def _working_variants(b: Side, batch: Batch) -> list[str]:
    out = []
    for variant in b.variants():
        side = variant.build()
        if side is None:
            continue
        _, logits = side.run(batch.ids, batch.mask, [])
        if logits is not None and bool(logits[batch.real.to(logits.device)].isfinite().all()):
            out.append(f"{variant.description} is finite on the same inputs ({variant.cli})")
        del side
    return out


def _probe(a, b, names, floors, report, probe_len, seed, main_len):
    cfg = b.cfg
    if not probe_len:
        return
    both_stop = a.kind != "port" and b.kind != "port"
    wanted = [n for n in names if layer_of(n) is not None and n.split(".", 2)[-1] in PROBE_HOOKS]
    length = probe_length(cfg, probe_len, len(PROBE_HOOKS))
    if length <= main_len:
        report.notes.append(f"long probe skipped: its length ({length}, capped by max_position_embeddings "
                            f"{cfg.max_position_embeddings} and memory) is not beyond the inputs' ({main_len})")
        return
    if not wanted and both_stop:
        return
    probe = Batch("probe", random_ids(cfg, 1, length, seed), None)
    # Stopping after the last block skips the unembedding ([length vocab], the largest tensor here): only a
    # port without the streams needs the probe's logits compared.
    stop = cfg.num_hidden_layers if both_stop else None
    report.probe, report.probe_logits, _ = _run_batch(a, b, probe, wanted, floors, report, stop_at_layer=stop,
                                                      want_logits=not wanted)
    report.probe_shape = [1, length]


def _decoding(a: Side, b: Side, cfg, floors: Floors, tol: Tolerance, steps: int, seed: int) -> DecodingResult | None:
    steps = min(steps, cfg.max_position_embeddings - 2)
    prompt = max(1, min(16, cfg.max_position_embeddings - steps - 1))
    if steps < 1 or not (a.can_generate or b.can_generate):
        return None
    ids = random_ids(cfg, DECODE_ROWS, prompt, seed + 2)
    result = DecodingResult(prompt_len=prompt, steps=steps, rows=DECODE_ROWS)
    decoded = {side.label: decode(side, ids, steps) for side in (a, b) if side.can_generate}
    for side in (a, b):
        if not side.can_step:
            result.skipped[side.label] = f"{side.label} cannot decode with a KV cache ({side.short()}: no step)"
            continue
        # Bounds from the rounding of what this side decoded (the main batch may be one position long).
        mine = decoded[side.label]
        floors.measure(Batch(f"decoding {side.label}", mine.ids, None), [],
                       floors.measurer.run(mine.ids, None, []) if floors.measurer is not None else ({}, None))
        result.consistency[side.label] = check_consistency(
            side, mine, prompt, lambda pos, side=side: floors.self_rel(
                side, f"decoding {side.label}", prompt + steps, pos, DECODE_ROWS * cfg.vocab_size))
    if a.can_generate and b.can_generate:
        result.greedy = compare_greedy(decoded["model_a"], decoded["model_b"], b, prompt,
                                       floors.rel(f"decoding {b.label}", "logits", prompt + steps), tol.abs)
    else:
        who = a.label if not a.can_generate else b.label
        result.skipped["greedy"] = f"greedy generation not compared: {who} cannot generate"
    return result


def _select(hooks, a: Side, b: Side) -> tuple[list[str], dict[str, str]]:
    """The hook names to compare (forward order), and those left out with the reason."""
    cfg = b.cfg
    registry = list(hook_names(cfg))
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
            raise KeyError(unknown_hook_message(name, registry, cfg.use_parallel_residual))
    order = {n: i for i, n in enumerate(registry)}
    wanted = sorted(set(wanted), key=order.__getitem__)
    missing = {**b.unobservable(wanted), **a.unobservable(wanted)}
    return [n for n in wanted if n not in missing], {n: missing[n] for n in wanted if n in missing}


def _call(fn: Callable[[str], bool], name: str) -> bool:
    return bool(fn(name))
