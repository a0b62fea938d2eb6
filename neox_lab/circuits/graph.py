"""The computational graph of a NeoX model, as circuit discovery sees it: nodes, edges, their names.

Nodes (EAP-IG's names): ``input`` (the token embedding), ``a{L}.h{H}`` (each attention head's write
into the residual stream, `attn.hook_result`), ``m{L}`` (each MLP's output, `hook_mlp_out`),
``logits``. A node reads the residual stream through its *inputs*: a head through three (its query,
key and value inputs, ``a{L}.h{H}<q>`` / ``<k>`` / ``<v>``), an MLP and the logits through one. An
edge ``"a0.h3->a1.h1<k>"`` is one sender's output as one input reads it. Which edges exist follows
the block kind: in a parallel-residual block (every Pythia model) attention L and MLP L both read
the stream entering block L, so ``a{L}.h{H}->m{L}`` does not exist; in a sequential block MLP L
reads attention L's output too, and the edge does.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch

from . import plotting, select
from .streams import transformers_view

__all__ = ["ATTN_INPUTS", "Graph", "SavedGraph"]

#: The three inputs of an attention head, in the order edges list them.
ATTN_INPUTS = ("q", "k", "v")
#: What `Graph.save` writes as "format", and what `Graph.load` insists on.
FILE_FORMAT = "neox_lab.circuits.Graph"
FILE_VERSION = 1


class SavedGraph(NamedTuple):
    """What `Graph.load` returns: the graph, and the scores and circuit edges saved with it (or None)."""

    graph: Graph
    scores: dict[str, float] | None
    edges: list[str] | None


@dataclass(frozen=True)
class Graph:
    """The nodes and edges of a NeoX model with `n_layers` blocks of `n_heads` heads.

    `parallel` is the residual kind (``cfg.use_parallel_residual``); build it with
    `Graph.from_model(model)` so it matches the model. `edges` lists every edge name in a fixed order:
    by receiving input in forward order (``a0.h0<q>``, ``a0.h0<k>``, ``a0.h0<v>``, ``a0.h1<q>``, ...,
    ``m0``, ``a1.h0<q>``, ..., ``logits``), then by sender in forward order.
    """

    n_layers: int
    n_heads: int
    parallel: bool = True

    def __post_init__(self):
        for field in ("n_layers", "n_heads"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Graph {field} must be an int >= 1, got {value!r}")
        if not isinstance(self.parallel, bool):
            raise ValueError(f"Graph parallel must be a bool, got {self.parallel!r}")

    @classmethod
    def from_model(cls, model) -> Graph:
        """The graph of `model` (any hooked neox_lab model): its depth, width and residual kind."""
        cfg = transformers_view(model).cfg
        return cls(int(cfg.num_hidden_layers), int(cfg.num_attention_heads), bool(cfg.use_parallel_residual))

    # ------------------------------------------------------------------ nodes
    @cached_property
    def senders(self) -> list[str]:
        """Nodes that write into the residual stream, in forward order: input, a0.h0.., m0, a1.h0.., ..."""
        out = ["input"]
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{head}" for head in range(self.n_heads)] + [f"m{layer}"]
        return out

    @cached_property
    def receivers(self) -> list[str]:
        """Node inputs that read the residual stream, in forward order: a0.h0<q>, a0.h0<k>, .., m0, .., logits."""
        out = []
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{head}<{kind}>" for head in range(self.n_heads) for kind in ATTN_INPUTS]
            out.append(f"m{layer}")
        return out + ["logits"]

    @cached_property
    def nodes(self) -> list[str]:
        """Every node in forward order: input, a0.h0, .., m0, a1.h0, .., logits."""
        return self.senders + ["logits"]

    def layer_senders(self, layer: int) -> int:
        """How many senders write before block `layer` (the input and every node of blocks < layer)."""
        return 1 + layer * (self.n_heads + 1)

    def upstream(self, receiver: int) -> int:
        """How many senders (a prefix of `senders`) the receiver input with this index reads."""
        per_layer = 3 * self.n_heads + 1
        layer, slot = divmod(receiver, per_layer)
        if layer == self.n_layers:  # logits: everything
            return len(self.senders)
        if slot == 3 * self.n_heads and not self.parallel:  # a sequential MLP reads its own attention too
            return self.layer_senders(layer) + self.n_heads
        return self.layer_senders(layer)

    @staticmethod
    def node_of(receiver: str) -> str:
        """The node a receiver input belongs to: ``a1.h2<k>`` -> ``a1.h2``."""
        return receiver.split("<", 1)[0]

    @staticmethod
    def layer_of(node: str) -> int | None:
        """The block of a node or input (``a1.h2<k>`` -> 1, ``m3`` -> 3); None for input and logits."""
        if node in ("input", "logits"):
            return None
        return int(node[1:].split(".", 1)[0].split("<", 1)[0])

    # ------------------------------------------------------------------ edges
    @cached_property
    def edge_index(self) -> dict[str, int]:
        """Edge name -> its position in `edges`."""
        names = {}
        for r, receiver in enumerate(self.receivers):
            for s in range(self.upstream(r)):
                names[f"{self.senders[s]}->{receiver}"] = len(names)
        return names

    @property
    def edges(self) -> list[str]:
        """Every edge name, in the graph's fixed order (see the class docstring)."""
        return list(self.edge_index)

    @cached_property
    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sender index, receiver index) of every edge, as two int64 tensors in edge order."""
        pairs = [(s, r) for r in range(len(self.receivers)) for s in range(self.upstream(r))]
        sender, receiver = zip(*pairs)
        return torch.tensor(sender), torch.tensor(receiver)

    def __len__(self) -> int:
        return len(self.edge_index)

    def check_edges(self, edges: Iterable[str], what: str = "edges") -> list[str]:
        """`edges` as a list, each checked to be an edge of this graph (the error names the first that
        is not, with the closest names)."""
        if isinstance(edges, str):
            raise ValueError(f"{what} must be a collection of edge names, got the single string {edges!r}")
        edges = list(edges)
        for edge in edges:
            if edge not in self.edge_index:
                raise ValueError(self._unknown(edge, what))
        return edges

    def _unknown(self, edge, what: str) -> str:
        same = [e for e in self.edge_index if e.lower() == str(edge).lower()]
        close = same or difflib.get_close_matches(str(edge), self.edge_index, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        kind = "parallel" if self.parallel else "sequential"
        extra = ""
        if isinstance(edge, str) and "->" in edge and self.parallel:
            sender, receiver = edge.split("->", 1)
            if sender.startswith("a") and receiver.startswith("m") and self.layer_of(sender) == self.layer_of(receiver):
                extra = (" (a parallel-residual block's MLP reads the stream entering the block, not its own "
                         "attention's output)")
        return (f"{what}: {edge!r} is not an edge of this graph ({self.n_layers} layers x {self.n_heads} heads, "
                f"{kind} residual){extra}{hint}")

    def score_vector(self, scores: Mapping[str, float], what: str = "scores") -> torch.Tensor:
        """`scores` ({edge: score}, every edge present) as a float64 tensor in edge order."""
        if not isinstance(scores, Mapping):
            raise ValueError(f"{what} must be a mapping {{edge name: score}}, got {type(scores).__name__}")
        missing = [e for e in self.edge_index if e not in scores]
        extra = [e for e in scores if e not in self.edge_index]
        if extra:
            raise ValueError(self._unknown(extra[0], what))
        if missing:
            raise ValueError(f"{what} has no score for {len(missing)} of the graph's {len(self)} edges "
                             f"(first: {missing[0]!r}); pass the mapping `attribute` returned for this graph")
        values = torch.tensor([float(scores[e]) for e in self.edge_index], dtype=torch.float64)
        if not bool(torch.isfinite(values).all()):
            bad = self.edges[int((~torch.isfinite(values)).nonzero()[0])]
            raise ValueError(f"{what}[{bad!r}] is {scores[bad]!r}: scores must be finite")
        return values

    def check_model(self, model) -> None:
        """Raise unless this graph was built for `model`'s shape and residual kind."""
        other = Graph.from_model(model)
        if other != self:
            def describe(g):
                return f"{g.n_layers} layers x {g.n_heads} heads, {'parallel' if g.parallel else 'sequential'} residual"
            raise ValueError(f"the graph ({describe(self)}) does not match the model ({describe(other)}): build "
                             "it with Graph.from_model(model)")

    # ------------------------------------------------------------------ circuits
    def top_edges(self, scores: Mapping[str, float], n: int, *, absolute: bool = True) -> list[str]:
        """The `n` edges with the largest scores (by absolute value unless ``absolute=False``), best
        first; ties keep the graph's edge order."""
        return select.top_edges(self, scores, n, absolute=absolute)

    def greedy(self, scores: Mapping[str, float], n: int, *, absolute: bool = True) -> list[str]:
        """`n` edges grown from the logits backwards (see `neox_lab.circuits.greedy`), in the order added."""
        return select.greedy(self, scores, n, absolute=absolute)

    def prune(self, edges: Iterable[str]) -> list[str]:
        """`edges` without those whose receiving node has no path to the logits through `edges` (they
        cannot change the logits, so `evaluate` gives the same value), in the graph's edge order."""
        return select.prune(self, edges)

    # ------------------------------------------------------------------ drawing and files
    def draw(self, scores: Mapping[str, float] | None = None, edges: Iterable[str] | None = None, **kwargs):
        """A matplotlib Figure of the graph, nodes layered by layer, edge width by |score| (see
        `neox_lab.circuits.plotting.draw_graph` for the options; ``save=`` writes a PNG)."""
        values = None if scores is None else self.score_vector(scores)
        chosen = None if edges is None else self.check_edges(edges)
        return plotting.draw_graph(self, values, chosen, **kwargs)

    def to_json(self, scores: Mapping[str, float] | None = None, edges: Iterable[str] | None = None) -> dict:
        """The graph (and optionally scores and a circuit's edges) as a JSON-ready dict."""
        out = {"format": FILE_FORMAT, "version": FILE_VERSION, "n_layers": self.n_layers,
               "n_heads": self.n_heads, "parallel": self.parallel, "edges": self.edges}
        if scores is not None:
            out["scores"] = dict(zip(self.edges, self.score_vector(scores).tolist(), strict=True))
        if edges is not None:
            out["circuit"] = self.check_edges(edges)
        return out

    def save(self, path: str | os.PathLike, scores: Mapping[str, float] | None = None,
             edges: Iterable[str] | None = None) -> Path:
        """Write `to_json(scores, edges)` to `path`; returns the path."""
        path = Path(path)
        data = self.to_json(scores, edges)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path

    @classmethod
    def from_json(cls, data: Mapping, source: str = "graph JSON") -> SavedGraph:
        """Check a dict written by `to_json` and rebuild it; errors name `source` and the field."""
        if not isinstance(data, Mapping) or data.get("format") != FILE_FORMAT:
            raise ValueError(f"{source}: not a neox_lab circuit graph (its \"format\" is not {FILE_FORMAT!r})")
        if data.get("version") != FILE_VERSION:
            raise ValueError(f"{source}: \"version\" is {data.get('version')!r}; this neox_lab reads version "
                             f"{FILE_VERSION}")
        try:
            graph = cls(data.get("n_layers"), data.get("n_heads"), data.get("parallel"))
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        if data.get("edges") != graph.edges:
            raise ValueError(f"{source}: \"edges\" is not the edge list of a {graph.n_layers}-layer, "
                             f"{graph.n_heads}-head {'parallel' if graph.parallel else 'sequential'} graph "
                             "(the file was edited or written by something else)")
        scores = data.get("scores")
        if scores is not None:
            if not isinstance(scores, Mapping) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          and math.isfinite(v) for v in scores.values()):
                raise ValueError(f"{source}: \"scores\" must map every edge to a finite number")
            try:
                graph.score_vector(scores, what=f"{source}: \"scores\"")
            except ValueError as err:
                raise ValueError(str(err)) from None
            scores = {e: float(scores[e]) for e in graph.edges}
        circuit = data.get("circuit")
        if circuit is not None:
            if not isinstance(circuit, list):
                raise ValueError(f"{source}: \"circuit\" must be a list of edge names")
            circuit = graph.check_edges(circuit, what=f"{source}: \"circuit\"")
        return SavedGraph(graph, scores, circuit)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SavedGraph:
        """Read a file written by `save`: ``graph, scores, edges = Graph.load(path)`` (scores / edges
        None when the file holds none). The file is checked before anything is returned."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no graph file {str(path)!r}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_json(data, source=str(path))
