"""Choosing a circuit from edge scores: the top n, greedy growth from the logits, pruning.

Pure graph operations on a `Graph` (passed in) and a ``{edge: score}`` mapping; `Graph.top_edges`,
`Graph.greedy` and `Graph.prune` call these.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

import torch

__all__ = ["greedy", "prune", "top_edges"]


def _check_n(n, total: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0 (how many edges to choose), got {n!r}")
    return min(n, total)


def _keys(values: torch.Tensor, absolute: bool) -> list[float]:
    return (values.abs() if absolute else values).tolist()


def top_edges(graph, scores: Mapping[str, float], n: int, *, absolute: bool = True) -> list[str]:
    """The `n` edges of `graph` with the largest score (|score| if `absolute`), best first, ties in
    the graph's edge order."""
    edges = graph.edges
    n = _check_n(n, len(edges))
    keys = _keys(graph.score_vector(scores), absolute)
    order = sorted(range(len(edges)), key=lambda i: (-keys[i], i))
    return [edges[i] for i in order[:n]]


def _incoming(graph) -> dict[str, list[int]]:
    """Node -> indices of the edges into any of its inputs."""
    into: dict[str, list[int]] = {node: [] for node in graph.nodes}
    _, receiver = graph.endpoints
    for i, r in enumerate(receiver.tolist()):
        into[graph.node_of(graph.receivers[r])].append(i)
    return into


def greedy(graph, scores: Mapping[str, float], n: int, *, absolute: bool = True) -> list[str]:
    """`n` edges grown from the logits: start with the edges into ``logits`` as candidates; take the
    best candidate (|score| if `absolute`), and when its sender is new to the circuit, make the edges
    into that sender candidates too; repeat. Every chosen edge's receiver is connected to the logits.
    EAP-IG's ``apply_greedy``. Returns the edges in the order chosen (fewer than `n` when the
    candidates run out)."""
    n = _check_n(n, len(graph.edges))
    keys = _keys(graph.score_vector(scores), absolute)
    sender, _ = graph.endpoints
    into = _incoming(graph)
    edges = graph.edges
    heap = [(-keys[i], i) for i in into["logits"]]
    heapq.heapify(heap)
    in_circuit = {"logits"}
    chosen = []
    while heap and len(chosen) < n:
        _, i = heapq.heappop(heap)
        chosen.append(edges[i])
        node = graph.senders[int(sender[i])]
        if node not in in_circuit:
            in_circuit.add(node)
            for j in into[node]:
                heapq.heappush(heap, (-keys[j], j))
    return chosen


def prune(graph, edges: Iterable[str]) -> list[str]:
    """`edges` less those whose receiving node has no path to ``logits`` through
    `edges`, in the graph's edge order. Such an edge feeds a node whose output reaches the logits only
    through ablated edges, so it cannot change the circuit's output under any ablation."""
    edges = graph.check_edges(edges)
    sender, receiver = graph.endpoints
    index = graph.edge_index
    ids = sorted({index[e] for e in edges})
    links = [(graph.senders[int(sender[i])], graph.node_of(graph.receivers[int(receiver[i])]), i) for i in ids]
    reach = {"logits"}
    # Senders come before their receivers in forward order, so one pass from the logits backwards
    # (edges sorted by receiver, latest first) settles every node.
    for src, dst, _ in sorted(links, key=lambda link: -int(receiver[link[2]])):
        if dst in reach:
            reach.add(src)
    return [graph.edges[i] for src, dst, i in links if dst in reach]
