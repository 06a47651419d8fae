"""Hadamard matrices (Sylvester and Paley constructions) and Hadamard transforms: block and global.

A global Hadamard of a width that is not a power of two (576 = 36 x 16, 1536 = 12 x 128 in SmolLM2) is
the Kronecker product H_k ⊗ H_{2^m} with H_k from a Paley construction, applied as two small matmuls
over the (…, k, 2^m) view: O(K (k + 2^m)) per token, never a dense K x K product.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from duquant.transforms.base import Transform


def sylvester(n: int) -> Tensor:
    """Unnormalised Sylvester Hadamard matrix of order n (a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    """Trial-division primality (q is small here)."""
    return q > 1 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = χ(j − i) with χ the quadratic character mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return torch.tensor(chi, dtype=torch.float64)[idx]


@functools.cache
def paley(n: int) -> Tensor:
    """Unnormalised Hadamard matrix of order n by Paley I (n−1 prime ≡ 3 mod 4) or II (n/2−1 prime ≡ 1 mod 4)."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + s
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(n // 2, n // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(n // 2, dtype=torch.float64), b)
    raise ValueError(f"no Paley construction for order {n}")


def hadamard_factors(n: int) -> tuple[int, int]:
    """Split n = k * 2^m with a known H_k (k = 1 or a Paley order), the largest power of two first."""
    m = (n & -n).bit_length() - 1
    for shift in range(m, -1, -1):
        k = n >> shift
        if k == 1:
            return 1, n
        try:
            paley(k)
            return k, 1 << shift
        except ValueError:
            continue
    raise ValueError(f"no Hadamard matrix construction is known to duquant for order {n}")


def hadamard(n: int) -> Tensor:
    """Normalised (orthogonal) Hadamard matrix of order n, float64."""
    k, p = hadamard_factors(n)
    h = sylvester(p) if k == 1 else torch.kron(paley(k), sylvester(p))
    return h / math.sqrt(n)


def random_signs(n: int, generator: torch.Generator) -> Tensor:
    """n iid ±1 values."""
    return torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1


def block_hadamard(b: int, signs: Tensor | None = None) -> Tensor:
    """B x B orthogonal matrix diag(signs) · H_B (randomized block Hadamard when signs are given)."""
    h = hadamard(b)
    return h if signs is None else signs[:, None] * h


class KroneckerHadamard(Transform):
    """x -> (x ⊙ s) · (H_k ⊗ H_p)/√(kp): a global (randomized) Hadamard applied in O(K (k + p)) per row."""

    def __init__(self, dim: int, signs: Tensor | None = None):
        super().__init__()
        k, p = hadamard_factors(dim)
        self.k, self.p = k, p
        self.register_buffer(
            "hk",
            (paley(k) if k > 1 else torch.ones(1, 1, dtype=torch.float64)).float() / math.sqrt(k),
        )
        self.register_buffer("hp", sylvester(p).float() / math.sqrt(p))
        self.register_buffer("signs", None if signs is None else signs.float())

    def _had(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = x.reshape(*shape[:-1], self.k, self.p) @ self.hp.to(x.dtype)
        if (
            self.k > 1
        ):  # (H_k ⊗ H_p) acting on the right of a row = H_k^T · X · H_p on the (k, p) view
            y = self.hk.T.to(x.dtype) @ y
        return y.reshape(shape)

    def forward(self, x: Tensor) -> Tensor:
        return self._had(x if self.signs is None else x * self.signs.to(x.dtype))

    def weight(self, w: Tensor) -> Tensor:
        return self.forward(w)

    def inverse(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = x.reshape(*shape[:-1], self.k, self.p) @ self.hp.T.to(x.dtype)
        if self.k > 1:
            y = self.hk.to(x.dtype) @ y
        y = y.reshape(shape)
        return y if self.signs is None else y * self.signs.to(x.dtype)

    def matrix(self) -> Tensor:
        """The dense K x K matrix (for tests and folding into weights)."""
        return self.forward(torch.eye(self.k * self.p))

    def flops_per_token(self, dim: int) -> int:
        return 2 * dim * (self.p + (self.k if self.k > 1 else 0))
