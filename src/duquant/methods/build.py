"""Turn a method config and calibration statistics into the transform plan of one input group."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from duquant.calibrate import InputStats
from duquant.methods import MethodConfig
from duquant.models.adapters import InputGroup
from duquant.transforms.base import Sequence, Transform


@dataclass
class GroupPlan:
    """The transform of one input group: what the weights get, what runs online, what folds offline."""

    weight_transform: Transform | None = None
    online: Transform | None = None
    folds: list = field(default_factory=list)  # callables(block) applying exact offline folds
    info: dict = field(default_factory=dict)

    def fold(self, block: nn.Module) -> None:
        """Apply the offline folds to the block (norm weights, producer rows)."""
        for f in self.folds:
            f(block)


def plan_group(
    block: nn.Module,
    group: InputGroup,
    method: MethodConfig,
    quant,
    stats: InputStats | None,
    seed: int = 0,
) -> GroupPlan:
    """Build the transforms of `group` for `method` (no transform at all for rtn)."""
    steps: list[Transform] = []
    if not steps:
        return GroupPlan()
    seq = Sequence(steps)
    return GroupPlan(weight_transform=seq, online=seq)
