"""SmoothQuant-style per-channel smoothing scales Λ_j = max|X_j|^α / max|W_j|^(1−α)."""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-5


def smoothing_scale(act_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """Λ over the input channels, W's column maxima taken over every linear that reads this input."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must lie in [0, 1], got {alpha}")
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    a = act_absmax.float().clamp(min=_EPS)
    s = a.pow(alpha) / w_absmax.clamp(min=_EPS).pow(1.0 - alpha)
    return s.clamp(min=1e-2)  # the released code truncates tiny scales, which would blow weights up


def share_over_heads(scale: Tensor, n_heads: int, n_kv_heads: int) -> Tensor:
    """Make a per-channel scale of the o_proj input equal across query heads that share a KV head.

    Then Λ folds exactly into v_proj's output rows under grouped-query attention (the released code
    keeps it online instead); the max over the group keeps every head's outliers covered.
    """
    rep = n_heads // n_kv_heads
    head_dim = scale.numel() // n_heads
    s = scale.reshape(n_kv_heads, rep, head_dim).amax(dim=1, keepdim=True)
    return s.expand(n_kv_heads, rep, head_dim).reshape(-1)
