"""Invertible linear maps on a linear layer's input dim: applied online to activations, offline to weights.

A transform A maps an activation row x to x·A and a weight W (out x in) to W·A^-T, so that
(x·A)·(W·A^-T)^T = x·W^T: the full-precision output is unchanged before quantization.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Transform(nn.Module):
    """Base class: `forward` is the online activation map, `weight` the offline weight map."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight(self, w: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply_online(self, x: Tensor) -> Tensor:
        """The activation map as a quantized layer runs it: `forward`, unless a step computes it
        the way an exported checkpoint's loader does (see BlockRotation)."""
        return self(x)

    def inverse(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """x·A^-1: undoes `forward` (used by tests and by folding into a producer's output)."""
        raise NotImplementedError

    def flops_per_token(self, dim: int) -> int:
        """Multiply-adds counted as 2 FLOPs, per activation row of width `dim`."""
        return 0


class Sequence(Transform):
    """Composition: x -> x·A1·A2·…"""

    def __init__(self, steps: list[Transform]):
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, x: Tensor) -> Tensor:
        for step in self.steps:
            x = step(x)
        return x

    def weight(self, w: Tensor) -> Tensor:
        for step in self.steps:
            w = step.weight(w)
        return w

    def apply_online(self, x: Tensor) -> Tensor:
        for step in self.steps:
            x = step.apply_online(x)
        return x

    def inverse(self, x: Tensor) -> Tensor:
        for step in reversed(self.steps):
            x = step.inverse(x)
        return x

    def flops_per_token(self, dim: int) -> int:
        return sum(s.flops_per_token(dim) for s in self.steps)

    def __len__(self) -> int:
        return len(self.steps)


class ChannelScale(Transform):
    """Smoothing: x -> x / s, W -> W * s (per input channel)."""

    def __init__(self, scale: Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x / self.scale.to(x.dtype)

    def weight(self, w: Tensor) -> Tensor:
        return w * self.scale.to(w.dtype)

    def inverse(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.dtype)

    def flops_per_token(self, dim: int) -> int:
        return dim


def _gather_last(x: Tensor, index: Tensor) -> Tensor:
    """x[..., index] for a 1-D index as long as x's last dim (a permutation of it)."""
    # gather with the index broadcast (a stride-0 view) is 1.5-2.5x faster on CPU than advanced
    # indexing, which computes an offset per element (measured in docs/benchmarks.md)
    return torch.gather(x, -1, index.expand(x.shape))


class Permutation(Transform):
    """Channel permutation: new channel j takes old channel perm[j]."""

    def __init__(self, perm: Tensor):
        super().__init__()
        self.register_buffer("perm", perm.long().clone())
        self.register_buffer("inv", torch.argsort(self.perm))

    def forward(self, x: Tensor) -> Tensor:
        return _gather_last(x, self.perm)

    def weight(self, w: Tensor) -> Tensor:
        return _gather_last(w, self.perm)

    def inverse(self, x: Tensor) -> Tensor:
        return _gather_last(x, self.inv)


class BlockRotation(Transform):
    """Block-diagonal orthogonal map: x viewed as (…, K/B, B) times R (one B x B matrix, or one per block)."""

    def __init__(self, rotation: Tensor):
        super().__init__()
        if rotation.ndim == 2:
            rotation = rotation.unsqueeze(0)
        self.register_buffer("rotation", rotation.detach().float().clone())
        self._stored: dict = {}  # stored_matrix() per device, computed on first online use

    @property
    def block_size(self) -> int:
        return self.rotation.shape[-1]

    def _rotate(self, x: Tensor, r: Tensor) -> Tensor:
        b = r.shape[-1]
        if x.shape[-1] % b:
            raise ValueError(
                f"input width {x.shape[-1]} is not divisible by the rotation block {b}"
            )
        xb = x.reshape(*x.shape[:-1], x.shape[-1] // b, b)
        if r.shape[0] == 1:  # one shared block: a single (tokens * K/B, B) @ (B, B) matmul
            return (xb @ r[0].to(x.dtype)).reshape(x.shape)
        return torch.einsum("...nb,nbc->...nc", xb, r.to(x.dtype)).reshape(x.shape)

    def forward(self, x: Tensor) -> Tensor:
        return self._rotate(x, self.rotation)

    def stored_matrix(self) -> Tensor:
        """sqrt(B)·R in float32: the matrix an export stores (compressed-tensors divides by sqrt(B))."""
        r = self.rotation[0].double()
        return (r * math.sqrt(r.shape[-1])).float()

    def apply_online(self, x: Tensor) -> Tensor:
        """x·R computed as compressed-tensors' transform does: (x·S) / sqrt(B) in float32, S the
        stored matrix, cast back to x's dtype, so an exported checkpoint reloads bit for bit."""
        if self.rotation.shape[0] != 1:  # one matrix per block: not exportable, plain forward
            return self(x)
        b = self.block_size
        if x.shape[-1] % b:
            raise ValueError(
                f"input width {x.shape[-1]} is not divisible by the rotation block {b}"
            )
        s = self._stored.get(self.rotation.device)
        if s is None:
            s = self._stored[self.rotation.device] = self.stored_matrix().to(self.rotation.device)
        xb = x.to(torch.float32).unflatten(-1, (x.shape[-1] // b, b))
        # the loader's expression: a float64 0-d tensor divisor, which torch applies in float32
        y = (xb @ s.to(x.device)).flatten(-2, -1) / torch.tensor(b, dtype=torch.float64).sqrt()
        return y.to(x.dtype)

    def weight(self, w: Tensor) -> Tensor:
        return self._rotate(w, self.rotation)  # orthogonal: A^-T = A

    def inverse(self, x: Tensor) -> Tensor:
        return self._rotate(x, self.rotation.transpose(-1, -2))

    def flops_per_token(self, dim: int) -> int:
        return 2 * dim * self.block_size


def transform_output_rows(
    linear: nn.Linear, step: Transform, rows: slice, compute: torch.dtype = torch.float32
) -> None:
    """Make `linear`'s output y[rows] become step(y[rows]), in place: W <- (W^T A)^T and b <- b A
    on those rows, computed in `compute` (folds use float32, QuaRot's rotations float64)."""
    w = linear.weight.data
    w[rows] = step(w[rows].to(compute).T).T.to(w.dtype)
    if linear.bias is not None:
        b = linear.bias.data
        b[rows] = step(b[rows].to(compute)).to(b.dtype)
