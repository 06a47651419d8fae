"""Learned input transforms: trained block by block on the quantized block-output error."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from duquant.calibrate import BlockInputs, InputStats
from duquant.models.adapters import InputGroup
from duquant.plan import GroupPlan, HeadShape, fed_by_heads, plan_from_steps
from duquant.transforms.base import BlockRotation, ChannelScale, Sequence

from .rotation import LearnedRotation
from .trainer import LearnedGroup, ste_fake_quant, train_block

log = logging.getLogger(__name__)

# builds the trainable transform of one group from its searched plan and statistics (None: leave
# the group as planned)
Learner = Callable[..., LearnedGroup | None]


def rotation_learner(
    block: nn.Module,
    group: InputGroup,
    plan: GroupPlan,
    stats: InputStats | None,
    heads: HeadShape | None,
    seed: int = 0,
    *,
    per_block: bool = False,
) -> LearnedGroup | None:
    """Ours: start from the plan's smoothing and single block rotation and refine both."""
    steps = list(plan.weight_transform.steps) if isinstance(plan.weight_transform, Sequence) else []
    scale = next((s.scale for s in steps if isinstance(s, ChannelScale)), None)
    rot = [s for s in steps if isinstance(s, BlockRotation)]
    if len(rot) != 1 or len(steps) != len(rot) + (scale is not None):
        return None  # not smoothing + one block rotation (e.g. DuQuant v1): nothing to refine
    dim = block.get_submodule(group.linears[0]).in_features
    return LearnedRotation(
        scale,
        rot[0].rotation,
        learn_scale=not fed_by_heads(group, heads),
        per_block=per_block,
        dim=dim,
    )


def flatquant_learner(
    block: nn.Module,
    group: InputGroup,
    plan: GroupPlan,
    stats: InputStats | None,
    heads: HeadShape | None,
    seed: int = 0,
    *,
    alpha: float = 0.3,
    clip_init: float = 4.0,
    fold: bool = True,
) -> LearnedGroup:
    """FlatQuant: Kronecker transform, channel scale and clipping, from FlatQuant's start (its
    random orthogonal factors seeded by `seed`)."""
    from .flatquant import FlatQuantGroup

    return FlatQuantGroup(
        group,
        {n: block.get_submodule(n).weight.detach().float() for n in group.linears},
        None if stats is None else stats.absmax,
        heads,
        torch.Generator().manual_seed(seed),
        alpha=alpha,
        clip_init=clip_init,
        fold=fold,
    )


def learn_block(
    block: nn.Module,
    groups: tuple[InputGroup, ...],
    inputs: BlockInputs,
    plans: dict[str, GroupPlan],
    stats: dict[str, InputStats] | None,
    learner: Learner,
    quant,
    heads: HeadShape | None,
    seed: int,
    *,
    epochs: int,
    lr: float,
    batch: int,
    normalize_loss: bool = False,
    fold: bool = True,
    targets: list | None = None,
) -> tuple[dict[str, GroupPlan], dict]:
    """Train one block's learnable transforms, each group's made by `learner`; the plans that
    apply what was learned."""
    learned = {}
    for j, g in enumerate(groups):
        st = (stats or {}).get(g.name)
        lg = learner(block, g, plans[g.name], st, heads, seed=seed * 10 + j)
        if lg is not None:
            learned[g.name] = lg
    info = train_block(
        block,
        groups,
        inputs,
        learned,
        quant,
        epochs=epochs,
        lr=lr,
        batch=batch,
        seed=seed,
        targets=targets,
        heads=heads,
        normalize_loss=normalize_loss,
    )
    out = dict(plans)
    for g in groups:
        lg = learned.get(g.name)
        if lg is None:
            continue
        act_clip, weight_clip = lg.clips()
        out[g.name] = plan_from_steps(
            lg.steps(),
            g,
            heads,
            fold,
            {**plans[g.name].info, "learned": True},
            act_clip=act_clip,
            weight_clip=weight_clip,
        )
    return out, info


__all__ = [
    "LearnedGroup",
    "flatquant_learner",
    "rotation_learner",
    "learn_block",
    "ste_fake_quant",
    "train_block",
]
