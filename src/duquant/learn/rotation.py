"""Ours: DuQuant++'s smoothing and block rotation, refined on the quantized block-output error.

The rotation stays a 32 x 32 block rotation (one shared matrix, or one per 32-channel block at the
same FLOPs per token), so the online cost and the export are DuQuant++'s. It is parametrised as
R = R0 · cayley(A) with A skew-symmetric (cayley(A) = (I - A)^-1 (I + A) is orthogonal for every A),
starting at A = 0, i.e. at the searched rotation R0. The smoothing factors are refined as
s = s0 · exp(t), t = 0 at the start; where they must stay shared over attention heads (the o_proj
input under GQA) they are left as searched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from duquant.learn.trainer import LearnedGroup
from duquant.transforms.base import BlockRotation, ChannelScale, Transform


def cayley(a: Tensor) -> Tensor:
    """The orthogonal matrix (I - K)^-1 (I + K) of the skew-symmetric part K of `a` (batched)."""
    k = (a - a.transpose(-1, -2)) / 2
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(k)
    return torch.linalg.solve(eye - k, eye + k)


def nearest_orthogonal(r: Tensor) -> Tensor:
    """The orthogonal matrix nearest `r` (polar factor U Vᵀ of its SVD), float64 (batched)."""
    u, _, vh = torch.linalg.svd(r.double())
    return u @ vh


class LearnedRotation(LearnedGroup):
    """x -> (x / s) · R on 32-channel blocks; W -> (W · s) · R."""

    def __init__(
        self, scale: Tensor | None, rotation: Tensor, learn_scale: bool, per_block: bool, dim: int
    ):
        super().__init__()
        r0 = rotation if rotation.ndim == 3 else rotation.unsqueeze(0)
        b = r0.shape[-1]
        if per_block and r0.shape[0] == 1:
            r0 = r0.expand(dim // b, b, b)
        self.register_buffer("r0", r0.detach().float().clone())
        self.a = nn.Parameter(torch.zeros_like(self.r0))
        self.register_buffer("s0", None if scale is None else scale.detach().float().clone())
        self.t = nn.Parameter(torch.zeros(dim)) if (learn_scale and scale is not None) else None

    def scale(self) -> Tensor | None:
        """The current smoothing factors (None without smoothing)."""
        if self.s0 is None:
            return None
        return self.s0 if self.t is None else self.s0 * torch.exp(self.t)

    def rotation(self) -> Tensor:
        """The current block rotation(s), [n, B, B]."""
        return self.r0 @ cayley(self.a)

    def _rotate(self, x: Tensor) -> Tensor:
        r = self.rotation()
        b = r.shape[-1]
        xb = x.reshape(*x.shape[:-1], x.shape[-1] // b, b)
        if r.shape[0] == 1:
            return (xb @ r[0]).reshape(x.shape)
        return torch.einsum("...nb,nbc->...nc", xb, r).reshape(x.shape)

    def online(self, x: Tensor) -> Tensor:
        s = self.scale()
        return self._rotate(x if s is None else x / s)

    def weight(self, w: Tensor) -> Tensor:
        s = self.scale()
        return self._rotate(w if s is None else w * s)

    @torch.no_grad()
    def steps(self) -> list[Transform]:
        r = nearest_orthogonal(self.rotation()).float()
        s = self.scale()
        return ([] if s is None else [ChannelScale(s)]) + [BlockRotation(r)]
