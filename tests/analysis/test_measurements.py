"""Ready-made measurements for sweeps: each agrees with its definition computed another way."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neox_lab import NeoXForCausalLM
from neox_lab.analysis.induction import measure_induction, repeated_tokens
from neox_lab.analysis.measurements import (
    ActivationPatchGrid,
    InContextLearningScore,
    InductionScore,
    PrefixMatchingScore,
    PreviousTokenScore,
    combine,
    first_step_above,
    prefix_matching_targets,
    spec_of,
)
from neox_lab.analysis.patching import activation_patch, logit_diff
from neox_lab.lens.loss import lm_cross_entropy_loss
from neox_lab.testing.pairs import make_trained_like, tiny_config

CFG = tiny_config()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_trained_like(NeoXForCausalLM(CFG, attn_backend="sdpa").eval(), std=0.3).double()


@given(tokens=st.lists(st.lists(st.integers(0, 4), min_size=2, max_size=9), min_size=1, max_size=3)
       .filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_prefix_matching_targets_by_brute_force(tokens):
    t = torch.tensor(tokens)
    got = prefix_matching_targets(t)
    for b, row in enumerate(tokens):
        for q in range(len(row)):
            for k in range(len(row)):
                want = 1 <= k <= q and row[k - 1] == row[q] and k - 1 < q
                assert bool(got[b, q, k]) == want, (row, q, k)


@given(n=st.integers(2, 8), batch=st.integers(1, 3), seed=st.integers(0, 100))
def test_prefix_matching_on_repeated_tokens_is_the_induction_stripe(model, n, batch, seed):
    # On [bos] + a span of distinct tokens repeated, each second-copy query has exactly one earlier
    # occurrence, so the general definition reduces to the stripe measure_induction reads.
    tokens = repeated_tokens(torch.arange(1, CFG.vocab_size), n, batch, generator=torch.Generator().manual_seed(seed))
    got = PrefixMatchingScore(tokens)(model)["prefix_matching_score"]
    patterns = measure_induction(model, tokens, n).patterns  # the fp64 model's fp64 patterns
    # Query q attends to key q - n + 1; the second copy's queries are q = 1 + n .. 2n (after the bos).
    stripe = torch.stack([torch.diagonal(p, offset=-(n - 1), dim1=-2, dim2=-1)[..., 2:].mean(dim=(0, -1))
                          for p in patterns])
    # Two orders of summing the same <= 24 fp64 attention weights: equal to ~1e-15.
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, stripe, rtol=0, atol=1e-12)
    assert model.attn_backend == "sdpa"  # asked for eager patterns, then put back


def test_induction_score_is_measure_induction_on_fixed_tokens(model):
    fn = InductionScore(n=6, batch=3, candidates=torch.arange(1, CFG.vocab_size), seed=4)
    first = fn(model)
    tokens = fn.tokens_for(model)
    assert tokens.shape == (3, 13) and bool((tokens[:, 0] == CFG.bos_token_id).all())
    res = measure_induction(model, tokens, 6)
    assert torch.equal(first["induction_score"], res.scores.float())
    assert first["loss_second_copy"] == float(res.copy_loss[1])
    assert torch.equal(fn(model)["induction_score"], first["induction_score"])  # the same tokens each call
    assert spec_of(fn) == spec_of(InductionScore(n=6, batch=3, candidates=torch.arange(1, CFG.vocab_size), seed=4))
    assert spec_of(fn) != spec_of(InductionScore(n=6, batch=3, candidates=torch.arange(1, CFG.vocab_size), seed=5))
    with pytest.raises(ValueError, match="has none: pass candidates"):
        InductionScore()(model)


def test_previous_token_score_reads_the_first_subdiagonal(model):
    tokens = torch.randint(0, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    got = PreviousTokenScore(tokens)(model)["previous_token_score"]
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(CFG.num_hidden_layers)]
    model.set_attn_backend("eager")
    _, cache = model.run_with_cache(tokens, names_filter=names)
    model.set_attn_backend("sdpa")
    for layer, name in enumerate(names):
        pattern = cache[name]
        want = torch.stack([pattern[:, :, q, q - 1] for q in range(1, 10)], -1).mean(dim=(0, -1))
        torch.testing.assert_close(got[layer], want, rtol=0, atol=1e-12)  # fp64, summed in another order


def test_in_context_learning_score(model):
    tokens = torch.randint(0, CFG.vocab_size, (5, 30), generator=torch.Generator().manual_seed(2))
    fn = InContextLearningScore(tokens, early=(3, 8), late=25, per_token=True, chunk=2)
    out = fn(model)
    with torch.no_grad():
        per_token = lm_cross_entropy_loss(model(tokens).logits, tokens, per_token=True).mean(0)
    # fp64 throughout; rows run in chunks of 2 here and 5 at once above, which may only reorder sums.
    assert out["loss_per_token"].dtype == torch.float64
    torch.testing.assert_close(out["loss_per_token"], per_token, rtol=1e-12, atol=1e-12)
    assert out["loss_early"] == pytest.approx(float(per_token[2:7].mean()), rel=1e-12)
    assert out["loss_late"] == pytest.approx(float(per_token[24]), rel=1e-12)
    assert out["icl_score"] == out["loss_late"] - out["loss_early"]
    # Without the per-token curve only the scored positions are unembedded, on the prefixes they need:
    # causal attention makes those logits the full sequence's (fp64, other shapes: ~1e-15 apart).
    quick = InContextLearningScore(tokens, early=(3, 8), late=25, chunk=3)(model)
    assert "loss_per_token" not in quick
    for key in ("icl_score", "loss_early", "loss_late"):
        assert quick[key] == pytest.approx(out[key], rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="early=50 must name tokens inside 1..29"):
        InContextLearningScore(tokens)
    with pytest.raises(ValueError, match="must come before"):
        InContextLearningScore(tokens, early=20, late=10)


def test_activation_patch_grid_is_activation_patch(model):
    clean = torch.tensor([[0, 5, 6, 7, 5, 6]])
    corrupted = torch.tensor([[0, 5, 9, 7, 5, 6]])
    metric = logit_diff(7, 9)
    fn = ActivationPatchGrid(clean, corrupted, metric, "z", normalized=True)
    out = fn(model)
    ref = activation_patch(model, clean, corrupted, metric, "z")
    assert torch.equal(out["patch_z_clean"], ref.clean_value)
    want = (ref.values - ref.corrupted_value) / (ref.clean_value - ref.corrupted_value)
    assert torch.equal(out["patch_z"], want)
    both = combine(fn, ActivationPatchGrid(clean, corrupted, metric, "resid_pre"))(model)
    assert set(both) == {"patch_z", "patch_z_clean", "patch_z_corrupted", "patch_resid_pre", "patch_resid_pre_clean",
                         "patch_resid_pre_corrupted"}
    with pytest.raises(ValueError, match="patch_z.*more than one measurement"):
        combine(fn, fn)(model)


def test_first_step_above():
    scores = torch.tensor([[0.1, 0.0], [0.2, 0.35], [0.9, 0.1]])
    assert first_step_above([0, 10, 100], scores, 0.3) == 10
    assert first_step_above([0, 10, 100], scores, 0.95) is None
