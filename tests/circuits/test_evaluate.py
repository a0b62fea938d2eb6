"""Circuit evaluation in fp64: the endpoints, agreement with exact edge patching, pruning, ablations."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attribute import RTOL, make_model, masked_metric, nonlinear_metric, run, sender_hook, token_pair

from neox_lab.circuits import Graph, attribute, evaluate, evaluate_many, faithfulness
from neox_lab.patching import logit_diff
from neox_lab.testing.strategies import token_batches

# The endpoints are the clean and corrupted runs rebuilt input by input as sums of sender outputs:
# they differ from those runs by rounding only (~1e-14 on metrics of size ~10 in fp64).
ENDPOINT_ATOL = 1e-10


@settings(deadline=None)  # examples: the hypothesis profile (tests/conftest.py)
@given(parallel=st.booleans(), n_layers=st.integers(1, 3), n_heads=st.integers(1, 3), seed=st.integers(0, 2**16),
       data=st.data())
def test_full_circuit_is_clean_and_empty_circuit_is_corrupted(parallel, n_layers, n_heads, seed, data):
    model = make_model(parallel, n_layers, n_heads, vocab=19, seed=seed)
    graph = Graph.from_model(model)
    batch = data.draw(token_batches(model.cfg, max_batch=3, max_len=7))
    clean = batch.input_ids
    corrupted = data.draw(token_batches(model.cfg, max_batch=3, max_len=7)).input_ids
    corrupted = corrupted[:clean.shape[0], :clean.shape[1]]
    if corrupted.shape != clean.shape:
        corrupted = torch.randint(0, 19, clean.shape, generator=torch.Generator().manual_seed(seed))
    corrupted = torch.where(batch.attention_mask.bool(), corrupted, clean)  # same padding
    mask = batch.attention_mask
    metric = masked_metric(mask, 19, seed)
    full, empty = evaluate_many(model, graph, [graph.edges, []], clean, corrupted, metric, attention_mask=mask)
    assert abs(full - float(run(model, clean, metric, mask=mask))) <= ENDPOINT_ATOL
    assert abs(empty - float(run(model, corrupted, metric, mask=mask))) <= ENDPOINT_ATOL


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_dropping_one_edge_is_exact_edge_patching(parallel):
    """Evaluating every edge but e runs the clean input with e alone carrying the corrupted output:
    exact patching's definition, computed by a different route (a whole-model rebuild vs one added
    change starting at the receiver's block)."""
    model = make_model(parallel, seed=3)
    graph = Graph.from_model(model)
    clean, corrupted = token_pair(23, seed=3)
    metric = nonlinear_metric(23, 2, 6, seed=3)
    exact = attribute(model, graph, clean, corrupted, metric, "exact")
    clean_value = float(run(model, clean, metric))
    values = evaluate_many(model, graph, [[f for f in graph.edges if f != e] for e in graph.edges], clean,
                           corrupted, metric, batch_size=50)
    scale = max([abs(clean_value)] + [abs(v) for v in exact.values()])
    for edge, value in zip(graph.edges, values):
        assert abs((value - clean_value) - exact[edge]) <= RTOL * scale, edge


def test_pruning_leaves_the_circuits_metric_unchanged():
    model = make_model(False, n_layers=3, seed=4)
    graph = Graph.from_model(model)
    clean, corrupted = token_pair(23, seed=4)
    metric = nonlinear_metric(23, 2, 6, seed=4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        edges = [e for e in graph.edges if torch.rand((), generator=gen) < 0.3]
        pruned = graph.prune(edges)
        assert len(pruned) < len(edges)
        for ablation in ("corrupted", "mean"):
            a, b = evaluate_many(model, graph, [edges, pruned], clean, corrupted, metric, ablation=ablation)
            assert abs(a - b) <= RTOL * abs(a), ablation


def test_mean_ablation_of_every_edge_is_the_run_on_mean_outputs():
    """With no edge kept, each input reads the biases plus every upstream sender's mean output: the run
    whose every node output is replaced by its mean over the corrupted batch (and positions, for "mean")."""
    model = make_model(True, seed=5)
    graph = Graph.from_model(model)
    clean, corrupted = token_pair(23, batch=3, seed=5)
    metric = nonlinear_metric(23, 3, 6, seed=5)
    names = sorted({sender_hook(graph, node)[0] for node in graph.senders})
    _, cache = model.run_with_cache(corrupted, names_filter=names)
    for ablation, dims in (("mean", (0, 1)), ("mean-positional", (0,))):
        def to_mean(x, *, hook, dims=dims):
            return cache[hook.name].mean(dims, keepdim=True).expand_as(x).clone()
        expected = float(run(model, clean, metric, [(n, to_mean) for n in names]))
        assert abs(evaluate(model, graph, [], clean, corrupted, metric, ablation=ablation) - expected) <= ENDPOINT_ATOL
    # every edge kept: the clean run whatever the ablation
    full = evaluate(model, graph, graph.edges, clean, corrupted, metric, ablation="mean")
    assert abs(full - float(run(model, clean, metric))) <= ENDPOINT_ATOL


def test_faithfulness_curve_runs_from_corrupted_to_clean(tmp_path):
    model = make_model(True, seed=6)
    graph = Graph.from_model(model)
    clean, corrupted = token_pair(23, seed=6)
    metric = nonlinear_metric(23, 2, 6, seed=6)
    scores = attribute(model, graph, clean, corrupted, metric, "EAP-IG")
    curve = faithfulness(model, graph, scores, clean, corrupted, metric, method="EAP-IG")
    assert curve.counts[0] == 0 and curve.counts[-1] == len(graph)
    assert abs(curve.fractions[0]) <= 1e-9 and abs(curve.fractions[-1] - 1) <= 1e-9
    assert all(size <= n for size, n in zip(curve.sizes, curve.counts))
    assert curve.smallest(0.999) is not None
    greedy = faithfulness(model, graph, scores, clean, corrupted, metric, [0, 5, 10, len(graph)], select="greedy",
                          method="greedy")
    assert greedy.edges[1] == graph.prune(graph.greedy(scores, 5))
    with pytest.raises(ValueError, match="share their counts"):
        curve.plot({"greedy": greedy})
    fig = curve.plot(save=tmp_path / "curve.png")
    assert len(fig.axes[0].lines) == 3 and (tmp_path / "curve.png").stat().st_size > 0


def test_bad_input_is_refused_before_any_run():
    model = make_model(True)
    graph = Graph.from_model(model)
    clean, corrupted = token_pair(23)
    metric = nonlinear_metric(23, 2, 6)
    with pytest.raises(ValueError, match="same shape"):
        evaluate(model, graph, [], clean, corrupted[:, :4], metric)
    with pytest.raises(ValueError, match=r"edge_sets\[1\]: 'nope' is not an edge"):
        evaluate_many(model, graph, [[], ["nope"]], clean, corrupted, metric)
    with pytest.raises(ValueError, match="ablation must be one of"):
        evaluate(model, graph, [], clean, corrupted, metric, ablation="zero")
    with pytest.raises(ValueError, match="attention_mask"):
        evaluate(model, graph, [], clean, corrupted, metric, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="must return a scalar"):
        evaluate(model, graph, [], clean, corrupted, lambda logits: logits[:, -1, 0])
    with pytest.raises(ValueError, match="method must be one of"):
        attribute(model, graph, clean, corrupted, metric, "ACDC")
    with pytest.raises(ValueError, match="ig_steps must be an int >= 1"):
        attribute(model, graph, clean, corrupted, metric, "EAP-IG", ig_steps=0)
    with pytest.raises(ValueError, match="integer token ids"):
        attribute(model, graph, clean.double(), corrupted, metric, "EAP")
    with pytest.raises(ValueError, match="differentiable"):
        attribute(model, graph, clean, corrupted, lambda logits: logits.detach().sum(), "EAP")
    assert not model.use_split_qkv_input and not model.use_hook_mlp_in  # the flags are restored after errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_run_every_method(dtype):
    """Sender changes and scores are kept in fp32 / fp64; the runs themselves are half precision."""
    model = make_model(True, seed=7).to(dtype)
    graph = Graph.from_model(model)
    clean, corrupted = token_pair(23, seed=7)
    metric = logit_diff(1, 2)
    for method in ("exact", "EAP", "EAP-IG", "EAP-IG-activations"):
        scores = attribute(model, graph, clean, corrupted, metric, method, ig_steps=2)
        assert all(torch.isfinite(torch.tensor(v)) for v in scores.values()), method
    full, empty = evaluate_many(model, graph, [graph.edges, []], clean, corrupted, metric)
    # The circuit's run computes each head from its own input copy (split inputs) and rebuilds inputs
    # as sums of half-precision outputs: rounding of ~1e-3 (fp16) / ~8e-3 (bf16) relative to the stream
    # (size ~1 here) moves this logit difference (size ~2) by far less than 0.1 through two layers.
    assert abs(full - float(run(model, clean, metric))) < 0.1
    assert abs(empty - float(run(model, corrupted, metric))) < 0.1
