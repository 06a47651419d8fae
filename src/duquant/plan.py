"""Turn a recipe's transform stages and calibration statistics into the plan of one input group.

Per input group the transform is a list of steps (smoothing Λ, block rotations, permutation). The
weights of the group's linears receive all of them offline. Online, a leading run of steps that can
be folded exactly is moved into what produces the activation instead: Λ into the preceding RMSNorm
(q/k/v, gate/up) or into up_proj's rows (down_proj input); Λ and block rotations that stay inside one
attention head into v_proj's rows (o_proj input). What cannot be folded runs online.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from duquant.calibrate import InputStats
from duquant.models.adapters import InputGroup
from duquant.transforms.base import (
    BlockRotation,
    ChannelScale,
    Sequence,
    Transform,
    transform_output_rows,
)
from duquant.transforms.kronecker import Kronecker


@dataclass(frozen=True)
class HeadShape:
    """Attention geometry needed to fold o_proj-input transforms into v_proj."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> HeadShape:
        """From a transformers config."""
        n = config.num_attention_heads
        return cls(
            n,
            getattr(config, "num_key_value_heads", None) or n,
            getattr(config, "head_dim", None) or config.hidden_size // n,
        )


@dataclass
class GroupPlan:
    """The transform of one input group: what the weights get, what runs online, what folds offline."""

    weight_transform: Transform | None = None
    online: Transform | None = None
    folded: list[Transform] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    # learned clipping (FlatQuant): the ratio applied to each activation group's maximum before the
    # scale rule (one for the input), and per linear one ratio per output row [out, 1] for its weight
    act_clip: float | None = None
    weight_clip: dict[str, Tensor] = field(default_factory=dict)

    def fold(
        self,
        block: nn.Module,
        group: InputGroup,
        heads: HeadShape | None,
        norm_offset: float = 0.0,
    ) -> None:
        """Apply the folded steps to the norm weight or the producer's output rows, in place.

        A norm scales by (norm_offset + weight) (Gemma: 1 + w); full-precision readers of the same
        activation (a MoE router) get the step's weight map, so they see what they saw before.
        """
        for step in self.folded:
            if group.norm is not None:
                norm = block.get_submodule(group.norm)
                w = norm.weight.data.float() + norm_offset
                norm.weight.data = (step(w) - norm_offset).to(norm.weight.dtype)
                for name in group.fp_readers:
                    reader = block.get_submodule(name)
                    reader.weight.data = step.weight(reader.weight.data.float()).to(
                        reader.weight.dtype
                    )
            else:
                producer = block.get_submodule(group.producer)
                rows = producer_rows(group, producer.weight.shape[0], heads)
                transform_output_rows(producer, _to_producer(step, group, heads), rows)


def producer_rows(group: InputGroup, out_features: int, heads: HeadShape | None) -> slice:
    """The output rows of the group's producer that make its input (all of them unless fused)."""
    if group.producer_rows is None:
        return slice(0, out_features)
    if group.producer_rows == "up":  # gate|up stacked: the second half
        return slice(out_features // 2, out_features)
    if group.producer_rows == "v":  # q|k|v stacked
        q, kv = heads.n_heads * heads.head_dim, heads.n_kv_heads * heads.head_dim
        return slice(q + kv, q + 2 * kv)
    raise ValueError(f"unknown producer rows {group.producer_rows!r} of group {group.name}")


def fed_by_heads(group: InputGroup, heads: HeadShape | None) -> bool:
    """Whether the group's input is attention-head output (the o_proj input)."""
    return group.heads and heads is not None


def _to_producer(step: Transform, group: InputGroup, heads: HeadShape | None) -> Transform:
    """The same map expressed on the producer's output width (KV heads for v_proj under GQA)."""
    if not fed_by_heads(group, heads) or heads.n_kv_heads == heads.n_heads:
        return step
    rep = heads.n_heads // heads.n_kv_heads
    if isinstance(step, ChannelScale):
        return ChannelScale(
            step.scale.reshape(heads.n_kv_heads, rep, heads.head_dim)[:, 0].reshape(-1)
        )
    return step  # a shared block rotation is the same on every head


def _foldable(step: Transform, group: InputGroup, heads: HeadShape | None) -> bool:
    """Whether `step` can move into the norm / producer exactly."""
    if isinstance(step, ChannelScale):
        if fed_by_heads(group, heads):
            rep = heads.n_heads // heads.n_kv_heads
            s = step.scale.reshape(heads.n_kv_heads, rep, heads.head_dim)
            return bool((s == s[:, :1]).all())
        return group.norm is not None or group.producer is not None
    if isinstance(step, BlockRotation) and fed_by_heads(group, heads):
        return step.rotation.shape[0] == 1 and heads.head_dim % step.block_size == 0
    if isinstance(step, Kronecker) and fed_by_heads(group, heads):
        # the same map inside every head (no left factor): v_proj's rows take it, whatever the GQA
        return step.left is None and heads.head_dim % step.right.shape[0] == 0
    return False


def plan_group(
    block: nn.Module,
    group: InputGroup,
    recipe,
    quant,
    stats: InputStats | None,
    heads: HeadShape | None = None,
    seed: int = 0,
) -> GroupPlan:
    """Build the transform plan of `group` from the recipe's transform stages (in order, each
    seeing the calibration sample and weights as the earlier ones left them) and the statistics."""
    weights = [block.get_submodule(n).weight.detach().float() for n in group.linears]
    w_cat = torch.cat(weights, dim=0)
    gen = torch.Generator().manual_seed(seed)
    steps: list[Transform] = []
    info: dict = {}
    x = None if stats is None else stats.sample.float()
    for stage in recipe.transforms:
        new, x, w_cat, sinfo = stage.plan(x, w_cat, weights, stats, group, heads, quant, gen)
        steps += new
        info.update(sinfo)
    return plan_from_steps(steps, group, heads, recipe.fold, info)


def plan_from_steps(
    steps: list[Transform],
    group: InputGroup,
    heads: HeadShape | None,
    fold: bool = True,
    info: dict | None = None,
    act_clip: float | None = None,
    weight_clip: dict[str, Tensor] | None = None,
) -> GroupPlan:
    """The plan that applies `steps` to the group: weights get all of them, the leading exactly
    foldable run moves into the norm / producer (when `fold`), the rest runs online; learned clip
    ratios, when given, go with it."""
    info = {} if info is None else info
    clips = {"act_clip": act_clip, "weight_clip": weight_clip or {}}
    if not steps:
        return GroupPlan(info=info, **clips)
    n_fold = 0
    while fold and n_fold < len(steps) and _foldable(steps[n_fold], group, heads):
        n_fold += 1
    online = steps[n_fold:]
    return GroupPlan(
        weight_transform=Sequence(steps),
        online=Sequence(online) if online else None,
        folded=steps[:n_fold],
        info=info,
        **clips,
    )


def folds_into_producer(group: InputGroup, step: Transform, heads: HeadShape | None) -> bool:
    """Whether `step`, leading the group's transform, folds into the producer's rows (not a norm)."""
    return group.norm is None and group.producer is not None and _foldable(step, group, heads)
