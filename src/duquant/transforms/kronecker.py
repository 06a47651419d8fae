"""Kronecker-structured affine map (FlatQuant): x -> x·(L ⊗ R), L n1 x n1 and R n2 x n2 invertible.

With x viewed row-major as an n1 x n2 matrix X, x·(L ⊗ R) is the row-major flattening of Lᵀ·X·R: two
small matmuls instead of one (n1·n2)² matrix, 2·n1·n2·(n1 + n2) FLOPs a row instead of 2·(n1·n2)².
A missing factor (None) is the identity of whatever size the row width leaves for it: Kronecker(None,
R) is R on every consecutive n2 channels (block diagonal; an attention head's own map when n2 is the
head dim), Kronecker(L, None) mixes n1 equal slices (heads) with L.
"""

from __future__ import annotations

import torch
from torch import Tensor

from duquant.transforms.base import Transform


def kron_rows(x: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """x·(left ⊗ right) for every row of `x`, as Lᵀ·X·R on the row viewed n1 x n2 (differentiable)."""
    n = x.shape[-1]
    n1 = left.shape[0] if left is not None else n // right.shape[0]
    n2 = right.shape[0] if right is not None else n // n1
    if n1 * n2 != n:
        raise ValueError(f"input width {n} is not {n1} x {n2}, the Kronecker factors' sizes")
    y = x.reshape(*x.shape[:-1], n1, n2)
    if right is not None:
        y = y @ right.to(x.dtype)
    if left is not None:
        y = left.to(x.dtype).T @ y
    return y.reshape(x.shape)


def _inverse(m: Tensor | None) -> Tensor | None:
    """The inverse of `m` in float64, stored float32 (None stays None: the identity)."""
    return None if m is None else torch.linalg.inv(m.double()).float()


class Kronecker(Transform):
    """x -> x·(L ⊗ R); weights W -> W·(L⁻ᵀ ⊗ R⁻ᵀ). Factors are any invertible matrices (or None)."""

    def __init__(
        self,
        left: Tensor | None,
        right: Tensor | None,
        left_inv_t: Tensor | None = None,
        right_inv_t: Tensor | None = None,
    ):
        """`*_inv_t`: the factors' inverse transposes when known in closed form (FlatQuant's SVD
        form gives them exactly), else computed here in float64."""
        super().__init__()
        if left is None and right is None:
            raise ValueError("a Kronecker transform needs at least one factor")
        for name, m, inv_t in (("left", left, left_inv_t), ("right", right, right_inv_t)):
            self.register_buffer(name, None if m is None else m.detach().float().clone())
            if m is not None and inv_t is None:
                inv_t = _inverse(m).T
            inv_t = None if inv_t is None else inv_t.detach().float().contiguous()
            self.register_buffer(f"{name}_inv_t", inv_t)
            self.register_buffer(f"{name}_inv", None if inv_t is None else inv_t.T.contiguous())

    def forward(self, x: Tensor) -> Tensor:
        return kron_rows(x, self.left, self.right)

    def weight(self, w: Tensor) -> Tensor:
        return kron_rows(w, self.left_inv_t, self.right_inv_t)  # (L ⊗ R)⁻ᵀ = L⁻ᵀ ⊗ R⁻ᵀ

    def inverse(self, x: Tensor) -> Tensor:
        return kron_rows(x, self.left_inv, self.right_inv)

    def flops_per_token(self, dim: int) -> int:
        n1 = self.left.shape[0] if self.left is not None else dim // self.right.shape[0]
        n2 = dim // n1
        return (
            2 * dim * ((n1 if self.left is not None else 0) + (n2 if self.right is not None else 0))
        )

    def matrix(self, dim: int) -> Tensor:
        """The explicit dim x dim matrix (tests; a missing factor is an identity)."""
        n1 = self.left.shape[0] if self.left is not None else dim // self.right.shape[0]
        n2 = dim // n1
        left = self.left if self.left is not None else torch.eye(n1)
        right = self.right if self.right is not None else torch.eye(n2)
        return torch.kron(left, right)
