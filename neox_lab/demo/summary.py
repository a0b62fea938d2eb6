"""The demo's `summary.txt`: what the study found, in words and numbers."""

from __future__ import annotations

import math

import torch

from ..analysis.plotting import format_token
from .circuits import circuit_summary

#: A head whose mean attention to the induction target exceeds this is called an induction head (on the
#: demo's 31-token sequences a head attending uniformly to every earlier token scores about 0.05).
INDUCTION_THRESHOLD = 0.3


def token_strs(tok, ids) -> list[str]:
    """Each id decoded on its own (" word", not the BPE's "Ġword"), for labels."""
    return [tok.decode([int(i)]) for i in ids]


def induction_heads(scores: torch.Tensor,
                    threshold: float = INDUCTION_THRESHOLD) -> list[tuple[int, int, float]]:
    """(layer, head, score) of every head scoring above `threshold`, best first."""
    n_heads = scores.shape[1]
    found = [(int(i) // n_heads, int(i) % n_heads, float(scores.flatten()[i]))
             for i in scores.flatten().argsort(descending=True) if scores.flatten()[i] > threshold]
    return found


def summarize(res, tok) -> str:
    ind = res.induction
    cfg = res.model_cfg
    lines = [f"neox-lab demo on {res.model_name} ({cfg.num_hidden_layers} layers x {cfg.num_attention_heads} "
             f"heads, d_model {cfg.hidden_size}, vocab {cfg.vocab_size})", ""]
    heads = induction_heads(ind.scores)
    names = ", ".join(f"L{la}H{h} ({s:.2f})" for la, h, s in heads) or "none above the threshold"
    lines += [
        "1. Induction heads",
        f"   Sequence: [bos] + {ind.n} random word tokens, repeated twice ({ind.tokens.shape[0]} sequences).",
        f"   Induction heads (score > {INDUCTION_THRESHOLD}): {names}",
        "   Top heads: " + ", ".join(f"L{la}H{h} {s:.3f}" for la, h, s in ind.top_heads(3)),
        f"   Loss on the first copy {float(ind.copy_loss[0]):.2f} nats/token, on the second copy "
        f"{float(ind.copy_loss[1]):.2f} (the second copy is predictable only by copying from the first).",
        "",
    ]
    pr = res.prompts
    L, P = res.resid_patch.shape
    clean = [format_token(t) for t in token_strs(tok, pr.clean[0])]
    lines += [
        "2. Activation patching (clean -> corrupted; metric: logit(answer) - logit(corrupted answer) at the "
        "last position)",
        f"   Clean prompt 0: {' '.join(clean)}",
        f"   The corrupted prompt replaces the first copy's {clean[pr.position]!r} (position {pr.position}) "
        f"with {format_token(tok.decode([int(pr.wrong[0])]))!r}.",
        f"   Logit difference: clean {res.clean_diff:.2f}, corrupted {res.corrupted_diff:.2f} "
        f"(mean of {pr.clean.shape[0]} prompts); values below are the fraction of that gap restored.",
        "   resid_pre, best position per layer: " + "; ".join(
            f"L{layer}: pos {int(res.resid_patch[layer].argmax())} "
            f"({clean[int(res.resid_patch[layer].argmax())]!r}) {float(res.resid_patch[layer].max()):.2f}"
            for layer in range(L)),
    ]
    flat = res.head_patch.flatten()
    n_heads = res.head_patch.shape[1]
    top = [(int(i) // n_heads, int(i) % n_heads, float(flat[i])) for i in flat.argsort(descending=True)[:3]]
    lines += ["   Heads (hook_z, all positions), most important: "
              + ", ".join(f"L{la}H{h} {v:.2f}" for la, h, v in top), ""]
    lens = res.lens
    second = range(1 + pr.span, P - 1)  # second-copy positions that have a next token
    final_ok = [int(lens.top_ids[-1, 0, p]) == int(pr.clean[0, p + 1]) for p in second]
    lines += [
        "3. Logit lens (clean prompt 0, top token after each layer)",
        f"   On the second copy the final layer's top token is the actual next token at {sum(final_ok)}/"
        f"{len(final_ok)} positions.",
        "   Mean probability of the actual next token on the second copy, by depth: " + ", ".join(
            f"{label} {_nanmean(lens.target_probs[d, 0, 1 + pr.span:]):.2f}"
            for d, label in enumerate(lens.labels)),
        "",
    ]
    if res.circuit is not None:
        lines += circuit_summary(res.circuit, 4)
    if getattr(res, "dynamics", None) is not None:
        lines += dynamics_lines(res.dynamics, 5) + [""]
    lines += [
        f"Wall time: {res.wall_s:.1f} s. Figures: "
        + ", ".join(p.name for k, p in res.files.items() if k != "summary"),
    ]
    return "\n".join(lines) + "\n"


def _appearance(steps: list[int], scores: torch.Tensor, step: int | None) -> str:
    """"at step S (LxHy 0.93; best head 0.12 at step P)", or that no head gets there."""
    if step is None:
        return f"no head exceeds {INDUCTION_THRESHOLD} at any kept checkpoint"
    i = steps.index(step)
    layer, head = divmod(int(scores[i].argmax()), scores.shape[-1])
    before = f"; best head {float(scores[i - 1].max()):.2f} at step {steps[i - 1]}" if i else ""
    return f"at step {step} (L{layer}H{head} {float(scores[i].max()):.2f}{before})"


def dynamics_lines(dyn, number: int) -> list[str]:
    """Section `number` of the summary: the training-history sweep, the phase change, the sweep's cost."""
    computed = [t for t in dyn.timings if not t["resumed"]]
    load = sum(t["load_s"] for t in computed) / max(1, len(computed))
    analysis = sum(t["analysis_s"] for t in computed) / max(1, len(computed))
    return [
        f"{number}. Training dynamics (the shipped model's kept training checkpoints, swept in one model)",
        f"   Checkpoints at steps {', '.join(str(s) for s in dyn.steps)}.",
        "   Best induction head, held-out code tokens repeated: "
        + ", ".join(f"{float(b):.2f}" for b in dyn.best(dyn.induction)) + "; random word tokens: "
        + ", ".join(f"{float(b):.2f}" for b in dyn.best(dyn.words)) + ".",
        f"   Phase change: induction heads appear {_appearance(dyn.steps, dyn.induction, dyn.appear_step)} on "
        f"code tokens; on random word tokens {_appearance(dyn.steps, dyn.words, dyn.words_step)}.",
        "   In-context-learning score (loss of late minus early tokens, nats): "
        + ", ".join(f"{float(v):+.2f}" for v in dyn.icl) + ".",
        f"   Per checkpoint: load {load:.2f} s (in place), measurements {analysis:.2f} s.",
    ]


def _nanmean(t: torch.Tensor) -> float:
    vals = [float(v) for v in t.flatten() if not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")
