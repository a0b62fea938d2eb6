"""The demo's circuit section: the induction circuit found by EAP-IG without being told where it is.

Clean prompt ``[bos] A_0..A_9 A_0..A_8`` (the answer A_9, by induction); the corrupted prompt replaces
the first copy's A_8 by a word X outside the span, so A_9 no longer follows an earlier A_8 and nothing
says what comes after the final A_8. Metric: logit(A_9) - logit(X) at the last position, mean over
prompts. Every edge of the model's graph is scored by EAP, EAP-IG and exact edge patching; the circuit
is the top 5% of edges by |EAP-IG| score (pruned), evaluated with every other edge carrying its
corrupted value. In an induction circuit, layer-0 heads write "the previous token was A_8" at A_9's
first position, and a layer-1 head whose query is the final A_8 finds it through its *key* input
(K-composition) and copies A_9.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..analysis.induction import repeated_tokens
from ..analysis.patching import logit_diff
from ..circuits import FaithfulnessCurve, Graph, attribute, evaluate, faithfulness
from ..circuits.agreement import spearman

__all__ = ["CircuitPrompts", "CircuitResult", "circuit_figures", "circuit_summary", "make_circuit_prompts",
           "study_circuit"]

SPAN = 10  # words per copy
BUDGET = 0.05  # the circuit: at most this fraction of the graph's edges
TARGET = 0.8  # the fraction of the clean - corrupted gap it should recover
IG_STEPS = 5
METHODS = ("EAP", "EAP-IG", "exact")


@dataclass
class CircuitPrompts:
    clean: torch.Tensor  # [batch pos]: bos, span A, A without its last word
    corrupted: torch.Tensor  # [batch pos]: clean with the first copy's A[-2] replaced by X
    answer: torch.Tensor  # [batch] A's last word
    wrong: torch.Tensor  # [batch] X
    position: int  # where the two differ


def make_circuit_prompts(candidates: torch.Tensor, batch: int, bos: int, gen: torch.Generator,
                         span: int = SPAN) -> CircuitPrompts:
    """`batch` clean/corrupted pairs (see the module docstring); X is not in A."""
    draws = repeated_tokens(candidates, span + 1, batch=batch, repeats=1, bos_token_id=None, generator=gen)
    a, x = draws[:, :span], draws[:, span]
    bos_col = torch.full((batch, 1), bos, dtype=torch.long)
    clean = torch.cat([bos_col, a, a[:, :-1]], dim=1)
    corrupted = clean.clone()
    corrupted[:, span - 1] = x  # A[-2] of the first copy
    return CircuitPrompts(clean, corrupted, a[:, -1], x, span - 1)


@dataclass
class CircuitResult:
    """What the circuit section found: scores per method, their agreement with exact patching, the
    faithfulness curves, and the circuit chosen by EAP-IG."""

    graph: Graph
    prompts: CircuitPrompts
    scores: dict[str, dict[str, float]]  # method -> {edge: score}
    seconds: dict[str, float]  # method -> wall time of `attribute`
    spearman: dict[str, float]  # method -> rank correlation of its scores with exact patching's
    spearman_abs: dict[str, float]  # the same for |scores|
    curves: dict[str, FaithfulnessCurve]  # method -> faithfulness curve of its top edges
    circuit: list[str]  # the chosen circuit (pruned)
    chosen: int  # how many top EAP-IG edges were taken before pruning
    value: float  # the circuit's metric
    induction_heads: list[tuple[int, int]] = field(default_factory=list)

    @property
    def clean_value(self) -> float:
        return self.curves["EAP-IG"].clean_value

    @property
    def corrupted_value(self) -> float:
        return self.curves["EAP-IG"].corrupted_value

    @property
    def recovered(self) -> float:
        """The circuit's metric as a fraction of the clean - corrupted gap."""
        return (self.value - self.corrupted_value) / (self.clean_value - self.corrupted_value)

    @property
    def k_composition(self) -> list[str]:
        """Circuit edges from a layer-0 head into a layer-1 induction head's key input."""
        heads = {f"a{layer}.h{head}" for layer, head in self.induction_heads if layer == 1}
        return [e for e in self.circuit if e.startswith("a0.") and e.endswith("<k>")
                and self.graph.node_of(e.split("->")[1]) in heads]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # The shipped model is tiny (d_model 96): most ops are too small for intra-op threads to pay, and on a
    # shared CPU the threads wait on each other. Measured on the 2-core development machine under load:
    # this section took 44 s with 2 threads, 10.6 s with 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def study_circuit(model, candidates: torch.Tensor, bos: int, gen: torch.Generator, *, batch: int = 8,
                  span: int = SPAN, induction_heads: list[tuple[int, int]] = ()) -> CircuitResult:
    """Score, compare, choose and evaluate (see the module docstring) on `batch` prompt pairs (with one
    intra-op thread: see `_one_thread`)."""
    with _one_thread():
        return _study(model, candidates, bos, gen, batch, span, list(induction_heads))


def _study(model, candidates, bos, gen, batch, span, induction_heads) -> CircuitResult:
    graph = Graph.from_model(model)
    prompts = make_circuit_prompts(candidates, batch, bos, gen, span)
    metric = logit_diff(prompts.answer, prompts.wrong)
    # The metric reads the last position only, so only it is unembedded (the vocabulary dominates).
    run = dict(logits_to_keep=1, batch_size=512)
    scores, seconds = {}, {}
    for method in METHODS:
        t0 = time.perf_counter()
        scores[method] = attribute(model, graph, prompts.clean, prompts.corrupted, metric, method,
                                   ig_steps=IG_STEPS, **run)
        seconds[method] = time.perf_counter() - t0
    agreement = {m: spearman(scores[m], scores["exact"]) for m in METHODS if m != "exact"}
    agreement_abs = {m: spearman(scores[m], scores["exact"], absolute=True) for m in METHODS if m != "exact"}
    budget = int(BUDGET * len(graph))
    counts = sorted({0, 1, 2, 4, 8, 12, 16, budget, 32, 64, 128, 256, len(graph)} & set(range(len(graph) + 1)))
    curves = {m: faithfulness(model, graph, scores[m], prompts.clean, prompts.corrupted, metric, counts,
                              method=m, **run) for m in METHODS}
    circuit = graph.prune(graph.top_edges(scores["EAP-IG"], budget))
    value = evaluate(model, graph, circuit, prompts.clean, prompts.corrupted, metric, logits_to_keep=1)
    return CircuitResult(graph, prompts, scores, seconds, agreement, agreement_abs, curves, circuit, budget, value,
                         induction_heads)


def circuit_figures(res: CircuitResult, out_dir: Path) -> dict:
    """The circuit drawn over the graph and the faithfulness curves; {name: (figure, path)}."""
    labels = {f"a{la}.h{h}": "induction" for la, h in res.induction_heads}
    labels.update({e.split("->")[0]: "K-composition" for e in res.k_composition})
    paths = {name: out_dir / f"{name}.png" for name in ("circuit_graph", "circuit_faithfulness")}
    graph_fig = res.graph.draw(
        res.scores["EAP-IG"], edges=res.circuit, label_heads=labels, save=paths["circuit_graph"],
        title=f"Induction circuit found by EAP-IG: {len(res.circuit)} of {len(res.graph)} edges, "
              f"{res.recovered:.0%} of the logit difference\n(q solid, k dashed, v dotted; width |score|)")
    curve = res.curves["EAP-IG"]
    curve_fig = curve.plot({m: c for m, c in res.curves.items() if m != "EAP-IG"}, save=paths["circuit_faithfulness"],
                           title="Circuits of the top-n edges by each method (corrupted ablation)")
    return {"circuit_graph": (graph_fig, paths["circuit_graph"]),
            "circuit_faithfulness": (curve_fig, paths["circuit_faithfulness"])}


def circuit_summary(res: CircuitResult, number: int) -> list[str]:
    """The section's lines of summary.txt."""
    times = ", ".join(f"{m} {res.seconds[m]:.1f} s" for m in METHODS)
    found = ", ".join(res.k_composition) or "none"
    strongest = sorted(res.circuit, key=lambda e: -abs(res.scores["EAP-IG"][e]))[:6]
    smallest = {m: c.smallest(TARGET) for m, c in res.curves.items()}
    reach = "; ".join(f"{m} {res.curves[m].counts[i]}" if i is not None else f"{m} more than {res.curves[m].counts[-2]}"
                      for m, i in smallest.items())
    absolute = res.spearman_abs
    pr = res.prompts
    return [
        f"{number}. Circuit discovery (clean [bos] A_0..A_{SPAN - 1} A_0..A_{SPAN - 2}; corrupted: the first "
        f"A_{SPAN - 2} replaced by a word X; metric logit(A_{SPAN - 1}) - logit(X) at the last position)",
        f"   Graph: {len(res.graph)} edges ({'parallel' if res.graph.parallel else 'sequential'} residual, so no "
        f"attention -> MLP edge within a block). Logit difference: clean {res.clean_value:.2f}, corrupted "
        f"{res.corrupted_value:.2f} (mean of {pr.clean.shape[0]} prompts).",
        f"   Rank correlation (Spearman) with exact edge patching over all edges: EAP {res.spearman['EAP']:.3f} "
        f"(|scores| {absolute['EAP']:.3f}), EAP-IG {IG_STEPS} steps {res.spearman['EAP-IG']:.3f} (|scores| "
        f"{absolute['EAP-IG']:.3f}). Time: {times}.",
        f"   Circuit: the top {res.chosen} edges by |EAP-IG| ({BUDGET:.0%} of the graph), {len(res.circuit)} after "
        f"pruning, recover {res.recovered:.1%} of the clean - corrupted logit difference.",
        f"   K-composition in it (a layer-0 head into a layer-1 induction head's key): {found}.",
        "   Strongest edges: " + ", ".join(f"{e} ({res.scores['EAP-IG'][e]:+.2f})" for e in strongest),
        f"   Fewest top edges recovering {TARGET:.0%}: {reach} (of the counts tried: "
        f"{', '.join(str(n) for n in res.curves['EAP-IG'].counts)}); with {res.chosen}: " + ", ".join(
            f"{m} {c.fractions[c.counts.index(res.chosen)]:.0%}" for m, c in res.curves.items()) + ".",
        "",
    ]
