"""FactoredMatrix against the dense product it stands for, in fp64.

Bound: every check compares two fp64 evaluations of the same matrix expression (products of at most
four factors of size <= 12, plus an SVD or eig of a <= 12 x 12 matrix). Each is backward stable to a
few hundred units of roundoff (u = 1.1e-16) relative to the norms involved, so 1e-10 relative to the
dense matrix's norm is ~10^6 u of margin, while any wrong transpose, factor order or axis is O(1).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neox_lab import FactoredMatrix

REL = 1e-10


def close(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    scale = b.norm() if scale is None else scale
    return float((a - b).norm()) <= REL * max(float(scale), 1e-300)


@st.composite
def factored(draw, square: bool = False):
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    ldim = draw(st.integers(1, 12))
    mdim = draw(st.integers(1, 12))
    rdim = ldim if square else draw(st.integers(1, 12))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    A = torch.randn(lead + (ldim, mdim), generator=gen, dtype=torch.float64)
    # B sometimes without the leading axes: they broadcast, as in TransformerLens.
    b_lead = lead if draw(st.booleans()) else ()
    B = torch.randn(b_lead + (mdim, rdim), generator=gen, dtype=torch.float64)
    return FactoredMatrix(A, B), gen


@given(factored())
def test_product_transpose_and_shape(fm_gen):
    fm, _ = fm_gen
    dense = fm.A @ fm.B
    assert fm.shape == dense.shape and fm.ndim == dense.ndim
    assert torch.equal(fm.AB, dense)
    assert close(fm.T.AB, dense.transpose(-2, -1))
    assert fm.pair[0] is fm.A
    assert close((fm * 2.5).AB, 2.5 * dense) and close((3 * fm).AB, 3 * dense)


@given(factored())
def test_svd_reconstructs_and_matches_dense_singular_values(fm_gen):
    fm, _ = fm_gen
    dense = fm.AB
    U, S, V = fm.svd()
    k = min(fm.ldim, fm.mdim, fm.rdim)
    assert U.shape[-2:] == (fm.ldim, S.shape[-1]) and V.shape[-2:] == (fm.rdim, S.shape[-1])
    assert close(U @ torch.diag_embed(S) @ V.transpose(-2, -1), dense)
    dense_s = torch.linalg.svdvals(dense)
    assert close(S[..., :k], dense_s[..., :k], dense.norm())
    assert close(fm.norm(), dense.flatten(-2).norm(dim=-1), dense.norm())
    # U and V have orthonormal columns where S is not zero.
    assert close(fm.collapse_l(), torch.diag_embed(S) @ V.transpose(-2, -1), dense.norm())
    assert close(fm.collapse_r(), U @ torch.diag_embed(S), dense.norm())
    assert close(fm.make_even().AB, dense)
    assert fm.U is U and fm.S is S and fm.V is V  # computed once


@given(factored(square=True))
def test_eigenvalues_are_the_products_nonzero_eigenvalues(fm_gen):
    fm, _ = fm_gen
    ours = fm.eigenvalues
    assert ours.shape[-1] == fm.mdim
    # BA's spectrum is AB's non-zero spectrum padded/trimmed with zeros: compare characteristic sums
    # (traces of powers), which need no matching of eigenvalue order.
    dense = fm.AB.to(torch.complex128)
    scale = max(float(fm.AB.norm()), 1e-300)
    for power in (1, 2, 3):
        lhs = (ours ** power).sum(-1)
        rhs = torch.diagonal(torch.linalg.matrix_power(dense, power), dim1=-2, dim2=-1).sum(-1)
        assert float((lhs - rhs).abs().max()) <= REL * scale ** power * fm.ldim


@given(factored(), st.data())
def test_matmul_with_tensors_vectors_and_factored(fm_gen, data):
    fm, gen = fm_gen
    dense = fm.AB
    n = data.draw(st.integers(1, 12))
    right = torch.randn(fm.rdim, n, generator=gen, dtype=torch.float64)
    left = torch.randn(n, fm.ldim, generator=gen, dtype=torch.float64)
    assert isinstance(fm @ right, FactoredMatrix) and close((fm @ right).AB, dense @ right)
    assert isinstance(left @ fm, FactoredMatrix) and close((left @ fm).AB, left @ dense)
    vec_r = torch.randn(fm.rdim, generator=gen, dtype=torch.float64)
    vec_l = torch.randn(fm.ldim, generator=gen, dtype=torch.float64)
    assert close(fm @ vec_r, dense @ vec_r)
    assert close(vec_l @ fm, vec_l @ dense)
    other = FactoredMatrix(torch.randn(fm.rdim, 3, generator=gen, dtype=torch.float64),
                           torch.randn(3, n, generator=gen, dtype=torch.float64))
    assert close((fm @ other).AB, dense @ other.AB)


@given(factored())
def test_indexing_addresses_leading_axes_then_rows_and_columns(fm_gen):
    fm, _ = fm_gen
    dense = fm.AB
    n_lead = fm.ndim - 2
    lead_idx = tuple(0 for _ in range(n_lead))
    assert close(fm[lead_idx].AB, dense[lead_idx]) if n_lead else True
    # One index past the leading axes picks rows, kept as a length-1 axis; two pick rows and columns.
    row = fm[lead_idx + (-1,)]
    assert close(row.AB, dense[lead_idx + (slice(-1, None),)])
    cell = fm[lead_idx + (0, -1)]
    assert close(cell.AB, dense[lead_idx + (slice(0, 1), slice(-1, None))])
    with pytest.raises(IndexError):
        fm[lead_idx + (0, 0, 0)]
    assert close(fm.get_corner(2), dense[tuple(slice(2) for _ in range(dense.ndim))])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="inner dimension"):
        FactoredMatrix(torch.zeros(3, 4), torch.zeros(5, 3))
    fm = FactoredMatrix(torch.zeros(3, 2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="square"):
        _ = fm.BA
    with pytest.raises(ValueError, match="rows"):
        fm @ torch.zeros(3, 3)
    with pytest.raises(ValueError, match="scalar"):
        fm * torch.zeros(2)
    assert repr(fm) == "FactoredMatrix: Shape(torch.Size([3, 4])), Hidden Dim(2)"
