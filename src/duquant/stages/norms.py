"""The norm-tweaking stage: after quantization, the pre-norm weights trained on the KL from the
full-precision model through the quantized model (Norm Tweaking, Li et al. 2024; duquant.learn.norms).

Block by block through the pipeline's block store: `setup` runs the full-precision model once and
keeps its next-token distributions compactly (duquant.learn.teacher), `finish` trains the quantized
model's norms on them; no second copy of the model, and a streamed quantization (`--stream`) works
the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from duquant.stages.base import (
    Stage,
    at_least,
    positive,
    require_full_precision_blocks,
    tokens_split,
)


@dataclass(frozen=True)
class NormTweak(Stage):
    """Norm tweaking: `epochs` passes over the calibration windows, `batch` windows a step (shared
    by the ranks), AdamW at `lr`, against the teacher's `topk` most likely tokens per position (and
    the rest's mass), on each window's first `tokens` tokens (None: all of them)."""

    KIND: ClassVar[str] = "norm-tweak"
    OVERRIDES: ClassVar[dict[str, str]] = {
        "norm_epochs": "epochs",
        "norm_lr": "lr",
        "norm_batch": "batch",
    }
    epochs: int = 1
    lr: float = 1e-2
    batch: int = 1
    topk: int = 256
    tokens: int | None = None

    def check(self) -> None:
        at_least(self, "epochs", 0)
        positive(self, "lr")
        at_least(self, "batch", 1)
        at_least(self, "topk", 1)
        if self.tokens is not None:
            at_least(self, "tokens", 2)  # one next-token prediction at least

    @property
    def needs_windows(self) -> bool:
        return True  # the whole model's forward passes on them, no block statistics

    def _active(self, ctx) -> bool:
        """Whether there is anything to tune (with nothing quantized the model stays exactly the
        full-precision one)."""
        return self.epochs > 0 and (ctx.quant.weight is not None or ctx.quant.act is not None)

    def _windows(self, ctx):
        """The calibration windows as trained on (their first `tokens` tokens)."""
        return ctx.windows if self.tokens is None else ctx.windows[:, : self.tokens]

    def setup(self, ctx) -> None:
        """The full-precision teacher's compact next-token distributions, computed once through
        the block store before any block is quantized (kept in `ctx.teacher`)."""
        if not self._active(ctx):
            return
        from duquant.learn.norms import check_batch
        from duquant.learn.teacher import teacher_targets

        check_batch(self.batch, len(ctx.windows))  # refused before any work
        require_full_precision_blocks(ctx, "norm tweaking")
        ctx.teacher = teacher_targets(
            ctx.model, ctx.adapter, ctx.store, self._windows(ctx), self.topk
        )

    def finish(self, ctx) -> None:
        """Tune the norms towards the teacher's distributions kept by `setup`, then drop them."""
        if ctx.teacher is None:
            return
        from duquant.learn.norms import tune_norms

        ctx.report.norm_tuning = tune_norms(
            ctx.model,
            ctx.adapter,
            ctx.store,
            self._windows(ctx),
            ctx.teacher,
            epochs=self.epochs,
            lr=self.lr,
            batch=self.batch,
            seed=ctx.seed,
            split_tokens=tokens_split(ctx.quant),
        )
        ctx.teacher = None
