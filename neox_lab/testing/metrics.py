"""The numbers `compare` reports: normwise errors over real positions, per-head errors, and the
logits checks (error, top-1 agreement, KL) with their bounds."""

from __future__ import annotations

import math

import torch

from .results import LogitsResult
from .tolerance import UNIT_ROUNDOFF, Tolerance

#: Constant of the KL computation's own rounding noise (see `kl_noise`).
KL_NOISE_C = 16.0


def allows(err: float, ref: float, n: int, rel: float, abs_: float) -> bool:
    """||a - b|| = err within rel ||b|| + abs sqrt(n) (NaN never is)."""
    if math.isnan(err):
        return False
    return err <= rel * ref + abs_ * math.sqrt(max(n, 1))


def real_entries(t: torch.Tensor, shape: str, real: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """The entries at real positions, as fp64 [n_real ...] (every hook stream has batch first), and the
    names of the remaining axes."""
    dims = shape.split()
    axis = next((dims.index(a) for a in ("pos", "query_pos") if a in dims), None)
    t = t.to(torch.float64)
    if axis is None or tuple(t.shape[:1]) + (t.shape[axis],) != tuple(real.shape):
        return t, dims
    rest = [d for i, d in enumerate(dims) if i not in (0, axis)]
    return t.movedim(axis, 1)[real.to(t.device)], ["real"] + rest


def errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, int]:
    """(max |a - b|, ||a - b||, ||b||, n). Equal infinities (masked scores) count as agreeing; a
    non-finite value on one side only is an infinite error."""
    b = b.to(a.device)
    diff = a - b
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    if math.isfinite(max_abs):
        # Fast path: inf - x, x - inf and NaN all leave a non-finite difference, so both sides are finite.
        return max_abs, float(diff.norm()), float(b.norm()), a.numel()
    same = (a == b) | (a.isnan() & b.isnan())
    finite = a.isfinite() & b.isfinite()
    if bool((~same & ~finite).any()):
        return float("inf"), float("inf"), float(b[finite].norm()), a.numel()
    diff = torch.where(same, torch.zeros_like(a), a - b)
    ref = torch.where(finite, b, torch.zeros_like(b))
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    return max_abs, float(diff.norm()), float(ref.norm()), a.numel()


def ratio(err: float, ref: float) -> float:
    if err == 0.0:
        return 0.0
    return err / ref if ref > 0 else float("inf")


def failing_positions(a: torch.Tensor, b: torch.Tensor, dims: list[str], real: torch.Tensor, rel: float,
                      abs_: float) -> tuple[list[int], int]:
    """For a stream over real positions (first axis "real"): the columns whose own slice leaves the floor
    (first few, sorted) and how many real positions fail."""
    if not dims or dims[0] != "real" or a.shape[0] != int(real.sum()):
        return [], 0
    cols = real.nonzero()[:, 1].to(a.device)
    diff = (a - b).flatten(1)
    ref = b.flatten(1)
    n = diff.shape[1]
    same = (a.flatten(1) == ref) | (a.flatten(1).isnan() & ref.isnan())
    diff = torch.where(same, torch.zeros_like(diff), diff)
    err = diff.nan_to_num(nan=math.inf).norm(dim=1)
    bound = rel * torch.where(ref.isfinite(), ref, torch.zeros_like(ref)).norm(dim=1) + abs_ * math.sqrt(max(n, 1))
    bad = err > bound
    positions = sorted({int(c) for c in cols[bad].tolist()})
    return positions[:8], int(bad.sum())


def per_head_failures(a: torch.Tensor, b: torch.Tensor, dims: list[str], n_heads: int, rel: float,
                      abs_: float) -> list[int]:
    """Heads whose own slice of a head-shaped stream leaves the floor, worst first."""
    if "n_heads" not in dims:
        return []
    axis = dims.index("n_heads")
    if a.shape[axis] != n_heads:
        return []
    out = []
    for h in range(n_heads):
        _, err, ref, n = errors(a.select(axis, h), b.select(axis, h))
        if not allows(err, ref, n, rel, abs_):
            out.append((-(err / ref if ref > 0 else math.inf), h))
    return [h for _, h in sorted(out)]


def kl_noise(logits: torch.Tensor) -> float:
    """The rounding noise of computing KL(p_b || p_a) itself, for rows that differ at all.

    KL = sum_v p_v (log p_b,v - log p_a,v) with log p = x - logsumexp(x): each log-probability carries
    an absolute rounding error of about u (|x_v| + |lse|), so the computed KL is uncertain by about
    u * sum_v p_v (|x_v| + |lse|) even when the true KL is ~0. Bounds below this (e.g. the fp64 logits
    floor squared, ~1e-25) would call every fp64 comparison with any logit difference a failure.
    """
    u = UNIT_ROUNDOFF["float64"]  # the KL is computed in fp64 after casting
    lse = logits.logsumexp(-1, keepdim=True)
    p = (logits - lse).exp()
    scale = (p * (logits.abs() + lse.abs())).sum(-1)
    return float(KL_NOISE_C * u * scale.mean()) if scale.numel() else 0.0


def compare_logits(la: torch.Tensor, lb: torch.Tensor, real: torch.Tensor, tol: Tolerance,
                   rel_bound: float, batch: str = "main") -> LogitsResult:
    """The logits checks over real positions, against the relative bound `rel_bound` (tol gives the
    absolute floor, the top-1 requirement and a fixed KL bound if it has one)."""
    if la.shape != lb.shape:
        raise ValueError(f"logits: model_a gives {tuple(la.shape)}, model_b {tuple(lb.shape)}")
    a, b = la.to(torch.float64), lb.to(device=la.device, dtype=torch.float64)
    if a.dim() >= 3 and tuple(a.shape[:2]) == tuple(real.shape):
        a, b = a[real.to(a.device)], b[real.to(a.device)]  # per-position outputs: real positions only
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    max_abs, err, ref, n = errors(a, b)
    ca, cb = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    _, c_err, c_ref, _ = errors(ca, cb)
    # The per-logit scale of the bound, row by row: a near tie within twice of it may flip.
    per_logit = rel_bound * b.pow(2).mean(-1).sqrt() + tol.abs
    top_a, top_b = a.argmax(-1), b.argmax(-1)
    agree = top_a == top_b
    margin = b.gather(-1, top_b[:, None]).squeeze(-1) - b.gather(-1, top_a[:, None]).squeeze(-1)
    within = agree | (margin <= 2 * per_logit)
    logp_a, logp_b = a.log_softmax(-1), b.log_softmax(-1)
    kl = (logp_b.exp() * (logp_b - logp_a)).sum(-1).clamp_min(0.0)
    rows = a.shape[0]
    noise = kl_noise(b[b.isfinite().all(-1)]) if rows else 0.0
    kl_bound = tol.kl if tol.kl is not None else max(float((per_logit.pow(2) / 2).mean()), noise)
    return LogitsResult(
        shape=list(la.shape), n_rows=rows, max_abs=max_abs, rel=ratio(err, ref), bound=rel_bound,
        passed_error=allows(err, ref, n, rel_bound, tol.abs),
        top1_agreement=float(agree.double().mean()) if rows else 1.0,
        top1_within_noise=float(within.double().mean()) if rows else 1.0,
        top1_required=tol.top1_agreement,
        kl_mean=float(kl.mean()) if rows else 0.0, kl_max=float(kl.max()) if rows else 0.0,
        kl_bound=kl_bound, kl_noise=noise, batch=batch, rel_centered=ratio(c_err, c_ref),
    )
