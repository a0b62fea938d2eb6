"""Edge attribution against interventions built by hand, in fp64 on random small models.

The hand-built reference of edge s -> r never consults the graph's edge set: it runs the clean input
with every node's output frozen to its clean value except s's, set to its corrupted value, reads the
input r sees there, and puts that input (alone) into an otherwise clean run. An edge that does not
exist in the model therefore gets exactly 0 from the reference, whatever the graph claims.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.circuits import Graph, attribute, evaluate
from neox_lab.testing.pairs import make_trained_like
from neox_lab.testing.strategies import token_batches

# fp64 throughout: a patched metric differs from the hand-built one by rounding only, ~1e-13 relative
# to the metric's size (a few hundred ops of relative error 1.1e-16 on values of size ~|metric|).
# 1e-9 (relative to the largest |metric| or score in the test) leaves 4 orders of margin and still
# sees any real mistake, which moves a score by its own size.
RTOL = 1e-9


def make_model(parallel, n_layers=2, n_heads=2, head_dim=4, vocab=23, seed=0, rotary_pct=0.5):
    cfg = NeoXConfig(vocab_size=vocab, hidden_size=n_heads * head_dim, num_hidden_layers=n_layers,
                     num_attention_heads=n_heads, intermediate_size=16, rotary_pct=rotary_pct,
                     use_parallel_residual=parallel, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = NeoXForCausalLM(cfg, attn_backend="eager").double().eval()
    return make_trained_like(model, seed, 0.3)


def token_pair(vocab, batch=2, pos=6, seed=0, flips=(1, 3)):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (batch, pos), generator=gen)
    corrupted = clean.clone()
    for p in flips:
        if p < pos:
            corrupted[:, p] = (corrupted[:, p] + 1 + torch.randint(0, vocab - 1, (batch,), generator=gen)) % vocab
    return clean, corrupted


def masked_metric(mask, vocab, seed=1):
    """A metric of every real position (padding is not scored), non-linear in the logits."""
    weights = torch.randn(*mask.shape, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    weights = weights * mask[..., None]
    return lambda logits: (logits.log_softmax(-1) * weights).sum()


def nonlinear_metric(vocab, batch, pos, seed=1):
    weights = torch.randn(batch, pos, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lambda logits: (logits.log_softmax(-1) * weights[:, -logits.shape[1]:]).sum()


# ---------------------------------------------------------------------------------------------- reference
def sender_hook(graph, node):
    if node == "input":
        return "hook_embed", None
    layer = graph.layer_of(node)
    if node.startswith("m"):
        return f"blocks.{layer}.hook_mlp_out", None
    return f"blocks.{layer}.attn.hook_result", int(node.split(".h")[1])


def receiver_hook(graph, receiver):
    if receiver == "logits":
        return f"blocks.{graph.n_layers - 1}.hook_resid_post", None
    layer = graph.layer_of(receiver)
    if receiver.startswith("m"):
        return f"blocks.{layer}.hook_mlp_in", None
    head, kind = receiver.split(".h")[1].rstrip(">").split("<")
    return f"blocks.{layer}.hook_{kind}_input", int(head)


def run(model, tokens, metric, fwd_hooks=(), mask=None):
    with torch.no_grad():
        return metric(model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=fwd_hooks).logits)


def hand_built_edge_effect(model, graph, edge, clean, corrupted, metric, mask=None):
    """metric(only `edge` carries the corrupted sender output) - metric(clean), by freezing every node."""
    sender, receiver = edge.split("->")
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        outs = [sender_hook(graph, node)[0] for node in graph.senders]
        names = sorted(set(outs))
        _, clean_cache = model.run_with_cache(clean, names_filter=names, attention_mask=mask)
        _, corrupted_cache = model.run_with_cache(corrupted, names_filter=names, attention_mask=mask)
        s_name, s_head = sender_hook(graph, sender)

        def freeze(x, *, hook):
            x = clean_cache[hook.name].clone()
            if hook.name == s_name:
                if s_head is None:
                    x = corrupted_cache[hook.name].clone()
                else:
                    x[:, :, s_head] = corrupted_cache[hook.name][:, :, s_head]
            return x

        r_name, r_head = receiver_hook(graph, receiver)
        seen = {}

        def read(x, *, hook):
            seen["input"] = x.clone()

        run(model, clean, metric, [(n, freeze) for n in names] + [(r_name, read)], mask)

        def write(x, *, hook):
            x = x.clone()
            if r_head is None:
                return seen["input"]
            x[:, :, r_head] = seen["input"][:, :, r_head]
            return x

        return float(run(model, clean, metric, [(r_name, write)], mask) - run(model, clean, metric, (), mask))
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)


def assert_exact_matches_hand_built(model, graph, clean, corrupted, metric, edges=None, mask=None):
    scores = attribute(model, graph, clean, corrupted, metric, "exact", batch_size=8, attention_mask=mask)
    edges = graph.edges if edges is None else edges
    reference = {e: hand_built_edge_effect(model, graph, e, clean, corrupted, metric, mask) for e in edges}
    scale = max([abs(float(run(model, clean, metric, (), mask)))] + [abs(v) for v in reference.values()])
    for edge in edges:
        assert abs(scores[edge] - reference[edge]) <= RTOL * scale, (edge, scores[edge], reference[edge])


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_exact_edge_patching_is_the_hand_built_intervention_for_every_edge(parallel):
    model = make_model(parallel)
    graph = Graph.from_model(model)
    clean, corrupted = token_pair(23)
    assert_exact_matches_hand_built(model, graph, clean, corrupted, nonlinear_metric(23, 2, 6))


@settings(deadline=None)  # examples: the hypothesis profile (tests/conftest.py)
@given(parallel=st.booleans(), n_layers=st.integers(1, 3), n_heads=st.integers(1, 3),
       head_dim=st.sampled_from([2, 4, 6]), seed=st.integers(0, 2**16), rotary_pct=st.sampled_from([0.0, 0.5, 1.0]),
       data=st.data())
def test_exact_edge_patching_property(parallel, n_layers, n_heads, head_dim, seed, rotary_pct, data):
    """Random shapes, residual kinds and left/right padding (one attention_mask for both runs)."""
    model = make_model(parallel, n_layers, n_heads, head_dim, vocab=19, seed=seed, rotary_pct=rotary_pct)
    graph = Graph.from_model(model)
    batch = data.draw(token_batches(model.cfg, max_batch=3, max_len=6))
    clean, mask = batch.input_ids, batch.attention_mask
    gen = torch.Generator().manual_seed(seed)
    flips = torch.randint(1, 19, clean.shape, generator=gen)
    corrupted = torch.where(mask.bool() & (torch.rand(clean.shape, generator=gen) < 0.5), (clean + flips) % 19, clean)
    metric = masked_metric(mask, 19, seed)
    edges = data.draw(st.lists(st.sampled_from(graph.edges), min_size=1, max_size=12, unique=True))
    assert_exact_matches_hand_built(model, graph, clean, corrupted, metric, edges, mask=mask)


def test_the_sequential_edge_set_on_a_parallel_model_fails_the_exactness_test(monkeypatch):
    """The test above can fail: a graph drawn for a sequential block (GPT-2's, TransformerLens') has
    a{L}.h*->m{L} edges a parallel block lacks. attribute refuses such a graph; with that refusal
    switched off, its scores for those edges are non-zero and the hand-built reference says 0."""
    model = make_model(parallel=True)
    wrong = Graph(model.cfg.num_hidden_layers, model.cfg.num_attention_heads, parallel=False)
    clean, corrupted = token_pair(23)
    metric = nonlinear_metric(23, 2, 6)
    with pytest.raises(ValueError, match="does not match the model"):
        attribute(model, wrong, clean, corrupted, metric, "exact")
    monkeypatch.setattr(Graph, "check_model", lambda self, model: None)
    ghost = [e for e in wrong.edges if e not in Graph.from_model(model).edge_index]
    assert ghost == [f"a{la}.h{h}->m{la}" for la in range(2) for h in range(2)]
    clean_value = abs(float(run(model, clean, metric)))
    for edge in ghost:  # no such path: zero up to rounding (frozen heads are summed, not fused)
        assert abs(hand_built_edge_effect(model, wrong, edge, clean, corrupted, metric)) <= RTOL * clean_value
    with pytest.raises(AssertionError):
        assert_exact_matches_hand_built(model, wrong, clean, corrupted, metric, ghost)
    # ...and evaluation: keeping every edge the model has should give the clean run, but the ghost
    # edges, ablated, feed the corrupted heads' outputs into the MLPs.
    real = [e for e in wrong.edges if e not in ghost]
    assert abs(evaluate(model, wrong, real, clean, corrupted, metric) - float(run(model, clean, metric))) > 1e-6


# ---------------------------------------------------------------------------------------------- EAP
def make_linear_from(model, clean, layer):
    """Make `model` affine in every input of block `layer` and later (in place; returns an undo):
    each LayerNorm divides by a constant (its clean run's mean scale) instead of its input's scale, each
    MLP's activation is the identity, the attention patterns of the other blocks are frozen to their
    clean values, and block `layer`'s pattern is its masked scores (no softmax), so linear in its q alone
    and in its k alone. The map from one input of block >= `layer` to the logits is then affine, and a
    metric linear in the logits is linear in that input: its first-order change is the whole change."""
    body = model.model
    names = ([f"blocks.{la}.hook_resid_pre" for la in range(len(body.blocks))]
             + [f"blocks.{la}.hook_resid_mid" for la in range(len(body.blocks)) if not model.cfg.use_parallel_residual]
             + [f"blocks.{len(body.blocks) - 1}.hook_resid_post"]
             + [f"blocks.{la}.attn.hook_pattern" for la in range(len(body.blocks))])
    _, cache = model.run_with_cache(clean, names_filter=names)
    eps = model.cfg.layer_norm_eps

    def frozen(ln, stream):
        scale = float((stream.var(-1, unbiased=False) + eps).sqrt().mean())  # a constant: the LN is affine

        def forward(x):
            return (x - x.mean(-1, keepdim=True)) / scale * ln.weight + ln.bias
        return forward

    undo, acts = [], [block.mlp.act for block in body.blocks]
    for la, block in enumerate(body.blocks):
        mlp_reads = "hook_resid_pre" if model.cfg.use_parallel_residual else "hook_resid_mid"
        mid = cache[f"blocks.{la}.{mlp_reads}"]
        for ln, stream in ((block.ln1, cache[f"blocks.{la}.hook_resid_pre"]), (block.ln2, mid)):
            ln.forward = frozen(ln, stream)
            undo.append(ln)
        block.mlp.act = lambda x: x
    body.ln_final.forward = frozen(body.ln_final, cache[f"blocks.{len(body.blocks) - 1}.hook_resid_post"])
    undo.append(body.ln_final)
    scores = {}

    def keep_scores(x, *, hook):
        scores["s"] = x

    def pattern(x, *, hook):
        if hook.layer() == layer:
            s = scores["s"]
            return torch.where(torch.isfinite(s), s, torch.zeros_like(s))
        clean_pattern = cache[hook.name]
        return clean_pattern.repeat(x.shape[0] // clean_pattern.shape[0], 1, 1, 1)

    for la in range(len(body.blocks)):
        model.add_perma_hook(f"blocks.{la}.attn.hook_pattern", pattern)
    model.add_perma_hook(f"blocks.{layer}.attn.hook_attn_scores", keep_scores)

    def restore():
        model.reset_hooks(including_permanent=True)
        for ln in undo:
            del ln.forward
        for block, act in zip(body.blocks, acts):
            block.mlp.act = act
    return restore


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
@pytest.mark.parametrize("layer", [0, 1])
def test_eap_is_exact_patching_where_the_model_is_linear(parallel, layer):
    model = make_model(parallel)
    graph = Graph.from_model(model)
    clean, corrupted = token_pair(23)
    weights = torch.randn(2, 6, 23, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    metric = lambda logits: (logits * weights).sum()  # noqa: E731  linear in the logits
    restore = make_linear_from(model, clean, layer)
    try:
        exact = attribute(model, graph, clean, corrupted, metric, "exact")
        eap = attribute(model, graph, clean, corrupted, metric, "EAP")
    finally:
        restore()
    def receiver_layer(edge):
        found = graph.layer_of(edge.split("->")[1])
        return graph.n_layers if found is None else found

    checked = [e for e in graph.edges if receiver_layer(e) >= layer]
    scale = max(abs(v) for v in exact.values())
    assert scale > 1.0  # the corruption moves the metric: the comparison is not between zeros
    for edge in checked:
        assert abs(eap[edge] - exact[edge]) <= RTOL * scale, (edge, eap[edge], exact[edge])
    # Not trivially: the scores differ from edge to edge and q/k edges of `layer` are non-zero.
    assert any(abs(eap[e]) > 1e-3 * scale for e in checked if e.endswith("<k>") and receiver_layer(e) == layer)


def test_eap_is_only_first_order_where_the_model_is_not_linear():
    """Without the linearisation, EAP and exact differ: the test above is not comparing equal things by
    construction."""
    model = make_model(True)
    graph = Graph.from_model(model)
    clean, corrupted = token_pair(23)
    metric = nonlinear_metric(23, 2, 6)
    exact = attribute(model, graph, clean, corrupted, metric, "exact")
    eap = attribute(model, graph, clean, corrupted, metric, "EAP")
    scale = max(abs(v) for v in exact.values())
    assert max(abs(eap[e] - exact[e]) for e in graph.edges) > 1e-3 * scale


# ---------------------------------------------------------------------------------------------- EAP-IG
def scores_vector(graph, scores):
    return torch.tensor([scores[e] for e in graph.edges], dtype=torch.float64)


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_eap_ig_converges_as_a_left_riemann_sum_to_its_integral(parallel):
    """EAP-IG's score of an edge is the mean of g(alpha) = (sender change) . (gradient at the input)
    over alpha = k/m, k = 0..m-1, with the embeddings at corrupted + alpha (clean - corrupted): a left
    Riemann sum of the integral of g over [0, 1]. Euler-Maclaurin gives the sum's error as
    -(g(1) - g(0)) / (2m) + O(1/m^2), so

        S_m - S_2m = (g(0) - g(1)) / (4m) + O(1/m^2)      (the stated bound on scores at m vs 2m)

    where g(1) is EAP's score (the gradient at the clean run) and g(0) EAP-IG's with one step (the
    corrupted run). At m = 64 the O(1/m^2) remainder measures <= 3% of |S_m - S_2m| on these models;
    the assert allows 25%. A different path, grid or normalisation misses the first-order term by
    its own size. Second: the input edges' scores sum (IG's completeness) to metric(corrupted) -
    metric(clean), the integral of the gradient along the path; with the trapezoid correction
    (g(1) - g(0)) / (2m) the error is O(1/m^2): <= 0.2% of the gap measured, 1% allowed."""
    model = make_model(parallel, seed=0)
    graph = Graph.from_model(model)
    clean, corrupted = token_pair(23, seed=0)
    metric = nonlinear_metric(23, 2, 6, seed=0)

    def scores(method, steps=5):
        return scores_vector(graph, attribute(model, graph, clean, corrupted, metric, method, ig_steps=steps,
                                              batch_size=256))

    g1, g0 = scores("EAP"), scores("EAP-IG", 1)
    m = 64
    s_m, s_2m = scores("EAP-IG", m), scores("EAP-IG", 2 * m)
    difference = s_m - s_2m
    predicted = (g0 - g1) / (4 * m)
    assert float(difference.abs().max()) > 1e-4  # the steps matter: a real difference is predicted
    assert float((difference - predicted).abs().max()) <= 0.25 * float(difference.abs().max())

    gap = float(run(model, corrupted, metric) - run(model, clean, metric))
    inputs = torch.tensor([e.startswith("input->") for e in graph.edges])
    trapezoid = s_m + (g1 - g0) / (2 * m)
    assert abs(float(trapezoid[inputs].sum()) - gap) <= 0.01 * abs(gap)
    assert abs(float(s_m[inputs].sum()) - gap) > 0.01 * abs(gap)  # the uncorrected sum is first order only


def reference_ig_activations(model, graph, clean, corrupted, metric, steps):
    """EAP-IG-activations written as the loop it is: for each sender group (input, each layer's heads,
    each MLP) and k = 1..steps, one clean run with that group's output at corrupted + k/steps (clean -
    corrupted); every input's gradient dotted with every upstream sender's change, averaged."""
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        groups = ["hook_embed"] + [f"blocks.{la}.{h}" for la in range(graph.n_layers)
                                   for h in ("attn.hook_result", "hook_mlp_out")]
        _, c = model.run_with_cache(clean, names_filter=groups)
        _, x = model.run_with_cache(corrupted, names_filter=groups)

        def change(node):
            name, head = sender_hook(graph, node)
            d = x[name] - c[name]
            return d if head is None else d[:, :, head]

        deltas = {node: change(node) for node in graph.senders}
        total = {e: 0.0 for e in graph.edges}
        inputs = [(r, receiver_hook(graph, r)) for r in graph.receivers]
        for group in groups:
            for k in range(1, steps + 1):
                grads = {}

                def interpolate(t, *, hook, k=k):
                    out = x[hook.name] + k / steps * (c[hook.name] - x[hook.name])
                    return out.detach().requires_grad_() if hook.name == "hook_embed" else out

                def grab(name, grads=grads):
                    def hook(grad, *, hook):
                        grads[name] = grad.detach()
                    return hook

                fwd = [(group, interpolate)] + ([] if group == "hook_embed" else
                                                [("hook_embed", lambda t, *, hook: t.detach().requires_grad_())])
                names = sorted({n for _, (n, _) in inputs})
                logits = model.run_with_hooks(clean, fwd_hooks=fwd, bwd_hooks=[(n, grab(n)) for n in names]).logits
                metric(logits).backward()
                for edge in graph.edges:
                    sender, receiver = edge.split("->")
                    name, head = receiver_hook(graph, receiver)
                    if name not in grads:  # no path to the metric: replacing a layer's heads cuts their inputs off
                        continue
                    g = grads[name] if head is None else grads[name][:, :, head]
                    total[edge] += float((deltas[sender] * g).sum())
        return {e: v / (len(groups) * steps) for e, v in total.items()}
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_eap_ig_activations_is_the_loop_it_batches(parallel):
    model = make_model(parallel, seed=1)
    graph = Graph.from_model(model)
    clean, corrupted = token_pair(23, seed=1)
    metric = nonlinear_metric(23, 2, 6, seed=1)
    reference = reference_ig_activations(model, graph, clean, corrupted, metric, steps=3)
    scale = max(abs(v) for v in reference.values())
    for batch_size in (2, 7, 64):  # one path point per forward, a ragged split, all at once
        scores = attribute(model, graph, clean, corrupted, metric, "EAP-IG-activations", ig_steps=3,
                           batch_size=batch_size)
        for edge in graph.edges:
            assert abs(scores[edge] - reference[edge]) <= RTOL * scale, (batch_size, edge)


def test_gradient_methods_batch_without_changing_scores():
    model = make_model(True, seed=2)
    graph = Graph.from_model(model)
    clean, corrupted = token_pair(23, batch=3, seed=2)
    metric = nonlinear_metric(23, 3, 6, seed=2)
    for method in ("EAP-IG", "exact"):
        one = scores_vector(graph, attribute(model, graph, clean, corrupted, metric, method, ig_steps=4, batch_size=1))
        many = scores_vector(graph, attribute(model, graph, clean, corrupted, metric, method, ig_steps=4,
                                              batch_size=1000))
        assert float((one - many).abs().max()) <= RTOL * float(many.abs().max()), method
