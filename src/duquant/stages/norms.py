"""The norm-tweaking stage: after quantization, the pre-norm weights trained on the KL from the
full-precision model through the quantized model (Norm Tweaking, Li et al. 2024; duquant.learn.norms)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

from duquant.stages.base import Stage, at_least, positive


@dataclass(frozen=True)
class NormTweak(Stage):
    """Norm tweaking: `epochs` passes over the calibration windows, AdamW at `lr`."""

    KIND: ClassVar[str] = "norm-tweak"
    OVERRIDES: ClassVar[dict[str, str]] = {"norm_epochs": "epochs", "norm_lr": "lr"}
    epochs: int = 2
    lr: float = 1e-2

    def check(self) -> None:
        at_least(self, "epochs", 0)
        positive(self, "lr")

    @property
    def needs_windows(self) -> bool:
        return True  # the whole model's forward passes on them, no block statistics

    @property
    def whole_model(self) -> str | None:
        return "trains through the whole model at once (end-to-end training or norm tweaking)"

    def setup(self, ctx) -> None:
        """Keep the full-precision model as the teacher (with nothing quantized there is nothing
        to tune: the model stays exactly the full-precision one)."""
        if self.epochs > 0 and (ctx.quant.weight is not None or ctx.quant.act is not None):
            ctx.teacher = copy.deepcopy(ctx.model).requires_grad_(False)

    def finish(self, ctx) -> None:
        """Tune the norms towards the teacher kept by `setup`, then drop it."""
        if ctx.teacher is None:
            return
        from duquant.learn.norms import tune_norms

        ctx.report.norm_tuning = tune_norms(
            ctx.model,
            ctx.teacher,
            ctx.adapter,
            ctx.windows,
            epochs=self.epochs,
            lr=self.lr,
            seed=ctx.seed,
        )
        ctx.teacher = None
