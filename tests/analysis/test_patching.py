import importlib.util
from pathlib import Path

import pytest
import torch

from neox_lab import NeoXConfig, NeoXForCausalLM
from neox_lab.analysis import patching
from neox_lab.analysis.interventions import patch_from_cache, record

BASE = NeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64)
ALL_TARGETS = sorted(patching.TARGETS)


def make_model(parallel=True, backend="eager", seed=0, **kw):
    torch.manual_seed(seed)
    return NeoXForCausalLM(BASE.replace(use_parallel_residual=parallel, **kw), attn_backend=backend).eval()


def targets_of(model):
    return [t for t in ALL_TARGETS if not (t == "resid_mid" and model.cfg.use_parallel_residual)]


@pytest.fixture(scope="module", params=[True, False], ids=["parallel", "sequential"])
def model(request):
    return make_model(parallel=request.param)


def pair(batch=2, seq=6, flip=3, seed=1):
    """Clean tokens and a corrupted copy differing in one position."""
    clean = torch.randint(0, BASE.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    corrupted = clean.clone()
    corrupted[:, flip] = (corrupted[:, flip] + 7) % BASE.vocab_size
    return clean, corrupted


METRIC = patching.logit_diff(5, 11)


def test_patching_clean_into_clean_changes_nothing(model):
    clean, _ = pair(seq=4)
    for target in targets_of(model):
        res = patching.activation_patch(model, clean, clean, METRIC, target, batch_size=8)
        assert torch.equal(res.values, res.clean_value.expand_as(res.values)), target
    res = patching.activation_patch(model, clean, clean, METRIC, "z_pos", batched=False, heads=[0, 3])
    assert torch.equal(res.values, res.clean_value.expand_as(res.values))


@pytest.mark.parametrize("layer", [0, 1])
def test_patching_all_of_resid_pre_restores_clean_logits(model, layer):
    clean, corrupted = pair()
    cache = {}
    name = f"blocks.{layer}.hook_resid_pre"
    with torch.no_grad():
        clean_logits = model.run_with_hooks(clean, fwd_hooks=[(name, record(cache))]).logits
        patched = model.run_with_hooks(corrupted, fwd_hooks=[(name, patch_from_cache(cache))]).logits
    assert torch.equal(patched, clean_logits)


def test_resid_pre_grid_at_layer_0_is_exact(model):
    """At layer 0 resid_pre is the embedding: only the corrupted position differs, and patching it
    alone restores the clean metric; every other cell leaves the corrupted metric."""
    clean, corrupted = pair(flip=3)
    res = patching.activation_patch(model, clean, corrupted, METRIC, "resid_pre", layers=[0])
    torch.testing.assert_close(res.values[0, 3], res.clean_value, rtol=0, atol=1e-6)
    others = res.values[0, [0, 1, 2, 4, 5]]
    torch.testing.assert_close(others, res.corrupted_value.expand_as(others), rtol=0, atol=1e-6)


def test_shapes_and_labels(model):
    clean, corrupted = pair()
    expected = {"pos": 6, "head": 4}
    for target in targets_of(model):
        res = patching.activation_patch(model, clean, corrupted, METRIC, target)
        _, axes = patching.TARGETS[target]
        assert res.values.shape == (2, *(expected[a] for a in axes)), target
        assert res.axes == ("layer", *axes) and res.target == target
        assert res.row_labels == ["0", "1"] and len(res.col_labels) == expected[axes[0]]
        assert (res.depth_labels is None) == (len(axes) == 1)


def test_subsets_and_per_row_metrics(model):
    clean, corrupted = pair(batch=3)
    per_row = patching.logit_diff(5, 11, reduce="none")
    res = patching.activation_patch(model, clean, corrupted, per_row, "z_pos", layers=[-1], heads=[1, 3],
                                    positions=[3, 5])
    assert res.values.shape == (1, 2, 2, 3)
    assert (res.row_labels, res.col_labels, res.depth_labels) == (["1"], ["3", "5"], ["1", "3"])
    full = patching.activation_patch(model, clean, corrupted, per_row, "z_pos")
    torch.testing.assert_close(res.values[0], full.values[1][[3, 5]][:, [1, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(res.values.mean(-1), patching.activation_patch(
        model, clean, corrupted, METRIC, "z_pos", layers=[1], heads=[1, 3], positions=[3, 5]).values,
        rtol=0, atol=1e-6)


def test_batched_equals_one_at_a_time(model):
    clean, corrupted = pair()
    mask = torch.ones_like(clean)
    mask[1, :2] = 0  # left padding in row 1
    # A sub-grid keeps the one-forward-per-cell loop short; batch_size=6 puts 3 cells in each
    # forward, so chunks straddle layers.
    picks = {"pos": dict(positions=[0, 3, 5]), "head": dict(heads=[1, 2])}
    for target in targets_of(model):
        grid = dict(attention_mask=mask)
        for axis in patching.TARGETS[target][1]:
            grid.update(picks[axis])
        fast = patching.activation_patch(model, clean, corrupted, METRIC, target, batch_size=6, **grid)
        slow = patching.activation_patch(model, clean, corrupted, METRIC, target, batched=False, **grid)
        torch.testing.assert_close(fast.values, slow.values, rtol=0, atol=1e-6, msg=target)


def test_eager_and_sdpa_agree():
    clean, corrupted = pair()
    eager, sdpa = make_model(backend="eager"), make_model(backend="sdpa")
    for target in ["resid_pre", "mlp_out", "z_pos", "k"]:
        a = patching.activation_patch(eager, clean, corrupted, METRIC, target)
        b = patching.activation_patch(sdpa, clean, corrupted, METRIC, target)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5, msg=target)
        a = patching.attribution_patch(eager, clean, corrupted, METRIC, target)
        b = patching.attribution_patch(sdpa, clean, corrupted, METRIC, target)
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-6, msg=target)


def test_resid_mid_needs_a_sequential_model():
    clean, corrupted = pair()
    with pytest.raises(ValueError, match="parallel residual"):
        patching.activation_patch(make_model(parallel=True), clean, corrupted, METRIC, "resid_mid")
    with pytest.raises(ValueError, match="parallel residual"):
        patching.attribution_patch(make_model(parallel=True), clean, corrupted, METRIC, "resid_mid")
    res = patching.activation_patch(make_model(parallel=False), clean, corrupted, METRIC, "resid_mid")
    assert res.values.shape == (2, 6)


@pytest.mark.parametrize("parallel", [True, False])
def test_attn_out_patch_reaches_the_same_layer_mlp_only_when_sequential(parallel):
    """Parallel: the MLP reads resid_pre, so patching attn_out leaves that layer's mlp_out alone and
    adds exactly (clean - corrupted) attn_out to resid_post. Sequential: the MLP reads resid_mid."""
    model = make_model(parallel=parallel)
    clean, corrupted = pair()
    names = ["blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]
    clean_acts, corrupted_acts, patched = {}, {}, {}
    with torch.no_grad():
        model.run_with_hooks(clean, fwd_hooks=[(n, record(clean_acts)) for n in names])
        model.run_with_hooks(corrupted, fwd_hooks=[(n, record(corrupted_acts)) for n in names])
        model.run_with_hooks(corrupted, fwd_hooks=[(names[0], patch_from_cache(clean_acts, positions=[4]))]
                             + [(n, record(patched)) for n in names])
    mlp_same = torch.equal(patched[names[1]], corrupted_acts[names[1]])
    assert mlp_same == parallel
    if parallel:
        delta = patched[names[2]] - corrupted_acts[names[2]]
        expected = clean_acts[names[0]] - corrupted_acts[names[0]]
        expected[:, [0, 1, 2, 3, 5]] = 0
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)


def test_bad_inputs():
    model = make_model()
    clean, corrupted = pair()
    with pytest.raises(ValueError, match="same shape"):
        patching.activation_patch(model, clean, corrupted[:, :5], METRIC)
    with pytest.raises(ValueError, match="unknown patching target 'resid'"):
        patching.activation_patch(model, clean, corrupted, METRIC, "resid")
    with pytest.raises(IndexError, match="position 6"):
        patching.activation_patch(model, clean, corrupted, METRIC, positions=[6])
    with pytest.raises(ValueError, match="scalar or"):
        patching.attribution_patch(model, clean, corrupted, lambda logits: logits[:, -1, :3])


def test_normalize():
    res = patching.PatchResult(values=torch.tensor([[1.0, 3.0]]), target="resid_pre", axes=("layer", "pos"),
                               row_labels=["0"], col_labels=["0", "1"], clean_value=torch.tensor(3.0),
                               corrupted_value=torch.tensor(1.0))
    assert torch.equal(patching.normalize(res).values, torch.tensor([[0.0, 1.0]]))
    assert torch.equal(patching.normalize(torch.tensor([2.0]), 4.0, 0.0), torch.tensor([0.5]))
    with pytest.raises(ValueError):
        patching.normalize(torch.tensor([2.0]))


def test_metrics():
    logits = torch.randn(2, 4, 10)
    tokens = torch.randint(0, 10, (2, 4))
    assert torch.equal(patching.logit_diff(1, 2)(logits), (logits[:, -1, 1] - logits[:, -1, 2]).mean())
    assert torch.equal(patching.logit_diff(torch.tensor([1, 3]), 2, pos=torch.tensor([0, 2]),
                                           reduce="none")(logits),
                       torch.stack([logits[0, 0, 1] - logits[0, 0, 2], logits[1, 2, 3] - logits[1, 2, 2]]))
    torch.testing.assert_close(patching.prob(4, pos=1)(logits), logits[:, 1].softmax(-1)[:, 4].mean())
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 10), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(patching.loss(tokens)(logits), ce)
    assert float(patching.kl_to_clean(logits)(logits)) == pytest.approx(0.0, abs=1e-7)
    assert float(patching.kl_to_clean(logits, pos=None)(torch.randn(2, 4, 10))) > 0
    with pytest.raises(ValueError, match="reduce"):
        patching.prob(1, reduce="sum")


# ------------------------------------------------------------------------------------------ attribution
def exact_delta(model, clean, corrupted, metric, target):
    res = patching.activation_patch(model, clean, corrupted, metric, target, batch_size=256)
    return res.values - res.corrupted_value


def test_attribution_shapes_and_baselines(model):
    clean, corrupted = pair()
    for target in targets_of(model):
        exact = patching.activation_patch(model, clean, corrupted, METRIC, target)
        attr = patching.attribution_patch(model, clean, corrupted, METRIC, target)
        assert attr.values.shape == exact.values.shape and attr.method == "attribution"
        assert (attr.row_labels, attr.col_labels, attr.depth_labels) == \
            (exact.row_labels, exact.col_labels, exact.depth_labels)
        torch.testing.assert_close(attr.corrupted_value, exact.corrupted_value)
    per_row_metric = patching.logit_diff(5, 11, reduce="none")
    per_row = patching.attribution_patch(model, clean, corrupted, per_row_metric, "z")
    attr = patching.attribution_patch(model, clean, corrupted, METRIC, "z")
    torch.testing.assert_close(per_row.values.mean(-1), attr.values, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("parallel", [True, False])
def test_attribution_is_exact_where_the_metric_is_linear(parallel, monkeypatch):
    """With the final LayerNorm made the identity, logits are linear in the last resid_post (and,
    in a parallel block, in its attn_out and mlp_out), and a logit difference is linear in logits:
    the first-order approximation is then exact up to rounding."""
    model = make_model(parallel=parallel, initializer_range=0.2)
    monkeypatch.setattr(model.model.ln_final, "forward", lambda x: x)
    clean, corrupted = pair()
    for target in ["resid_post", "attn_out", "mlp_out"] if parallel else ["resid_post"]:
        exact = exact_delta(model, clean, corrupted, METRIC, target)[-1]
        attr = patching.attribution_patch(model, clean, corrupted, METRIC, target, layers=[-1]).values[0]
        assert exact.abs().max() > 1e-2
        torch.testing.assert_close(attr, exact, rtol=1e-4, atol=1e-5, msg=target)


def test_attribution_leaves_parameter_grads_alone_and_works_frozen():
    model = make_model()
    clean, corrupted = pair()
    ref = patching.attribution_patch(model, clean, corrupted, METRIC, "z")
    assert all(p.grad is None for p in model.parameters())
    model.requires_grad_(False)
    frozen = patching.attribution_patch(model, clean, corrupted, METRIC, "z")
    torch.testing.assert_close(frozen.values, ref.values, rtol=0, atol=0)


# Correlation between attribution and exact patching over the whole grid, one corrupted token, random
# models (min over seeds 0-1 and both residual kinds; init std 0.02 / 0.1): z 0.999 / 0.975,
# z_pos 0.998 / 0.975, v 0.999 / 0.972, pattern 1.000 / 0.996. Residual streams are only 0.32-0.95
# (resid_pre at layer 0 swaps a whole token embedding: a large, LayerNorm-nonlinear change, the known
# weak spot of attribution patching), so they are not asserted. Per-head patches are small changes, so
# at the realistic init the approximation is near linear (bound 0.99); at std 0.1 attention and GELU
# bend more and the bound is looser (0.9), both well below the observed minima.
@pytest.mark.parametrize("init,bound", [(0.02, 0.99), (0.1, 0.9)])
@pytest.mark.parametrize("parallel", [True, False])
def test_attribution_correlates_with_exact_patching(parallel, init, bound):
    for seed in range(2):
        model = make_model(parallel=parallel, seed=seed, initializer_range=init)
        clean, corrupted = pair(batch=2, seq=8, flip=3, seed=seed)
        for target in ["z", "z_pos", "v", "pattern"]:
            exact = exact_delta(model, clean, corrupted, METRIC, target).flatten()
            attr = patching.attribution_patch(model, clean, corrupted, METRIC, target).values.flatten()
            corr = torch.corrcoef(torch.stack([exact, attr]))[0, 1]
            assert corr > bound, (target, seed, float(corr))


# ------------------------------------------------------------------------------------------ experiments
def load_experiment(name):
    path = Path(__file__).resolve().parents[2] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_patching_quick(capsys):
    assert load_experiment("bench_patching").main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "resid_pre:" in out and "z:" in out and "speedup" in out


def test_activation_patching_study_on_a_random_model(tmp_path, monkeypatch, capsys):
    from neox_lab.model import shipped

    monkeypatch.setattr(shipped, "package_model_dir", lambda: tmp_path / "no-default-here")
    study = load_experiment("activation_patching")
    with pytest.warns(UserWarning, match="RANDOM tiny model"):
        assert study.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{t}.png" for t in sorted(study.TARGETS)]
    assert "attribution-vs-exact" in capsys.readouterr().out


def test_selection_that_the_target_lacks_is_an_error():
    model = make_model()
    clean, corrupted = pair()
    with pytest.raises(ValueError, match="positions= .*'z'.*z_pos"):
        patching.activation_patch(model, clean, corrupted, METRIC, "z", positions=[1])
    with pytest.raises(ValueError, match="heads= .*'resid_post'"):
        patching.attribution_patch(model, clean, corrupted, METRIC, "resid_post", heads=[1])
    with pytest.raises(ValueError, match="differentiable"):
        patching.attribution_patch(model, clean, corrupted, lambda logits: logits.argmax())


def test_logits_of_the_last_position_only_give_the_same_grid(model):
    clean, corrupted = pair()
    for method in (patching.activation_patch, patching.attribution_patch):
        full = method(model, clean, corrupted, METRIC, "resid_pre")
        last = method(model, clean, corrupted, METRIC, "resid_pre", logits_to_keep=1)
        torch.testing.assert_close(last.values, full.values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(last.clean_value, full.clean_value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        patching.activation_patch(model, clean, corrupted, METRIC, logits_to_keep=-1)
