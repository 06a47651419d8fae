"""DuQuant v1's zigzag permutation: deal channels, largest first, to the blocks in boustrophedon order."""

from __future__ import annotations

import torch
from torch import Tensor


def zigzag_permutation(channel_absmax: Tensor, block_size: int) -> Tensor:
    """perm such that x[..., perm] balances the per-block maxima (new channel j = old channel perm[j])."""
    n = channel_absmax.numel()
    nb = n // block_size
    order = torch.argsort(channel_absmax, descending=True).tolist()
    buckets: list[list[int]] = [[] for _ in range(nb)]
    pos, up = 0, True
    for ch in order:
        buckets[pos].append(ch)
        if up:
            pos += 1
            if pos == nb:
                pos, up = nb - 1, False
        else:
            pos -= 1
            if pos == -1:
                pos, up = 0, True
    perm = []
    for bucket in buckets:
        perm.extend(sorted(bucket, key=lambda c: -float(channel_absmax[c])))
    return torch.tensor(perm, dtype=torch.long)
