"""Perplexity by the standard protocol: text tokenized once, non-overlapping windows, mean NLL, exp."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


class NonFiniteLossError(RuntimeError):
    """The model produced NaN/Inf logits: the quantized model is broken, not merely inaccurate."""


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    desc: str = "ppl",
) -> dict:
    """PPL of `model` on the 1-D token tensor `input_ids` over ⌊N/seqlen⌋ windows (at most `max_windows`)."""
    ids = input_ids.reshape(-1)
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    start = time.perf_counter()
    for i in tqdm(range(n_windows), desc=desc, leave=False):
        window = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(window, use_cache=False).logits[0, :-1].float()
        loss = F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"window {i} gave a non-finite loss ({loss})")
        nll_sum += loss
        count += seqlen - 1
    return {
        "ppl": math.exp(nll_sum / count),
        "nll": nll_sum / count,
        "windows": n_windows,
        "seqlen": seqlen,
        "tokens": count,
        "total_windows": ids.numel() // seqlen,
        "seconds": time.perf_counter() - start,
    }
