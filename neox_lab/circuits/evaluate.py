"""Running a circuit: the model with every edge outside a chosen set ablated, and the metric it gives.

In the circuit's run (on the clean input) each receiver reads, from each sender upstream of it, the
sender's output in this run when the edge is in the circuit, and the ablated value otherwise:

    input_r = (input_r as the run computed it) + sum over edges s -> r not in the circuit of
              (ablated_s - out_s(this run))

ablation="corrupted": the sender's output on the corrupted input (an interchange intervention);
"mean": its output on the corrupted input averaged over rows and real positions; "mean-positional":
averaged over rows only, per position. With every edge in the circuit the run is the clean run; with
none (and "corrupted") every receiver reads exactly what it reads in the corrupted run, so the metric
is the corrupted one. EAP-IG's ``evaluate_graph``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from einops import einsum

from . import plotting
from .runs import Inputs, Metric, metric_value, prepare, record, tile
from .streams import ABLATE, Streams, stream_flags, transformers_view, write_outputs

__all__ = ["ABLATIONS", "FaithfulnessCurve", "evaluate", "evaluate_many", "faithfulness"]

ABLATIONS = ("corrupted", "mean", "mean-positional")


def evaluate(model, graph, edges: Iterable[str], clean, corrupted, metric: Metric, *, ablation: str = "corrupted",
             attention_mask=None, logits_to_keep: int = 0) -> float:
    """`metric` of the circuit `edges` (edge names of `graph`) run on `clean`, every other edge
    ablated (see the module docstring); a float."""
    return evaluate_many(model, graph, [edges], clean, corrupted, metric, ablation=ablation,
                         attention_mask=attention_mask, logits_to_keep=logits_to_keep)[0]


def evaluate_many(model, graph, edge_sets: Sequence[Iterable[str]], clean, corrupted, metric: Metric, *,
                  ablation: str = "corrupted", attention_mask=None, batch_size: int = 64,
                  logits_to_keep: int = 0) -> list[float]:
    """`evaluate` for each edge set in `edge_sets`, several circuits per forward (at most `batch_size`
    rows)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (rows per forward), got {batch_size!r}")
    if isinstance(edge_sets, (str, Mapping)):
        raise ValueError("edge_sets must be a list of edge-name collections (one per circuit)")
    model = transformers_view(model)
    inp = prepare(model, graph, clean, corrupted, attention_mask, logits_to_keep)
    sets = [graph.check_edges(edges, what=f"edge_sets[{k}]") for k, edges in enumerate(edge_sets)]
    streams = Streams(graph)
    sender, receiver = graph.endpoints
    values = []
    with stream_flags(model):
        ablated = _ablated_outputs(model, streams, inp, ablation)
        per_forward = max(1, batch_size // inp.batch)
        for start in range(0, len(sets), per_forward):
            chunk = sets[start:start + per_forward]
            # [circuits senders receivers]: 1 where an edge is ablated (real and not in the circuit)
            off = torch.zeros(len(chunk), len(graph.senders), len(graph.receivers), dtype=ablated.dtype,
                              device=ablated.device)
            off[:, sender, receiver] = 1.0
            for c, edges in enumerate(chunk):
                kept = torch.tensor([graph.edge_index[e] for e in edges], dtype=torch.long)
                off[c, sender[kept], receiver[kept]] = 0.0
            values += _run_circuits(model, streams, inp, metric, ablated, off)
    return values


def _ablated_outputs(model, streams: Streams, inp: Inputs, ablation: str) -> torch.Tensor:
    """What an ablated edge carries, per sender: [senders, batch or 1, pos or 1, d_model]."""
    outputs = record(model, streams, inp.corrupted, inp.mask, inp.fwd).outputs
    if ablation == "corrupted":
        return outputs
    if inp.mask is None:
        weights = torch.ones(outputs.shape[1:3], dtype=outputs.dtype, device=outputs.device)
    else:
        weights = inp.mask.to(outputs.device, outputs.dtype)
    weighted = outputs * weights[None, :, :, None]
    if ablation == "mean-positional":
        # pad positions of a row do not count; a position padded in every row averages nothing: 0
        return weighted.sum(1, keepdim=True) / weights.sum(0).clamp(min=1.0)[None, None, :, None]
    return weighted.sum((1, 2), keepdim=True) / weights.sum().clamp(min=1.0)


def _run_circuits(model, streams: Streams, inp: Inputs, metric: Metric, ablated: torch.Tensor,
                  off: torch.Tensor) -> list[float]:
    graph = streams.graph
    copies, batch = off.shape[0], inp.batch
    current: list[torch.Tensor | None] = [None]  # this run's sender outputs, [senders rows pos d_model]

    def keep(sender):
        def hook(x, *, hook):
            if current[0] is None:
                current[0] = x.new_zeros((len(graph.senders), *x.shape[:2], x.shape[-1]), dtype=ablated.dtype)
            write_outputs(current[0], sender, x)
        return hook

    def rebuild(receiver):
        up, ids = receiver.upstream, torch.tensor(receiver.receivers, device=off.device)

        def hook(x, *, hook):
            now = current[0][:up]
            # what each ablated edge carries, for every circuit's rows (a mean broadcasts over them)
            carried = ablated[:up] if ablated.shape[1] == 1 else ablated[:up].repeat(1, copies, 1, 1)
            change = carried - now
            change = change.reshape(up, copies, batch, *change.shape[2:])
            update = einsum(change, off[:, :up][:, :, ids], ABLATE).flatten(0, 1)  # [rows pos receivers d_model]
            update = update if receiver.per_head else update.squeeze(-2)
            return x + update.to(x.device, x.dtype)
        return hook

    hooks = [(s.name, keep(s)) for s in streams.senders] + [(r.name, rebuild(r)) for r in streams.receivers]
    with torch.no_grad():
        logits = model.run_with_hooks(tile(inp.clean, copies), attention_mask=inp.mask_for(copies),
                                      fwd_hooks=hooks, **inp.fwd).logits
    return [float(metric_value(metric, logits[c * batch:(c + 1) * batch], "evaluate")) for c in range(copies)]


# ---------------------------------------------------------------------------------------------- curves
@dataclass
class FaithfulnessCurve:
    """Circuits of growing size and their metric. `counts[i]` edges were chosen, `edges[i]` is the
    circuit evaluated (pruned, so possibly fewer), `values[i]` its metric; `clean_value` is the
    clean model's metric, `corrupted_value` the empty circuit's."""

    counts: list[int]
    values: list[float]
    edges: list[list[str]]
    clean_value: float
    corrupted_value: float
    total_edges: int
    method: str = ""

    @property
    def fractions(self) -> list[float]:
        """Each value as a fraction of the gap: (value - corrupted) / (clean - corrupted)."""
        gap = self.clean_value - self.corrupted_value
        return [(v - self.corrupted_value) / gap if gap != 0 else float("nan") for v in self.values]

    @property
    def sizes(self) -> list[int]:
        """How many edges each evaluated (pruned) circuit has."""
        return [len(e) for e in self.edges]

    def smallest(self, fraction: float) -> int | None:
        """Index of the first (smallest) circuit recovering at least `fraction` of the gap, or None."""
        return next((i for i, f in enumerate(self.fractions) if f >= fraction), None)

    def plot(self, others: Mapping[str, FaithfulnessCurve] | None = None, *, title: str | None = None,
             save: str | os.PathLike | None = None):
        """The curve (and `others`, by label) as a matplotlib Figure; ``save=`` writes a PNG."""
        curves = {self.method or "circuit": self, **(others or {})}
        if any(c.counts != self.counts for c in curves.values()):
            raise ValueError("faithfulness curves drawn together must share their counts")
        return plotting.faithfulness_curve(self.counts, {k: c.fractions for k, c in curves.items()},
                                           total_edges=self.total_edges, title=title, save=save)


def faithfulness(model, graph, scores: Mapping[str, float], clean, corrupted, metric: Metric,
                 counts: Sequence[int] | None = None, *, select: str = "top", ablation: str = "corrupted",
                 attention_mask=None, batch_size: int = 64, logits_to_keep: int = 0,
                 method: str = "") -> FaithfulnessCurve:
    """Evaluate the circuits of the best `counts` edges by `scores` (``select="top"``: `Graph.top_edges`;
    "greedy": `Graph.greedy`), each pruned (`Graph.prune`, which leaves its metric unchanged).
    Default counts: 0, 1, 2, 4, ... up to every edge."""
    if select not in ("top", "greedy"):
        raise ValueError(f"select must be 'top' or 'greedy', got {select!r}")
    total = len(graph)
    if counts is None:
        counts = [0] + [2**k for k in range(total.bit_length()) if 2**k < total] + [total]
    counts = [int(n) for n in counts]
    choose = graph.top_edges if select == "top" else graph.greedy
    order = choose(scores, total)
    sets = [graph.prune(order[:n]) for n in counts]
    values = evaluate_many(model, graph, [graph.edges, [], *sets], clean, corrupted, metric, ablation=ablation,
                           attention_mask=attention_mask, batch_size=batch_size, logits_to_keep=logits_to_keep)
    return FaithfulnessCurve(counts, values[2:], sets, values[0], values[1], total, method)
