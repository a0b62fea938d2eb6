"""The text form of an `EquivalenceReport` (what `neox-lab compare` prints): config differences,
changed weights, the per-hook table, the logits line, the long probe, skipped hooks, the verdict."""

from __future__ import annotations


def render_table(report, only_failures: bool = False) -> str:
    """Fixed-width text; `only_failures` keeps only failing hooks (config and weight findings always show)."""
    tol = report.tolerance
    paths = {k: (report.provenance.get(f"checkpoint_{k}") or {}).get("argument") for k in "ab"}
    lines = [f"A: {paths['a'] + ': ' if paths['a'] else ''}{report.model_a}",
             f"B: {paths['b'] + ': ' if paths['b'] else ''}{report.model_b} (reference)"]
    if tol is not None:
        growth = " x sqrt(depth)" if tol.depth_growth else ""
        lines.append(f"tolerance: {tol.label}: rel {tol.rel:.2e}{growth}, abs {tol.abs:.2e}; "
                     f"{report.n_positions} real positions; mode {report.mode}")
    lines.extend(_config_lines(report))
    lines.extend(_weight_lines(report))
    if report.skipped_all:
        lines.append(f"activations not compared: {report.skipped_all}")
    if report.hooks:
        lines.append(_hook_header())
        first = report.first_divergence
        for h in report.hooks:
            if not (only_failures and h.passed):
                lines.append(_hook_line(h, first))
    lg = report.logits
    if lg is not None:
        lines.append(f"{'logits':<34} {'':>5} {lg.max_abs:>10.2e} {lg.rel:>10.2e} {lg.bound:>10.2e}  "
                     f"{'ok' if lg.passed_error else 'FAIL'}")
        lines.append(f"top-1 agreement {lg.top1_agreement:.4f} (near ties excused: {lg.top1_within_noise:.4f}, "
                     f"required {lg.top1_required}); KL(b||a) mean {lg.kl_mean:.2e} max {lg.kl_max:.2e} "
                     f"(bound {lg.kl_bound:.2e}, of which computing noise {lg.kl_noise:.2e})")
    if report.mode == "lossy":
        growth = [f"{h.layer}:{h.rel:.2e}" for h in report.hooks if h.name.endswith("hook_resid_post")]
        if growth:
            lines.append("error growth, resid_post rel by layer: " + " ".join(growth))
    if report.probe:
        lines.append(f"long rotary probe, {'x'.join(map(str, report.probe_shape))} random ids:")
        first = report.first_divergence
        for h in report.probe:
            if not (only_failures and h.passed):
                lines.append(_hook_line(h, first))
    if report.skipped:
        reasons: dict[str, int] = {}
        for reason in report.skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        lines.extend(f"skipped {n} hook(s): {reason}" for reason, n in reasons.items())
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
    if h is first:
        mark += "  <- first divergence"
    return f"{h.name:<34} {layer:>5} {h.max_abs:>10.2e} {h.rel:>10.2e} {h.bound:>10.2e}  {mark}"


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
    return lines
