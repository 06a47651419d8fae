"""Ours, end to end: every block's smoothing and block rotation refined jointly on the model's loss.

The block-wise learner (duquant.learn.rotation) fits each block to its own output; here every
group's `LearnedRotation` of every block trains at once, through the whole quantized model
(straight-through MX quantization of activations and weights), on the KL divergence from the
full-precision model's next-token distribution over the calibration windows (SpinQuant's idea,
on DuQuant++'s per-input block rotations instead of a residual-stream rotation). The starting
point is duquant++mx's searched plans; the result is still one smoothing and one 32 x 32 block
rotation per input, so the online cost and the export are DuQuant++'s.
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack

import torch
from torch import Tensor, nn
from tqdm import tqdm

from duquant.models.adapters import Adapter
from duquant.models.moe import unfuse_block
from duquant.plan import GroupPlan, HeadShape, plan_from_steps

from . import rotation_learner
from .distill import distill_step, kl_from_teacher
from .trainer import LearnedGroup, _clear, full_precision, quantized_wrappers

log = logging.getLogger(__name__)


class _Teacher:
    """The wrapped model called with its wrappers computing as the linears they wrap: the
    full-precision model, without a copy of it."""

    def __init__(self, model: nn.Module, caches: list[dict]):
        self.model, self.caches = model, caches

    def __call__(self, ids: Tensor):
        with full_precision(self.caches):
            return self.model(ids)


@torch.no_grad()
def _mean_kl(student: nn.Module, teacher: _Teacher, windows: Tensor, caches) -> float:
    """KL of the wrapped model from the teacher, averaged over the windows."""
    total = 0.0
    for w in windows:
        total += kl_from_teacher(student(w[None]).logits, teacher(w[None]).logits).item()
        _clear(caches)
    return total / max(1, len(windows))


def learn_end_to_end(
    model: nn.Module,
    adapter: Adapter,
    plans: list[dict[str, GroupPlan]],
    quant,
    windows: Tensor,
    seed: int = 0,
    *,
    epochs: int,
    lr: float,
    batch: int,
    fold: bool = True,
    per_block: bool = False,
) -> tuple[list[dict[str, GroupPlan]], dict]:
    """`plans` of every block (as searched) after joint training. The model itself is the student
    (its linears wrapped while training) and, with the wrappers passing through, the teacher: no
    copy of it is made; it is left as it was (stacked experts unfused, as the pipeline does)."""
    heads = HeadShape.of(model.config)
    student = model
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)  # only the learned transforms train
    learned: list[dict[str, LearnedGroup]] = []
    with ExitStack() as stack:
        stack.callback(lambda: [p.requires_grad_(True) for p in trainable])
        caches = []
        for i, block in enumerate(adapter.blocks(student)):
            unfuse_block(block, adapter)
            groups = adapter.block_groups(block)
            lgs = {}
            for g in groups:
                lg = rotation_learner(block, g, plans[i][g.name], None, heads, per_block=per_block)
                if lg is not None:
                    lgs[g.name] = lg
            learned.append(lgs)
            caches += stack.enter_context(quantized_wrappers(block, groups, lgs, quant, heads))
        teacher = _Teacher(model, caches)
        params = [p for lgs in learned for lg in lgs.values() for p in lg.parameters()]
        n_windows = len(windows)
        probe = windows[: min(4, n_windows)]
        info = {"loss_before": _mean_kl(student, teacher, probe, caches), "steps": 0, "loss": "kl"}
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        batch = max(1, batch)
        n_batches = math.ceil(n_windows / batch)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * n_batches))
        gen = torch.Generator().manual_seed(seed)
        bar = tqdm(total=epochs * n_batches, desc="learn e2e", leave=False)
        for _ in range(epochs):
            order = torch.randperm(n_windows, generator=gen)
            for b in range(n_batches):
                idx = order[b * batch : (b + 1) * batch]
                loss = distill_step(student, teacher, windows[idx], opt, sched)
                _clear(caches)
                info["steps"] += 1
                bar.update(1)
                bar.set_postfix(kl=f"{loss:.4f}")
        bar.close()
        info["loss_after"] = _mean_kl(student, teacher, probe, caches)
    log.info("end-to-end: KL %.4g -> %.4g", info["loss_before"], info["loss_after"])
    out = []
    for i, block in enumerate(adapter.blocks(student)):
        new = dict(plans[i])
        for g in adapter.block_groups(block):
            lg = learned[i].get(g.name)
            if lg is not None:
                new[g.name] = plan_from_steps(
                    lg.steps(), g, heads, fold, {**plans[i][g.name].info, "learned": True}
                )
        out.append(new)
    return out, info
