"""Stages: the algorithms a recipe is made of, each one class owning its options (duquant.stages.base).

Registering a stage is one entry in STAGES (its KIND is the name recipe files use).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from duquant.stages.base import Stage, StageError, option_names
from duquant.stages.gptq import GPTQ
from duquant.stages.learned import EndToEnd, FlatQuant, LearnRotation
from duquant.stages.norms import NormTweak
from duquant.stages.quarot import QuaRot
from duquant.stages.transforms import DuQuantV1, GreedyRotation, Hadamard, Smooth, TransformStage

STAGES: dict[str, type[Stage]] = {
    cls.KIND: cls
    for cls in (
        Smooth,
        Hadamard,
        GreedyRotation,
        DuQuantV1,
        QuaRot,
        LearnRotation,
        FlatQuant,
        EndToEnd,
        GPTQ,
        NormTweak,
    )
}


def stage_from_dict(entry: Any, where: str) -> Stage:
    """A stage from its recipe-file form {'stage': kind, option: value, ...}; StageError naming
    `where` (the file and entry) and the fix otherwise."""
    if not isinstance(entry, dict) or "stage" not in entry:
        raise StageError(
            f"{where}: each stage is a mapping with a 'stage' key (one of {', '.join(STAGES)})"
        )
    kind = entry["stage"]
    cls = STAGES.get(kind)
    if cls is None:
        raise StageError(f"{where}: unknown stage {kind!r}; choose one of {', '.join(STAGES)}")
    options = {k: v for k, v in entry.items() if k != "stage"}
    unknown = sorted(set(options) - set(option_names(cls)))
    if unknown:
        raise StageError(
            f"{where}: stage {kind} has no option {', '.join(unknown)}; its options are "
            f"{', '.join(option_names(cls)) or 'none'}"
        )
    for key, value in options.items():
        _check_type(cls, key, value, where)
    try:
        return cls(**options)
    except StageError as exc:
        raise StageError(f"{where}: {exc}") from None


def _check_type(cls: type[Stage], key: str, value: Any, where: str) -> None:
    """A recipe file's option has the type of the stage option's default (an int may stand for a
    float)."""
    default = next(f.default for f in fields(cls) if f.name == key)
    want = type(default)
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise StageError(
            f"{where}: stage {cls.KIND} option {key} {value!r}: must be a {want.__name__} "
            f"(default {default!r})"
        )


__all__ = [
    "GPTQ",
    "STAGES",
    "DuQuantV1",
    "EndToEnd",
    "FlatQuant",
    "GreedyRotation",
    "Hadamard",
    "LearnRotation",
    "NormTweak",
    "QuaRot",
    "Smooth",
    "Stage",
    "StageError",
    "TransformStage",
    "stage_from_dict",
]
