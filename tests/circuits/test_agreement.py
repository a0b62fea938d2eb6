"""Spearman's rank correlation of two edge-score mappings."""

import pytest
import torch

from neox_lab.circuits.agreement import ranks, spearman


def test_ranks_share_ties_at_their_mean():
    assert ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert ranks(torch.tensor([5.0, 5.0, 5.0])).tolist() == [2.0, 2.0, 2.0]


def test_spearman_against_the_textbook_formula_without_ties():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    a, b = dict(enumerate(x.tolist())), dict(enumerate(y.tolist()))
    d = ranks(x) - ranks(y)
    n = len(x)
    assert spearman(a, b) == pytest.approx(1 - 6 * float(d.square().sum()) / (n * (n * n - 1)), abs=1e-12)


def test_spearman_extremes_absolute_and_checks():
    a = {"e1": 1.0, "e2": -2.0, "e3": 3.0}
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, {k: -v for k, v in a.items()}) == pytest.approx(-1.0)
    assert spearman(a, {k: -v for k, v in a.items()}, absolute=True) == pytest.approx(1.0)
    assert spearman(a, {"e1": 0.0, "e2": 0.0, "e3": 0.0}) != spearman(a, {"e1": 0.0, "e2": 0.0, "e3": 0.0})  # nan
    with pytest.raises(ValueError, match="different edges"):
        spearman(a, {"e1": 1.0})


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 6, (60,), generator=gen).double()
    y = x + torch.randint(-2, 3, (60,), generator=gen).double()
    want = stats.spearmanr(x.numpy(), y.numpy()).statistic
    assert spearman(dict(enumerate(x.tolist())), dict(enumerate(y.tolist()))) == pytest.approx(want, abs=1e-12)
