"""Learned stages: transforms trained on the quantized model's error.

`LearnRotation` (ours) and `FlatQuant` train block by block on the quantized block-output error;
`EndToEnd` trains every block's smoothing and rotation at once on the KL from the full-precision
model. The training code is duquant.learn; these classes own the options and say when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from duquant.stages.base import (
    Stage,
    at_least,
    one_of,
    positive,
    require_full_precision_blocks,
    tokens_split,
)

# the run-level overrides every learned stage takes (--learn-epochs, --learn-lr, --learn-batch)
_LEARN_OVERRIDES = {"learn_epochs": "epochs", "learn_lr": "lr", "learn_batch": "batch"}


@dataclass(frozen=True)
class BlockLearner(Stage):
    """A block-wise learned stage: trains each block's transforms after they are planned."""

    OVERRIDES: ClassVar[dict[str, str]] = {**_LEARN_OVERRIDES, "learn_target": "target"}
    epochs: int = 2
    lr: float = 1e-3
    batch: int = 4
    # what the quantized block is trained to reproduce: its full-precision self on the same
    # (quantized-stream) inputs, `block`, or the full-precision model's output of this block,
    # `model` (also corrects the error accumulated in earlier blocks)
    target: str = "block"
    normalized_loss: bool = False  # step on MSE / its detached value (FlatQuant)

    def check(self) -> None:
        at_least(self, "epochs", 0)
        positive(self, "lr")
        at_least(self, "batch", 1)
        one_of(self, "target", ("block", "model"))

    @property
    def needs_calibration(self) -> bool:
        return True

    def learner(self, fold: bool, per_block: bool):
        """The per-group learner: (block, group, plan, stats, heads, seed) -> LearnedGroup | None."""
        raise NotImplementedError

    def learn(
        self,
        block,
        groups,
        inputs,
        plans: dict,
        stats,
        quant,
        heads,
        seed: int,
        *,
        fold: bool = True,
        per_block: bool = False,
        targets: list | None = None,
    ) -> tuple[dict, dict]:
        """Train one block's transforms from `plans`; (the plans that apply them, the training
        record)."""
        from duquant.learn import learn_block

        return learn_block(
            block,
            groups,
            inputs,
            plans,
            stats,
            self.learner(fold, per_block),
            quant,
            heads,
            seed=seed,
            epochs=self.epochs,
            lr=self.lr,
            batch=self.batch,
            normalize_loss=self.normalized_loss,
            fold=fold,
            targets=targets,
        )

    def refine_block(self, ctx, block, groups, plans: dict, stats, index: int) -> dict:
        plans, info = self.learn(
            block,
            groups,
            ctx.inputs,
            plans,
            stats,
            ctx.quant,
            ctx.heads,
            ctx.seed * 1000 + index,
            fold=ctx.recipe.fold,
            per_block=ctx.recipe.per_block_rotation,
            targets=ctx.fp_out if self.target == "model" else None,
        )
        ctx.report.learn.append(info)
        ctx.log.info(
            "layer %d learned: block MSE %.4g -> %.4g",
            index,
            info["loss_before"],
            info["loss_after"],
        )
        return plans


@dataclass(frozen=True)
class LearnRotation(BlockLearner):
    """Ours: the planned smoothing and single block rotation refined block by block (rotation
    R0·cayley(A), smoothing s0·exp(t), straight-through MX quantization, AdamW)."""

    KIND: ClassVar[str] = "learn-rotation"

    def learner(self, fold: bool, per_block: bool):
        from duquant.learn import rotation_learner

        return partial(rotation_learner, per_block=per_block)


@dataclass(frozen=True)
class FlatQuant(BlockLearner):
    """FlatQuant (Sun et al., 2024) on the MX grid: learned Kronecker transforms, channel scales
    and clipping, trained block by block with FlatQuant's defaults."""

    KIND: ClassVar[str] = "flatquant"
    epochs: int = 15
    lr: float = 5e-3
    batch: int = 4
    normalized_loss: bool = True
    alpha: float = 0.3  # FlatQuant's per-channel scale start: SmoothQuant-style, α = 0.3
    clip_init: float = 4.0  # FlatQuant's clip logit start: ratio sigmoid(4) = 0.982

    def check_quant(self, quant) -> None:
        from duquant.learn.flatquant import check_quant

        check_quant(quant)  # its clipping is defined on MXFP4 group-maximum scales

    def export_refusal(self, fold: bool) -> str | None:
        return (
            "is not exportable: its learned Kronecker transforms and clip ratios have no "
            "compressed-tensors form; evaluate it in process (drop --save)"
        )

    def learner(self, fold: bool, per_block: bool):
        from duquant.learn import flatquant_learner

        return partial(flatquant_learner, alpha=self.alpha, clip_init=self.clip_init, fold=fold)


@dataclass(frozen=True)
class EndToEnd(Stage):
    """Ours: every block's smoothing and block rotation (as planned by the recipe's other stages)
    trained at once through the whole quantized model on the KL from the full-precision model."""

    KIND: ClassVar[str] = "end-to-end"
    OVERRIDES: ClassVar[dict[str, str]] = dict(_LEARN_OVERRIDES)
    epochs: int = 2
    lr: float = 3e-3
    batch: int = 1

    def check(self) -> None:
        at_least(self, "epochs", 0)
        positive(self, "lr")
        at_least(self, "batch", 1)

    @property
    def needs_calibration(self) -> bool:
        return True

    def transform_model(self, ctx) -> None:
        """Plan every block (on copies of one block at a time), then train the plans end to end
        block by block against each step's window through the full-precision blocks; the
        pipeline applies them block by block instead of planning."""
        from duquant.learn.e2e import learn_end_to_end
        from duquant.learn.norms import check_batch
        from duquant.learn.teacher import LiveTargets

        check_batch(self.batch, len(ctx.windows))
        require_full_precision_blocks(ctx, "end-to-end training")
        searched = ctx.plan_scratch()  # the recipe without this stage, RTN weights
        # the exact KL, each step's window through the full-precision blocks: the rotations,
        # re-rounded every step, trained on top-256 targets ended worse than untrained (§14)
        targets = LiveTargets(ctx.model, ctx.adapter, ctx.store, ctx.windows)
        ctx.block_plans, info = learn_end_to_end(
            ctx.model,
            ctx.adapter,
            ctx.store,
            searched,
            ctx.quant,
            ctx.windows,
            targets,
            ctx.seed,
            epochs=self.epochs,
            lr=self.lr,
            batch=self.batch,
            fold=ctx.recipe.fold,
            per_block=ctx.recipe.per_block_rotation,
            split_tokens=tokens_split(ctx.quant),
        )
        ctx.report.learn.append(info)
