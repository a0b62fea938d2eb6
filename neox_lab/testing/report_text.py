"""The text form of an `EquivalenceReport` (what `neox-lab compare` prints): config differences,
changed weights, the per-hook table of each batch, the logits lines, the activation and decoding
checks, skipped hooks and notes, the verdict."""

from __future__ import annotations


def render_table(report, only_failures: bool = False) -> str:
    """Fixed-width text; `only_failures` keeps only failing hooks (config and weight findings always show)."""
    tol = report.tolerance
    paths = {k: (report.provenance.get(f"checkpoint_{k}") or {}).get("argument") for k in "ab"}
    lines = [f"A: {paths['a'] + ': ' if paths['a'] else ''}{report.model_a}",
             f"B: {paths['b'] + ': ' if paths['b'] else ''}{report.model_b} (reference)"]
    if tol is not None:
        lines.append(f"tolerance: {report.floors or tol.label}; abs {tol.abs:.2e}; {report.n_positions} real "
                     f"positions; mode {report.mode}")
    lines.extend(_config_lines(report))
    lines.extend(_weight_lines(report))
    if report.skipped_all:
        lines.append(f"activations not compared: {report.skipped_all}")
    first = report.first_divergence
    sections = [("main", report.hooks, report.logits, None),
                ("left-padded", report.padded, report.padded_logits, report.padded_shape),
                ("probe", report.probe, report.probe_logits, report.probe_shape)]
    for batch, hooks, logits, shape in sections:
        if not hooks and logits is None:
            continue
        if batch != "main":
            title = {"left-padded": "left-padded batch", "probe": "long probe through every layer"}[batch]
            unusable = " (not judged: the reference is unusable here)" if batch in report.unusable_batches else ""
            lines.append(f"{title}, {'x'.join(map(str, shape or []))}{' random ids' if batch == 'probe' else ''}"
                         f"{unusable}:")
        if hooks:
            lines.append(_hook_header())
            lines.extend(_hook_line(h, first) for h in hooks if not (only_failures and h.passed))
        if logits is not None:
            lines.extend(_logits_lines(logits))
    if report.mode == "lossy":
        growth = [f"{h.layer}:{h.rel:.2e}" for h in report.hooks if h.name.endswith("hook_resid_post")]
        if growth:
            lines.append("error growth, resid_post rel by layer: " + " ".join(growth))
    lines.extend(_activation_lines(report))
    lines.extend(_decoding_lines(report.decoding))
    if report.skipped:
        reasons: dict[str, int] = {}
        for reason in report.skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        lines.extend(f"skipped {n} hook(s): {reason}" for reason, n in reasons.items())
    lines.extend(f"note: {n}" for n in report.notes)
    reasons = report.reasons()
    if len(reasons) > 1:
        lines.append("findings, most basic first:")
        lines.extend(f"  - {r}" for r in reasons)
    lines.append(report.summary())
    return "\n".join(lines)


def _hook_header() -> str:
    return f"{'hook':<34} {'layer':>5} {'max abs':>10} {'rel err':>10} {'bound':>10}  ok"


def _hook_line(h, first) -> str:
    layer = "-" if h.layer is None else str(h.layer)
    mark = "ok" if h.passed else "FAIL"
    if not h.passed and h.heads:
        mark += " heads " + ",".join(map(str, h.heads))
    if not h.mean_passed and h.rel <= h.bound:
        mark += f" (its average over positions: {h.mean_rel:.2e} > {h.mean_bound:.2e})"
    if not h.passed and h.positions:
        mark += f" from pos {h.positions[0]} ({h.n_failing_positions} positions)"
    if h is first:
        mark += "  <- first divergence"
    if not h.passed and h.nonfinite:
        mark += f"  [{h.nonfinite}]"
    return f"{h.name:<34} {layer:>5} {h.max_abs:>10.2e} {h.rel:>10.2e} {h.bound:>10.2e}  {mark}"


def _logits_lines(lg) -> list[str]:
    out = [f"{'logits':<34} {'':>5} {lg.max_abs:>10.2e} {lg.rel:>10.2e} {lg.bound:>10.2e}  "
           f"{'ok' if lg.passed_error else 'FAIL'}" + (f"  [{lg.nonfinite}]" if lg.nonfinite else ""),
           f"top-1 agreement {lg.top1_agreement:.4f} (near ties excused: {lg.top1_within_noise:.4f}, "
           f"required {lg.top1_required}); KL(b||a) mean {lg.kl_mean:.2e} max {lg.kl_max:.2e} "
           f"(bound {lg.kl_bound:.2e}, of which computing noise {lg.kl_noise:.2e})"]
    return out


def _activation_lines(report) -> list[str]:
    pooled = next((a for a in report.activation if a.layer is None), None)
    if pooled is None:
        return []
    bad = [a for a in report.activation if not a.passed and a.layer is not None]
    state = "ok" if pooled.passed and not bad else "FAIL"
    line = (f"activation check ({pooled.act} of hook_pre, {pooled.n} values, {len(pooled.names)} layer(s)): {state}; "
            f"largest systematic error {pooled.worst_bias:.2e} of its size ({pooled.worst_z:.1f} standard errors)")
    if bad:
        line += "; failing layers " + ", ".join(str(a.layer) for a in bad)
    return [line]


def _decoding_lines(dec) -> list[str]:
    if dec is None:
        return []
    out = [f"decoding: prompt {dec.prompt_len} tokens, {dec.steps} steps with the KV cache, {dec.rows} rows"]
    for side, steps in dec.consistency.items():
        worst = max(steps, key=lambda s: s.rel / s.bound if s.bound else s.rel)
        state = "ok" if all(s.passed for s in steps) else "FAIL"
        out.append(f"  {side}: cache vs full forward {state}; worst rel {worst.rel:.2e} (bound {worst.bound:.2e}) at "
                   f"{'prefill' if worst.step == 0 else f'step {worst.step}'} (position {worst.position})")
    if dec.greedy:
        same = sum(g.first_difference is None for g in dec.greedy)
        out.append(f"  greedy generation: {same} of {len(dec.greedy)} rows token-identical"
                   + "".join(f"; row {g.row} differs from token {g.first_difference}"
                             f" ({'a near tie' if g.excused else 'FAIL'})" for g in dec.greedy if g.first_difference))
    out.extend(f"  skipped: {why}" for why in dec.skipped.values())
    return out


def _config_lines(report) -> list[str]:
    if not report.config:
        return ["config: identical"]
    return ["config differences:"] + [f"  {'FAIL' if d.changes_function else 'note'} {d.describe()}"
                                      for d in report.config]


def _weight_lines(report) -> list[str]:
    w = report.weights
    if w is None:
        return [] if report.skipped_all else ["weights: not compared"]
    changed = w.changed
    head = (f"weights: {len(w.tensors)} tensors compared elementwise (rounding bound of {w.rounding}); "
            f"{len(changed)} changed")
    if w.lossy_floor is not None:
        head += f"; lossy floor rel {w.lossy_floor:.2e}"
    lines = [head]
    for t in changed:
        mark = "ok (" + t.accepted_as + ")" if t.passed else "FAIL"
        lines.append(f"  {mark} {t.where()}: {t.n_changed} element(s), max abs {t.max_abs:.3g}, rel {t.rel:.3g}")
    lines.extend(f"  FAIL only in model_a: {n}" for n in w.only_a)
    lines.extend(f"  FAIL only in model_b: {n}" for n in w.only_b)
    lines.extend(f"  FAIL weight map: {p}" for p in w.problems)
    if w.unmatched:
        lines.append(f"  not compared ({len(w.unmatched)}, no counterpart; the activations judge them): "
                     + ", ".join(w.unmatched[:6]) + (" ..." if len(w.unmatched) > 6 else ""))
    return lines
