"""Norm tweaking after quantization: the pre-norm weights refined on the model's KL from full precision.

The weights of the norms that feed quantized linears (each block's attention and MLP input norms,
which already hold DuQuant++'s folded smoothing) and of the final norm stay in full precision in every
engine's checkpoint, so they are free parameters of the quantized model: no online cost, nothing to
re-quantize, exported as they are. After GPTQ they are trained through the whole quantized model
(straight-through MX quantization of the activations, weights fixed on their grid) on the KL
divergence from the full-precision model's next-token distribution over the calibration windows
(the idea of Norm Tweaking, Li et al. 2024, with a distillation loss). Each weight is parametrised
as (offset + w0)·exp(t) − offset, t = 0 at the start, so a step is relative to the weight's size.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.utils.parametrize as parametrize
from torch import Tensor, nn
from tqdm import tqdm

from duquant.models.adapters import Adapter

from .distill import distill_step

log = logging.getLogger(__name__)


class RelativeScale(nn.Module):
    """w = (offset + w0)·exp(t) − offset, the trained tensor being t (zero at the start)."""

    def __init__(self, w0: Tensor, offset: float):
        super().__init__()
        self.offset = offset
        self.register_buffer("base", w0.detach().float() + offset)

    def forward(self, t: Tensor) -> Tensor:
        return (self.base * torch.exp(t) - self.offset).to(t.dtype)

    def right_inverse(self, w: Tensor) -> Tensor:
        return torch.zeros_like(w)


def tuned_norms(model: nn.Module, adapter: Adapter) -> list[nn.Module]:
    """The norms whose weights are tuned: every block's pre-norms of quantized inputs, the final norm."""
    norms = [
        block.get_submodule(g.norm)
        for block in adapter.blocks(model)
        for g in adapter.block_groups(block)
        if g.norm is not None
    ]
    norms.append(model.get_submodule(adapter.final_norm))
    return list({id(m): m for m in norms}.values())  # q/k/v and a router may share a norm


def tune_norms(
    model: nn.Module,
    teacher: nn.Module,
    adapter: Adapter,
    windows: Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int = 0,
) -> dict:
    """Train the quantized `model`'s norm weights towards `teacher` in place; the mean KL per epoch."""
    norms = tuned_norms(model, adapter)
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    for m in norms:
        parametrize.register_parametrization(
            m, "weight", RelativeScale(m.weight.data, adapter.norm_offset)
        )
    params = [m.parametrizations.weight.original for m in norms]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = [windows[i : i + 1] for i in range(len(windows))]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(batches)))
    gen = torch.Generator().manual_seed(seed)
    info: dict = {"kl_per_epoch": [], "norms": len(norms), "steps": 0}
    try:
        for _ in tqdm(range(epochs), desc="tune norms", leave=False):
            total = 0.0
            for i in torch.randperm(len(batches), generator=gen).tolist():
                # each block's InputQuantizers drop their cached activation (and its graph) when
                # the block's forward ends (qlinear.reset_caches_after_forward)
                total += distill_step(model, teacher, batches[i], opt, sched)
                info["steps"] += 1
            info["kl_per_epoch"].append(total / max(1, len(batches)))
    finally:
        for m in norms:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            m.weight.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    kls = info["kl_per_epoch"]
    if kls:
        log.info("norm tweaking: mean KL %.4g (first epoch) -> %.4g (last)", kls[0], kls[-1])
    return info


__all__ = ["RelativeScale", "tune_norms", "tuned_norms"]
