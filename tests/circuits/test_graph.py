"""The graph: node and edge names, the edge set of each residual kind, selection, pruning, JSON."""

import json

import pytest
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.circuits import Graph, greedy, prune, top_edges


def brute_force_edges(n_layers, n_heads, parallel):
    """Every (sender, input) pair where the input reads the sender, written out from the block
    equations: a head's q/k/v and a parallel MLP read resid_pre of their block, a sequential MLP
    reads resid_pre + its own attention, the logits read the final stream."""
    def writes_before(layer, include_own_attention):
        out = ["input"]
        for la in range(layer):
            out += [f"a{la}.h{h}" for h in range(n_heads)] + [f"m{la}"]
        if include_own_attention:
            out += [f"a{layer}.h{h}" for h in range(n_heads)]
        return out

    edges = set()
    for layer in range(n_layers):
        for h in range(n_heads):
            for kind in "qkv":
                edges |= {f"{s}->a{layer}.h{h}<{kind}>" for s in writes_before(layer, False)}
        edges |= {f"{s}->m{layer}" for s in writes_before(layer, not parallel)}
    edges |= {f"{s}->logits" for s in writes_before(n_layers, False)}
    return edges


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("n_layers,n_heads", [(1, 1), (2, 3), (4, 4)])
def test_edge_set_follows_the_block_equations(n_layers, n_heads, parallel):
    graph = Graph(n_layers, n_heads, parallel)
    assert set(graph.edges) == brute_force_edges(n_layers, n_heads, parallel)
    assert len(graph.edges) == len(set(graph.edges)) == len(graph)


def test_the_shipped_models_shape_has_463_edges_and_no_same_layer_mlp_edges():
    parallel, sequential = Graph(4, 4, True), Graph(4, 4, False)
    assert len(parallel) == 463 and len(sequential) == 463 + 4 * 4
    assert set(sequential.edges) - set(parallel.edges) == {f"a{la}.h{h}->m{la}" for la in range(4) for h in range(4)}
    assert "a0.h3->a1.h1<k>" in parallel.edge_index and "a0.h3->m2" in parallel.edge_index
    assert "m3->logits" in parallel.edge_index


def test_edge_order_is_stable_and_by_receiver_then_sender():
    graph = Graph(2, 2, True)
    assert graph.edges[:4] == ["input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>", "input->a0.h1<q>"]
    assert graph.edges[6] == "input->m0"
    assert graph.edges[7:10] == ["input->a1.h0<q>", "a0.h0->a1.h0<q>", "a0.h1->a1.h0<q>"]
    assert graph.edges[-1] == "m1->logits"
    assert Graph(2, 2, True).edges == graph.edges
    sender, receiver = graph.endpoints
    assert [f"{graph.senders[s]}->{graph.receivers[r]}" for s, r in zip(sender, receiver)] == graph.edges


@pytest.mark.parametrize("parallel", [True, False])
def test_from_model_reads_depth_width_and_residual_kind(parallel):
    cfg = NeoXConfig(vocab_size=31, hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                     intermediate_size=32, use_parallel_residual=parallel)
    graph = Graph.from_model(NeoXForCausalLM(cfg))
    assert (graph.n_layers, graph.n_heads, graph.parallel) == (3, 3, parallel)


def test_a_graph_of_another_shape_is_refused_with_a_fix():
    cfg = NeoXConfig(vocab_size=31, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=32, use_parallel_residual=True)
    with pytest.raises(ValueError, match=r"sequential residual.*does not match.*parallel.*Graph.from_model"):
        Graph(2, 3, False).check_model(NeoXForCausalLM(cfg))


def test_bad_names_and_shapes_are_refused():
    graph = Graph(2, 2, True)
    with pytest.raises(ValueError, match=r"'a0.h1->m0' is not an edge.*parallel-residual block's MLP"):
        graph.check_edges(["a0.h1->m0"])
    with pytest.raises(ValueError, match="did you mean 'a0.h1->a1.h0<k>'"):
        graph.check_edges(["a0.h1->a1.h0<K>"])
    with pytest.raises(ValueError, match="single string"):
        graph.check_edges("input->m0")
    with pytest.raises(ValueError, match="n_heads must be an int >= 1"):
        Graph(2, 0)
    scores = {e: 1.0 for e in graph.edges}
    with pytest.raises(ValueError, match="no score for 1"):
        graph.top_edges({e: v for e, v in list(scores.items())[1:]}, 3)
    with pytest.raises(ValueError, match="must be finite"):
        graph.top_edges({**scores, "m1->logits": float("nan")}, 3)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        graph.top_edges(scores, -1)


def random_scores(graph, seed=0):
    values = torch.randn(len(graph), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return dict(zip(graph.edges, values.tolist()))


def test_top_edges_by_absolute_or_signed_score():
    graph = Graph(2, 2, False)
    scores = random_scores(graph)
    best = graph.top_edges(scores, 5)
    assert best == sorted(graph.edges, key=lambda e: -abs(scores[e]))[:5]
    assert graph.top_edges(scores, 5, absolute=False) == sorted(graph.edges, key=lambda e: -scores[e])[:5]
    assert top_edges(graph, scores, 10**6) == sorted(graph.edges, key=lambda e: -abs(scores[e]))
    tied = {e: 1.0 for e in graph.edges}
    assert graph.top_edges(tied, 4) == graph.edges[:4]  # ties keep the graph's order


def test_greedy_grows_a_connected_circuit_from_the_logits():
    graph = Graph(3, 2, True)
    scores = random_scores(graph, seed=3)
    chosen = greedy(graph, scores, 12)
    assert len(chosen) == 12 and chosen == graph.greedy(scores, 12)
    in_circuit = {"logits"}
    for edge in chosen:  # each edge's receiver is already connected when it is chosen
        sender, receiver = edge.split("->")
        assert graph.node_of(receiver) in in_circuit, edge
        in_circuit.add(sender)
    assert prune(graph, chosen) == sorted(chosen, key=graph.edge_index.get)  # nothing to prune
    assert chosen[0] == max((e for e in graph.edges if e.endswith("->logits")), key=lambda e: abs(scores[e]))
    assert len(graph.greedy(scores, 10**6)) == len(graph)


def test_prune_drops_edges_into_nodes_that_do_not_reach_the_logits():
    graph = Graph(3, 2, True)
    edges = ["a1.h0->logits", "a0.h1->a1.h0<k>", "input->a0.h1<v>",  # a path to the logits
             "input->a2.h1<q>", "a0.h0->a2.h1<v>",  # a2.h1 reaches nothing
             "a0.h0->m1", "m1->a2.h1<k>"]  # m1 -> a2.h1, which reaches nothing
    assert graph.prune(edges) == sorted(edges[:3], key=graph.edge_index.get)
    assert graph.prune([]) == []
    assert graph.prune(graph.edges) == graph.edges


def test_json_round_trip_and_checks(tmp_path):
    graph = Graph(2, 3, False)
    scores = random_scores(graph)
    circuit = graph.top_edges(scores, 7)
    path = graph.save(tmp_path / "g.json", scores, circuit)
    loaded, loaded_scores, loaded_edges = Graph.load(path)
    assert loaded == graph and loaded_scores == scores and loaded_edges == circuit
    assert Graph.load(graph.save(tmp_path / "bare.json")) == (graph, None, None)

    data = json.loads(path.read_text())
    for change, message in [
        (dict(format="x"), "not a neox_lab circuit graph"),
        (dict(version=2), "version"),
        (dict(parallel=True), '"edges" is not the edge list'),
        (dict(n_layers=0), "n_layers must be an int"),
        (dict(scores={**scores, "m0->logits": "big"}), '"scores" must map every edge to a finite number'),
        (dict(scores={e: v for e, v in list(scores.items())[:-1]}), "no score for 1"),
        (dict(circuit=["a0.h0->m0", "nope"]), "'nope' is not an edge"),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**data, **change}))
        with pytest.raises(ValueError, match=message) as err:
            Graph.load(bad)
        assert str(bad) in str(err.value)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Graph.load(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="no graph file"):
        Graph.load(tmp_path / "missing.json")


def test_draw_weights_edges_by_score(tmp_path):
    graph = Graph(2, 2, False)
    scores = random_scores(graph)
    fig = graph.draw(scores, save=tmp_path / "all.png")
    widths = sorted(p.get_linewidth() for p in fig.axes[0].patches)
    assert len(widths) == len(graph) and widths[-1] == pytest.approx(6.0) and widths[0] < 1.0
    circuit = graph.greedy(scores, 5)
    fig = graph.draw(scores, edges=circuit, label_heads={"a1.h0": "induction"}, save=tmp_path / "c.png")
    assert len(fig.axes[0].patches) == 5
    assert (tmp_path / "all.png").stat().st_size > 0 and (tmp_path / "c.png").stat().st_size > 0
    assert len(graph.draw().axes[0].patches) == len(graph)  # no scores: every edge, thin


def test_a_class_with_a_transformers_view_is_read_through_it():
    """TransformerLens' HookedTransformer shares its modules with a transformers-convention model
    (`hf()`); circuits read that view's config and run it."""
    cfg = NeoXConfig(vocab_size=31, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=32, use_parallel_residual=False)
    core = NeoXForCausalLM(cfg)

    class LensLike:
        cfg = object()  # TransformerLens' field names, which Graph does not read

        def hf(self):
            return core

    assert Graph.from_model(LensLike()) == Graph(2, 3, False)
