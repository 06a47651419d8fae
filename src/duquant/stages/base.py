"""The stage: one algorithm of a quantization recipe, owning its options and what it needs.

A stage is a frozen dataclass. Its fields are its options (validated by `check`), and its class says
what it needs (calibration activations, the whole model at once, a teacher) and whether an export can
express what it produces. The pipeline calls a stage only through the hooks below, in recipe order,
at fixed points of the block-by-block loop (duquant.pipeline.quantize_model); a stage that does not
act at a point keeps the default no-op. Stages import no pipeline code: what a hook needs arrives as
arguments (`ctx`: the pipeline's QuantContext).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar


class StageError(ValueError):
    """A stage option is out of range; the message names the option and the fix."""


@dataclass(frozen=True)
class Stage:
    """Base of every stage (see the module docstring)."""

    KIND: ClassVar[str] = ""
    # run-level overrides this stage takes (the name in duquant.config.METHOD_OVERRIDES -> field)
    OVERRIDES: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse out-of-range options (StageError, one line)."""

    @property
    def needs_calibration(self) -> bool:
        """Whether the stage reads calibration activations inside the blocks (statistics, block
        inputs)."""
        return False

    @property
    def needs_windows(self) -> bool:
        """Whether the stage reads calibration windows at all."""
        return self.needs_calibration

    @property
    def whole_model(self) -> str | None:
        """Why the stage needs the whole model at once (None: it works block by block)."""
        return None

    def check_quant(self, quant) -> None:
        """Refuse a weight / activation format this stage cannot work with (ValueError)."""

    def export_refusal(self, fold: bool) -> str | None:
        """Why a compressed-tensors export cannot express this stage's result (None: it can)."""
        return None

    def overridden(self, **values: Any) -> Stage:
        """This stage with the run-level overrides it owns applied (None values ignored)."""
        own = {self.OVERRIDES[k]: v for k, v in values.items() if k in self.OVERRIDES}
        own = {k: v for k, v in own.items() if v is not None}
        return replace(self, **own) if own else self

    def to_dict(self) -> dict:
        """{'stage': kind, option: value, ...}: the stage's record in results and recipe files."""
        return {"stage": self.KIND, **asdict(self)}

    # ------------------------------------------------------------------ hooks (default: no-op)

    def setup(self, ctx) -> None:
        """Before anything changes the model (e.g. keep a teacher)."""

    def transform_model(self, ctx) -> None:
        """Whole-model work before the block loop (e.g. a global rotation, end-to-end learning)."""

    def refine_block(self, ctx, block, groups, plans: dict, stats, index: int) -> dict:
        """Refine one block's plans (block-wise learning, QuaRot's online inputs); the plans to apply."""
        return plans

    def finish(self, ctx) -> None:
        """After every block is quantized (e.g. norm tweaking)."""


def positive(stage: Stage, name: str) -> None:
    """Option `name` is a finite number > 0."""
    v = getattr(stage, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise StageError(f"{stage.KIND}.{name} {v}: must be a positive number")


def at_least(stage: Stage, name: str, minimum: int) -> None:
    """Option `name` is an integer >= minimum."""
    v = getattr(stage, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise StageError(f"{stage.KIND}.{name} {v}: must be an integer >= {minimum}")


def one_of(stage: Stage, name: str, choices: tuple[str, ...]) -> None:
    """Option `name` is one of `choices`."""
    v = getattr(stage, name)
    if v not in choices:
        raise StageError(f"{stage.KIND}.{name} {v!r}: choose one of {', '.join(choices)}")


def require_full_precision_blocks(ctx, what: str) -> None:
    """Refuse a stage that reads the full-precision model (a teacher) when the block store holds
    blocks quantized by an earlier run (a reused --work-dir)."""
    if ctx.store.reused():
        raise ValueError(
            f"{what} needs the full-precision blocks, but the --work-dir holds blocks quantized "
            "by an earlier run: give an empty --work-dir"
        )


def tokens_split(quant) -> bool:
    """Whether a one-window training step may be cut into token shares: not with NVFP4
    activations, which take one scale per tensor (a share of the tokens would get another)."""
    return not (quant.act is not None and quant.act.per_tensor_scale)


def option_names(cls: type[Stage]) -> list[str]:
    """The options of a stage class."""
    return [f.name for f in fields(cls)]
