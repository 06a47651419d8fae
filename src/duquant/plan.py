"""Turn a method config and calibration statistics into the transform plan of one input group.

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
from duquant.formats import QuantSpec
from duquant.methods import MethodConfig
from duquant.models.adapters import InputGroup
from duquant.transforms.base import (
    BlockRotation,
    ChannelScale,
    Permutation,
    Sequence,
    Transform,
    transform_output_rows,
)
from duquant.transforms.hadamard import block_hadamard, random_signs
from duquant.transforms.kronecker import Kronecker
from duquant.transforms.permutation import zigzag_permutation
from duquant.transforms.rotation import best_start, greedy_rotation, per_block_greedy
from duquant.transforms.smooth import share_over_heads, smoothing_scale


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


def _rows(t: Tensor, n: int) -> Tensor:
    """At most `n` evenly spaced rows of `t` (deterministic)."""
    if t.shape[0] <= n:
        return t
    return t[torch.linspace(0, t.shape[0] - 1, n).long()]


def _rotation_steps(
    method: MethodConfig, x: Tensor | None, weights: Tensor, quant, gen
) -> tuple[list[Transform], dict]:
    """The rotation part of a method on (already smoothed) activations `x` and weights."""
    b = method.block_size
    if method.rotation == "none":
        return [], {}
    if method.rotation == "hadamard":
        return [BlockRotation(block_hadamard(b))], {}
    if method.rotation == "random-hadamard":
        return [BlockRotation(block_hadamard(b, random_signs(b, gen)))], {}
    a_spec = (quant.act if quant else None) or QuantSpec()
    w_spec = (quant.weight if quant else None) or QuantSpec()
    start, info0 = None, {}
    # the MX-error objective ranks candidates: a row subsample ranks them as well, far cheaper
    xs, ws = _rows(x, method.objective_rows), _rows(weights, method.objective_rows)
    if method.refine_from == "random-hadamard":
        cands = [block_hadamard(b, random_signs(b, gen)) for _ in range(method.start_candidates)]
        pick, errs = best_start(xs, cands, a_spec, ws, w_spec) if len(cands) > 1 else (0, [])
        start, info0 = cands[pick], {"start_errors": errs, "start_pick": pick}
    kw = dict(
        block_size=b,
        max_steps=method.max_steps,
        generator=gen,
        objective=method.objective,
        swap_index=method.swap_index,
        spec=a_spec,
        w_spec=w_spec,
    )
    w = None
    if method.objective == "mx":  # the range objective keeps every sampled row
        x, w = xs, ws
    if method.rotation == "greedy":
        if method.per_block:
            r, info = per_block_greedy(x, weight=w, start=start, **kw)
        else:
            r, info = greedy_rotation(x, start=start, weight=w, **kw)
        return [BlockRotation(r)], {**info0, **info}
    if method.rotation == "duquant-v1":
        r1, info1 = greedy_rotation(x, start=start, weight=w, **kw)
        rot1 = BlockRotation(r1)
        x1 = rot1(x.float())
        perm = Permutation(zigzag_permutation(x1.abs().amax(dim=0), b))
        x2 = perm(x1)
        w2 = None if w is None else perm.weight(rot1.weight(w.float()))
        r2, info2 = greedy_rotation(x2, weight=w2, **kw)
        return [rot1, perm, BlockRotation(r2)], {"steps": [info1["steps"], info2["steps"]]}
    raise ValueError(f"unknown rotation {method.rotation!r}")


def plan_group(
    block: nn.Module,
    group: InputGroup,
    method: MethodConfig,
    quant,
    stats: InputStats | None,
    heads: HeadShape | None = None,
    seed: int = 0,
) -> GroupPlan:
    """Build the transform plan of `group` for `method` from calibration statistics."""
    weights = [block.get_submodule(n).weight.detach().float() for n in group.linears]
    w_cat = torch.cat(weights, dim=0)
    gen = torch.Generator().manual_seed(seed)
    steps: list[Transform] = []
    info: dict = {}
    x = None if stats is None else stats.sample.float()
    if method.smooth:
        scale = smoothing_scale(stats.absmax, weights, method.alpha)
        if fed_by_heads(group, heads):
            scale = share_over_heads(scale, heads.n_heads, heads.n_kv_heads)
        steps.append(ChannelScale(scale))
        x = x / scale
        w_cat = w_cat * scale
    rot, rinfo = _rotation_steps(method, x, w_cat, quant, gen)
    info.update(rinfo)
    return plan_from_steps(steps + rot, group, heads, method.fold, info)


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
