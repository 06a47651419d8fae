"""Ours, end to end: every block's smoothing and block rotation refined jointly on the model's loss.

The block-wise learner (duquant.learn.rotation) fits each block to its own output; here every
group's `LearnedRotation` of every block trains at once, through the whole quantized model
(straight-through MX quantization of activations and weights), on the KL divergence from the
full-precision model's next-token distribution over the calibration windows (SpinQuant's idea,
on DuQuant++'s per-input block rotations instead of a residual-stream rotation). The starting
point is duquant++mx's searched plans; the result is still one smoothing and one 32 x 32 block
rotation per input, so the online cost and the export are DuQuant++'s.

Training runs block by block through the pipeline's block store, as norm tweaking does
(duquant.learn.norms.train_blockwise): each step runs the blocks forward keeping their inputs and
backward recomputing each block, whose groups' linears are wrapped for training only while it runs.
The teacher is the exact next-token distribution of the step's window from a full-precision pass of
that window through the same store (duquant.learn.teacher.LiveTargets; between the trainer's calls
the blocks are the full-precision ones). So neither a copy of the model nor the whole model in
memory is needed (`--stream` works), and ranks share steps as norm tweaking's do.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from duquant.calibrate import block_output
from duquant.models.adapters import Adapter, InputGroup
from duquant.models.moe import unfuse_block
from duquant.plan import GroupPlan, HeadShape, plan_from_steps

from . import rotation_learner
from .norms import train_blockwise
from .teacher import TopK
from .trainer import LearnedGroup, quantized_wrappers


class _Wrapped:
    """The learned transforms as the block-by-block trainer calls them: block `i` runs with its
    groups' linears wrapped (straight-through quantization through the learned transforms) for
    the length of the call; the final norm stays the model's."""

    def __init__(self, adapter: Adapter, learned, groups, quant, heads):
        self.adapter, self.learned, self.groups = adapter, learned, groups
        self.quant, self.heads = quant, heads

    def params(self) -> list[Tensor]:
        """Every learned group's parameters, block by block."""
        return [p for lgs in self.learned for lg in lgs.values() for p in lg.parameters()]

    def call(self, i: int, block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
        """Block `i`'s hidden-state output through its wrapped linears."""
        unfuse_block(block, self.adapter)  # a streamed block comes back with its experts stacked
        groups = self.groups[i]
        with quantized_wrappers(block, groups, self.learned[i], self.quant, self.heads):
            return block_output(block, hidden, kwargs)

    def final_weight(self) -> None:
        """The final norm is not trained here: the model's own weight."""
        return None


def _learners(
    model, adapter: Adapter, store, plans, heads, per_block: bool
) -> tuple[list[dict[str, LearnedGroup]], list[tuple[InputGroup, ...]]]:
    """Per block, the trainable transform of each group that has smoothing + one rotation, and
    the block's groups (each block loaded once)."""
    learned, groups = [], []
    for i in range(len(adapter.blocks(model))):
        block = store.load(i)
        unfuse_block(block, adapter)
        gs = adapter.block_groups(block)
        lgs = {}
        for g in gs:
            lg = rotation_learner(block, g, plans[i][g.name], None, heads, per_block=per_block)
            if lg is not None:
                lgs[g.name] = lg
        store.release(i)  # full precision: dropped, never written
        learned.append(lgs)
        groups.append(gs)
    return learned, groups


def learn_end_to_end(
    model: nn.Module,
    adapter: Adapter,
    store,
    plans: list[dict[str, GroupPlan]],
    quant,
    windows: Tensor,
    targets: Sequence[TopK],
    seed: int = 0,
    *,
    epochs: int,
    lr: float,
    batch: int,
    fold: bool = True,
    per_block: bool = False,
    split_tokens: bool = True,
) -> tuple[list[dict[str, GroupPlan]], dict]:
    """`plans` of every block (as searched) after joint training towards the teacher's `targets`
    (one per window, indexable: a list or `LiveTargets`), block by block through `store`; the
    model is left as it was (stacked experts unfused, as the pipeline does)."""
    heads = HeadShape.of(model.config)
    learned, groups = _learners(model, adapter, store, plans, heads, per_block)
    info = train_blockwise(
        model,
        adapter,
        store,
        windows,
        targets,
        _Wrapped(adapter, learned, groups, quant, heads),
        epochs=epochs,
        lr=lr,
        batch=batch,
        seed=seed,
        split_tokens=split_tokens,
        info={"loss": "kl"},
        desc="learn e2e",
    )
    out = []
    for i, gs in enumerate(groups):
        new = dict(plans[i])
        for g in gs:
            lg = learned[i].get(g.name)
            if lg is not None:
                new[g.name] = plan_from_steps(
                    lg.steps(), g, heads, fold, {**plans[i][g.name].info, "learned": True}
                )
        out.append(new)
    return out, info
