"""Methods as recipes of stages: a registered method is a named `Recipe`; a user's recipe is a YAML
file of the same form (`--recipe FILE`, `load_recipe`).

A recipe file:

    name: my-dqpp            # optional (default: the file name)
    fold: true               # optional: fold exactly-foldable steps into norms / producers
    stages:
      - stage: smooth
        alpha: 0.6
      - stage: greedy-rotation
        objective: mx
        start: random-hadamard
        start_candidates: 16
        max_steps: 0
      - stage: gptq

Stage kinds and their options: duquant.stages.STAGES (each class documents its own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from duquant.stages import (
    GPTQ,
    STAGES,
    DuQuantV1,
    EndToEnd,
    FlatQuant,
    GreedyRotation,
    Hadamard,
    LearnRotation,
    NormTweak,
    QuaRot,
    Smooth,
    Stage,
    StageError,
    TransformStage,
    stage_from_dict,
)
from duquant.stages.transforms import SEARCH_ROWS

RECIPE_KEYS = ("name", "fold", "stages")


class RecipeError(ValueError):
    """A recipe (name or file) is unknown or malformed; the message names it and the fix."""


@dataclass(frozen=True)
class Recipe:
    """A method: its stages in the order they act, and whether it quantizes at all (fp does not)."""

    name: str
    stages: tuple[Stage, ...] = ()
    quantize: bool = True
    fold: bool = True  # fold exactly-foldable steps into norms / producers (False: all online)
    source: str | None = field(default=None, compare=False)  # the recipe file, if any

    def get(self, cls: type[Stage]) -> Stage | None:
        """The recipe's first stage of class `cls` (or a subclass), or None."""
        return next((s for s in self.stages if isinstance(s, cls)), None)

    @property
    def transforms(self) -> tuple[TransformStage, ...]:
        """The stages that build each input group's transform, in order."""
        return tuple(s for s in self.stages if isinstance(s, TransformStage))

    @property
    def needs_calibration(self) -> bool:
        """Whether the recipe reads calibration activations inside the blocks."""
        return any(s.needs_calibration for s in self.stages)

    @property
    def needs_windows(self) -> bool:
        """Whether the recipe reads calibration windows at all (GPTQ aside: see `gptq`)."""
        return any(s.needs_windows for s in self.stages)

    @property
    def whole_model_step(self) -> str | None:
        """What this recipe does to the whole model at once (None: it works block by block), the
        reason a streamed quantization, which holds one block at a time, cannot run it."""
        return next((s.whole_model for s in self.stages if s.whole_model), None)

    @property
    def conflict(self) -> str | None:
        """Why these stages cannot run together (None: they can)."""
        if self.get(EndToEnd) is not None and self.global_rotation:
            # EndToEnd's starting plans come from a pass of the recipe less itself over the model
            # as it is: after QuaRot's in-place rotation that pass would rotate it again
            return (
                f"method {self.name}: end-to-end training after QuaRot's global rotation is not "
                "supported; drop one of the two stages"
            )
        return None

    @property
    def global_rotation(self) -> bool:
        """Whether the recipe rotates the residual stream (QuaRot)."""
        return self.get(QuaRot) is not None

    @property
    def per_block_rotation(self) -> bool:
        """Whether the block rotation is searched per block instead of shared."""
        rot = self.get(GreedyRotation)
        return bool(rot and rot.per_block)

    @property
    def search_rows(self) -> int:
        """Calibration rows per input the statistics pass samples."""
        rot = self.get(GreedyRotation)
        return rot.sample_rows if rot is not None else SEARCH_ROWS

    @property
    def gptq(self) -> GPTQ | None:
        """The recipe's GPTQ stage (its weights are GPTQ's), or None (the run's choice)."""
        return self.get(GPTQ)

    def without(self, cls: type[Stage]) -> Recipe:
        """This recipe less its stages of class `cls`."""
        return replace(self, stages=tuple(s for s in self.stages if not isinstance(s, cls)))

    def with_stage(self, stage: Stage) -> Recipe:
        """This recipe with `stage` appended."""
        return replace(self, stages=(*self.stages, stage))

    def data_free(self) -> Recipe:
        """The recipe for a group no calibration token reached (an expert the router never
        picked): no smoothing, a search's starting rotation in place of the search."""
        kept = []
        for s in self.stages:
            if isinstance(s, TransformStage):
                s = s.data_free()
            if s is not None:
                kept.append(s)
        return replace(self, stages=tuple(kept))

    def overridden(self, **overrides: Any) -> Recipe:
        """The recipe with run-level overrides (duquant.config.METHOD_OVERRIDES; None: keep the
        recipe's) applied to the stages that own them; norm_epochs adds norm tweaking to any
        recipe (0 removes it); fold is the recipe's own."""
        given = {k: v for k, v in overrides.items() if v is not None}
        out = self
        if "fold" in given:
            out = replace(out, fold=given.pop("fold"))
        if "norm_epochs" in given and out.quantize:
            if given["norm_epochs"] == 0:
                out = out.without(NormTweak)
            elif out.get(NormTweak) is None:
                out = out.with_stage(NormTweak())
        return replace(out, stages=tuple(s.overridden(**given) for s in out.stages))

    def to_dict(self) -> dict:
        """The recipe's record in results (and its YAML form)."""
        return {
            "name": self.name,
            "quantize": self.quantize,
            "fold": self.fold,
            "stages": [s.to_dict() for s in self.stages],
            **({"source": self.source} if self.source else {}),
        }


_DQPP_MX = Recipe(
    "duquant++mx",
    (
        Smooth(),
        GreedyRotation(objective="mx", start="random-hadamard", start_candidates=16, max_steps=0),
    ),
)


def _named(name: str, base: Recipe, *extra: Stage) -> Recipe:
    """`base` under another name, with `extra` stages appended."""
    return replace(base, name=name, stages=(*base.stages, *extra))


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("fp", quantize=False),
        Recipe("rtn"),
        Recipe("smoothquant", (Smooth(alpha=0.5),)),
        # block Hadamard B=32 (BRQ / MR-GPTQ style: deterministic Sylvester blocks)
        Recipe("hadamard", (Hadamard(),)),
        Recipe("random-hadamard", (Hadamard(random=True),)),
        # DuQuant++ with the greedy rotation replaced by a randomized block Hadamard (the ablation)
        Recipe("smooth+hadamard", (Smooth(), Hadamard(random=True))),
        Recipe("quarot", (QuaRot(),)),
        Recipe("duquant", (Smooth(), DuQuantV1())),
        # the paper: smoothing then ONE B=32 greedy outlier-aware rotation shared by all blocks
        Recipe("duquant++", (Smooth(), GreedyRotation())),
        # ours: smoothing + the best of 16 randomized block Hadamards, scored by the MX quantization
        # error of the calibration activations and the rotated weights (docs/results.md has the
        # measurement against smooth+hadamard); same online cost as duquant++ (one 32 x 32 block)
        _DQPP_MX,
        # ours, learned: duquant++mx's smoothing and rotation refined block by block on the
        # quantized block-output error (duquant.learn.rotation); same online cost and export
        _named("duquant++learn", _DQPP_MX, LearnRotation()),
        # ours, learned end to end: every block's smoothing and rotation trained at once on the
        # KL from the full-precision model through the quantized model (duquant.learn.e2e)
        _named("duquant++e2e", _DQPP_MX, EndToEnd()),
        # ours, norm-tweaked: duquant++mx, then (after GPTQ) the pre-norm weights, which hold the
        # folded smoothing and stay in full precision, trained on the KL from the full-precision
        # model through the quantized model (duquant.learn.norms); same online cost and export
        _named("duquant++nt", _DQPP_MX, NormTweak()),
        # `--method best`: the most accurate registered method, with the weight quantizer it was
        # measured with: duquant++nt with GPTQ (docs/results.md §11 has the measurement)
        _named("best", _DQPP_MX, GPTQ(), NormTweak()),
        # MR-GPTQ (FP-Quant, Egiazarian et al. 2025): block-32 randomized Hadamard, then GPTQ with
        # static group scales from FP-Quant's MSE observer and single columns in descending
        # diag(H) order (FP-Quant's --quantization_order activation --w_observer mse)
        Recipe(
            "mr-gptq",
            (
                Hadamard(random=True),
                GPTQ(
                    act_order=True,
                    act_order_scope="column",
                    static_groups=True,
                    scale_search="fpquant-mse",
                ),
            ),
        ),
        # FlatQuant (Sun et al., 2024) as published, on the MX grid: learned Kronecker transforms,
        # channel scales and clipping, trained block by block with FlatQuant's defaults (15 epochs,
        # lr 5e-3, 4 windows a step); the quick CPU setting is --learn-epochs 2
        Recipe("flatquant", (FlatQuant(),)),
    )
}


def method_names() -> list[str]:
    """Every name `--method` accepts."""
    return sorted(RECIPES)


def get_method(name: str, **overrides: Any) -> Recipe:
    """The registered recipe `name` with run-level overrides applied (None values are ignored)."""
    if name not in RECIPES:
        raise RecipeError(f"--method {name}: unknown; choose one of {', '.join(method_names())}")
    return RECIPES[name].overridden(**overrides)


def recipe_from_dict(data: Any, where: str) -> Recipe:
    """A recipe from its file form (see the module docstring); RecipeError naming `where`."""
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise RecipeError(f"{where}: a recipe is a mapping with keys {', '.join(RECIPE_KEYS)}")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise RecipeError(
            f"{where}: unknown key {', '.join(map(str, unknown))}; a recipe has {', '.join(RECIPE_KEYS)}"
        )
    stages = data.get("stages")
    if not isinstance(stages, list):
        raise RecipeError(f"{where}: 'stages' must be a list of stages (it may be empty: rtn)")
    fold = data.get("fold", True)
    if not isinstance(fold, bool):
        raise RecipeError(f"{where}: fold {fold!r}: must be true or false")
    name = data.get("name", Path(where).stem)
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{where}: name {name!r}: must be a non-empty string")
    for i, s in enumerate(stages):
        if (
            not isinstance(s, dict)
            or not all(isinstance(k, str) for k in s)
            or (not isinstance(s.get("stage"), str))
        ):
            raise RecipeError(
                f"{where} stage {i + 1}: each stage is a mapping of option names with a 'stage' "
                f"key naming one of {', '.join(STAGES)}"
            )
    try:
        parsed = tuple(stage_from_dict(s, f"{where} stage {i + 1}") for i, s in enumerate(stages))
    except StageError as exc:
        raise RecipeError(str(exc)) from None
    return Recipe(name, parsed, fold=fold, source=where)


# a recipe is a few hundred bytes: anything far larger is not one (and is not read whole)
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 10_000  # values in a recipe, aliases counted each time they are used
MAX_OPTION = 2**31 - 1  # no stage option is larger (epochs, steps, candidates, rows)


def check_values(data: Any, where: str) -> None:
    """Every number in a recipe's data is finite and at most MAX_OPTION in size, and the data
    hold at most MAX_RECIPE_NODES values (YAML aliases cannot make a small file huge); RecipeError
    naming the file and the key."""
    todo: list[tuple[str, Any]] = [("", data)]
    seen = 0
    while todo:
        key, value = todo.pop()
        seen += 1
        if seen > MAX_RECIPE_NODES:
            raise RecipeError(f"{where}: more than {MAX_RECIPE_NODES} values; not a recipe")
        if isinstance(value, dict):
            todo.extend((f"{key}.{k}" if key else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((f"{key}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value if abs(value) <= MAX_OPTION else math.inf):
                raise RecipeError(
                    f"{where}: {key} {value!r}: not a finite number of at most {MAX_OPTION}"
                )


def load_recipe(path: str | Path) -> Recipe:
    """The recipe in YAML file `path`, validated; RecipeError (one line) for any fault."""
    import yaml

    if Path(path).exists() and not Path(path).is_file():  # a folder, a pipe (would block)
        raise RecipeError(f"--recipe {path}: not a regular file; give a YAML recipe file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"--recipe {path}: larger than {MAX_RECIPE_BYTES} bytes; not a recipe file"
            )
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        message = " ".join(str(exc).split())
        raise RecipeError(
            f"--recipe {path}: cannot read it ({message}); give a UTF-8 YAML recipe file"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise RecipeError(f"--recipe {path}: not valid YAML ({first})") from None
    except RecursionError:
        raise RecipeError(f"--recipe {path}: nested too deeply; not a recipe") from None
    check_values(data, str(path))
    return recipe_from_dict(data, str(path))


__all__ = [
    "RECIPES",
    "STAGES",
    "Recipe",
    "RecipeError",
    "get_method",
    "load_recipe",
    "method_names",
    "recipe_from_dict",
]
