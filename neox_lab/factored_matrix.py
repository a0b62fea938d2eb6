"""`FactoredMatrix`: a matrix kept as the product A @ B of two thin factors, as TransformerLens has it.

A QK circuit W_Q @ W_K^T is d_model x d_model but has rank d_head; holding the factors keeps it at
2 * d_model * d_head numbers and makes its SVD, eigenvalues and norm cheap: each is computed from the
factors and a d_head x d_head middle matrix, never from the full product. Same names and semantics as
TransformerLens 3.x's `FactoredMatrix` (leading axes broadcast, indexing addresses the leading axes,
`svd()` returns ``(U, S, V)`` with ``M == U @ diag(S) @ V^T``).
"""

from __future__ import annotations

from functools import cached_property

import torch


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


class FactoredMatrix:
    """The matrix ``A @ B`` for A ``[... ldim mdim]`` and B ``[... mdim rdim]``, never formed unless asked (`AB`).

    Leading axes of A and B broadcast against each other (e.g. ``[n_layers n_heads ...]``).
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"FactoredMatrix factors must be at least 2-d, got A {tuple(A.shape)} and "
                             f"B {tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix factors must share the inner dimension: A {tuple(A.shape)} has "
                             f"{A.shape[-1]} columns, B {tuple(B.shape)} has {B.shape[-2]} rows")
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as err:
            raise ValueError(f"FactoredMatrix: the leading axes of A {tuple(A.shape)} and B {tuple(B.shape)} "
                             "do not broadcast") from err
        self.shape = torch.Size(lead + (self.ldim, self.rdim))
        self.A = A.broadcast_to(lead + (self.ldim, self.mdim))
        self.B = B.broadcast_to(lead + (self.mdim, self.rdim))
        self.has_leading_dims = len(lead) > 0

    # ------------------------------------------------------------------ products
    def __matmul__(self, other):
        """``self @ other``: a FactoredMatrix for a matrix or FactoredMatrix, a tensor for a vector."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if other.ndim < 2:  # a vector: the product collapses to a vector
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.shape[-2] != self.rdim:
            raise ValueError(f"cannot multiply a FactoredMatrix {tuple(self.shape)} by {tuple(other.shape)}: "
                             f"{self.rdim} columns against {other.shape[-2]} rows")
        # Keep the narrower inner dimension, so the factorisation stays low-rank.
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other):
        """``other @ self`` for a tensor `other` (a matrix or a vector)."""
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        if other.shape[-1] != self.ldim:
            raise ValueError(f"cannot multiply {tuple(other.shape)} by a FactoredMatrix {tuple(self.shape)}: "
                             f"{other.shape[-1]} columns against {self.ldim} rows")
        if other.ndim < 2:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar) -> FactoredMatrix:
        """Scaling by a number (or a one-element tensor) scales A."""
        if isinstance(scalar, torch.Tensor) and scalar.numel() != 1:
            raise ValueError(f"FactoredMatrix * needs a scalar, got a tensor of shape {tuple(scalar.shape)}; "
                             "use @ for matrix products")
        return FactoredMatrix(self.A * scalar, self.B)

    def __rmul__(self, scalar) -> FactoredMatrix:
        return self * scalar

    @property
    def AB(self) -> torch.Tensor:
        """The full product ``[... ldim rdim]`` (as large as the matrix itself)."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """The reverse product ``[... mdim mdim]``; defined only for a square matrix."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square FactoredMatrix, this one is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        return FactoredMatrix(_t(self.B), _t(self.A))

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.B

    # ------------------------------------------------------------------ spectra
    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # A = Ua Sa Va^T and B = Ub Sb Vb^T, so AB = Ua (Sa Va^T Ub Sb) Vb^T: only the mdim x mdim
        # middle needs a fresh SVD, and Ua, Vb carry its singular vectors back out.
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
        middle = (Sa[..., :, None] * Vha) @ (Ub * Sb[..., None, :])
        Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
        return Ua @ Um, Sm, _t(Vhb) @ _t(Vhm)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U [... ldim mdim], S [... mdim], V [... rdim mdim])`` with ``AB == U @ diag(S) @ V^T``.

        Computed once per FactoredMatrix and kept (the factors are not watched for in-place edits)."""
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        return self.svd()[0]

    @property
    def S(self) -> torch.Tensor:
        return self.svd()[1]

    @property
    def V(self) -> torch.Tensor:
        """Right singular vectors (not their transpose): ``AB == U @ diag(S) @ V^T``."""
        return self.svd()[2]

    @property
    def Vh(self) -> torch.Tensor:
        """TransformerLens' older name for `V` (it has always returned V, not V^T); prefer `.V`."""
        return self.svd()[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The mdim eigenvalues of BA (complex): AB's non-zero eigenvalues, since BAv = kv gives AB(Av) = k(Av)."""
        ba = self.BA
        if ba.dtype in (torch.float16, torch.bfloat16):  # torch has no half-precision eig
            ba = ba.float()
        return torch.linalg.eig(ba).eigenvalues

    def norm(self) -> torch.Tensor:
        """Frobenius norm, ``[...]``: the root of the summed squared singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> FactoredMatrix:
        """The same matrix as ``(U sqrt(S)) @ (sqrt(S) V^T)``: balanced factors with orthogonal rows/columns."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * _t(self.V))

    def collapse_l(self) -> torch.Tensor:
        """``S V^T``, ``[... mdim rdim]``: the matrix with its left orthogonal factor U dropped."""
        return self.S[..., :, None] * _t(self.V)

    def collapse_r(self) -> torch.Tensor:
        """``U S``, ``[... ldim mdim]``: the matrix with its right orthogonal factor V^T dropped."""
        return self.U * self.S[..., None, :]

    # ------------------------------------------------------------------ shape
    @property
    def ndim(self) -> int:
        return len(self.shape)

    def unsqueeze(self, k: int) -> FactoredMatrix:
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The top-left k x ... x k corner of the product (every axis cut to k), computed from the factors."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.ndim))]

    def __getitem__(self, idx) -> FactoredMatrix:
        """Index the leading axes (``qk[layer, head]``); an index that reaches into the matrix axes themselves
        keeps them as length-1 axes (the result is still a FactoredMatrix)."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        n_lead = self.ndim - 2
        length = sum(i is not None for i in idx)
        if length <= n_lead:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if length == n_lead + 1:  # the last index picks rows of A only
            idx = _keep_axis(idx, -1)
            return FactoredMatrix(self.A[idx], self.B[idx[:-1]])
        if length == n_lead + 2:  # rows of A and columns of B
            idx = _keep_axis(_keep_axis(idx, -1), -2)
            return FactoredMatrix(self.A[idx[:-1]], self.B[idx[:-2] + (slice(None), idx[-1])])
        raise IndexError(f"index {idx} has more entries than a FactoredMatrix of shape {tuple(self.shape)} has axes")

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"


def _keep_axis(idx: tuple, position: int) -> tuple:
    """`idx` with an integer at `position` turned into a length-1 slice, so the axis survives indexing."""
    value = idx[position]
    if not isinstance(value, int):
        return idx
    out = list(idx)
    out[position] = slice(value, value + 1 if value != -1 else None)
    return tuple(out)
