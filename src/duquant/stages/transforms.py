"""Transform stages: smoothing and the block rotations, each adding steps to an input group's plan.

`plan(x, w, weights, stats, group, heads, quant, gen)` sees the group's calibration sample `x` and
stacked weights `w` as the earlier stages left them and returns (steps, x, w, info) with its own steps
applied; duquant.plan.plan_group chains them in recipe order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from duquant.formats import QuantSpec
from duquant.plan import fed_by_heads
from duquant.stages.base import Stage, StageError, at_least, one_of
from duquant.transforms.base import BlockRotation, ChannelScale, Permutation, Transform
from duquant.transforms.hadamard import block_hadamard, random_signs
from duquant.transforms.permutation import zigzag_permutation
from duquant.transforms.rotation import best_start, greedy_rotation, per_block_greedy
from duquant.transforms.smooth import share_over_heads, smoothing_scale

SEARCH_ROWS = 512  # calibration activation rows (tokens) the statistics pass samples per input


@dataclass(frozen=True)
class TransformStage(Stage):
    """A stage that contributes input transform steps to every group's plan."""

    def plan(self, x, w, weights, stats, group, heads, quant, gen) -> tuple:
        """(steps, x, w, info) after this stage (see the module docstring)."""
        raise NotImplementedError

    def data_free(self) -> TransformStage | None:
        """What this stage becomes for a group no calibration token reached (None: nothing)."""
        return self


@dataclass(frozen=True)
class Smooth(TransformStage):
    """SmoothQuant's per-channel scale Λ_j = max|X_j|^α / max|W_j|^(1-α), folded where exact."""

    KIND: ClassVar[str] = "smooth"
    OVERRIDES: ClassVar[dict[str, str]] = {"alpha": "alpha"}
    alpha: float = 0.6

    def check(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise StageError(f"smooth.alpha {self.alpha!r}: must be a number in [0, 1]")
        if not 0 <= self.alpha <= 1:
            raise StageError(f"smooth.alpha {self.alpha}: must be a number in [0, 1]")

    @property
    def needs_calibration(self) -> bool:
        return True

    def data_free(self) -> None:
        return None

    def export_refusal(self, fold: bool) -> str | None:
        if not fold:
            return (
                "with fold=False keeps smoothing online; compressed-tensors has no per-channel "
                "scale transform (fold it, the default)"
            )
        return None

    def plan(self, x, w, weights, stats, group, heads, quant, gen) -> tuple:
        scale = smoothing_scale(stats.absmax, weights, self.alpha)
        if fed_by_heads(group, heads):
            scale = share_over_heads(scale, heads.n_heads, heads.n_kv_heads)
        return [ChannelScale(scale)], x / scale, w * scale, {}


def _power_of_two(stage: Stage) -> None:
    """The block size aligns with the format's power-of-two groups."""
    b = stage.block_size
    if isinstance(b, bool) or not isinstance(b, int) or b < 2 or b & (b - 1):
        raise StageError(
            f"--block-size {b}: {stage.KIND} rotates blocks that must be a power of two >= 2 to "
            "align with the format's groups (e.g. 16 or 32)"
        )


@dataclass(frozen=True)
class Hadamard(TransformStage):
    """Block Hadamard of size B (Sylvester; `random`: with random ±1 signs), as BRQ / MR-GPTQ."""

    KIND: ClassVar[str] = "hadamard"
    OVERRIDES: ClassVar[dict[str, str]] = {"block_size": "block_size"}
    random: bool = False
    block_size: int = 32

    def check(self) -> None:
        _power_of_two(self)

    def plan(self, x, w, weights, stats, group, heads, quant, gen) -> tuple:
        b = self.block_size
        r = block_hadamard(b, random_signs(b, gen)) if self.random else block_hadamard(b)
        return [BlockRotation(r)], x, w, {}


def _rows(t: Tensor, n: int) -> Tensor:
    """At most `n` evenly spaced rows of `t` (deterministic)."""
    if t.shape[0] <= n:
        return t
    return t[torch.linspace(0, t.shape[0] - 1, n).long()]


@dataclass(frozen=True)
class GreedyRotation(TransformStage):
    """DuQuant's outlier-aware greedy search for ONE block rotation shared by all blocks.

    `objective`: range (the paper: peak range) or mx (the MXFP4 error of activations and weights);
    `start`: identity (the paper) or the best of `start_candidates` randomized block Hadamards."""

    KIND: ClassVar[str] = "greedy-rotation"
    OVERRIDES: ClassVar[dict[str, str]] = {"block_size": "block_size", "max_steps": "max_steps"}
    block_size: int = 32
    max_steps: int = 128
    objective: str = "range"
    start: str = "identity"
    start_candidates: int = 1
    objective_rows: int = 128  # activation and weight rows the MX-error objective sees
    per_block: bool = False  # one rotation per block instead of one shared matrix
    sample_rows: int = SEARCH_ROWS  # calibration rows the search sees

    def check(self) -> None:
        _power_of_two(self)
        at_least(self, "max_steps", 0)
        one_of(self, "objective", ("range", "mx"))
        one_of(self, "start", ("identity", "random-hadamard"))
        at_least(self, "start_candidates", 1)
        at_least(self, "objective_rows", 1)
        at_least(self, "sample_rows", 1)

    @property
    def needs_calibration(self) -> bool:
        return True

    def data_free(self) -> TransformStage | None:
        if self.start == "random-hadamard":
            return Hadamard(random=True, block_size=self.block_size)
        return None

    def export_refusal(self, fold: bool) -> str | None:
        if self.per_block:
            return (
                "with one rotation per block is not exportable: a compressed-tensors transform "
                "shares one matrix among all blocks of an input"
            )
        return None

    def _start(self, xs: Tensor, ws: Tensor, a_spec, w_spec, gen) -> tuple[Tensor | None, dict]:
        """The search's starting rotation: identity, or the best random block Hadamard."""
        if self.start != "random-hadamard":
            return None, {}
        b = self.block_size
        cands = [block_hadamard(b, random_signs(b, gen)) for _ in range(self.start_candidates)]
        pick, errs = best_start(xs, cands, a_spec, ws, w_spec) if len(cands) > 1 else (0, [])
        return cands[pick], {"start_errors": errs, "start_pick": pick}

    def _search(self, x, w, quant, gen) -> tuple:
        """(start, search inputs, greedy keywords, start info)."""
        a_spec = (quant.act if quant else None) or QuantSpec()
        w_spec = (quant.weight if quant else None) or QuantSpec()
        # the MX-error objective ranks candidates: a row subsample ranks them as well, far cheaper
        xs, ws = _rows(x, self.objective_rows), _rows(w, self.objective_rows)
        start, info0 = self._start(xs, ws, a_spec, w_spec, gen)
        kw = dict(
            block_size=self.block_size,
            max_steps=self.max_steps,
            generator=gen,
            objective=self.objective,
            spec=a_spec,
            w_spec=w_spec,
        )
        if self.objective == "mx":  # the range objective keeps every sampled row
            return start, xs, ws, kw, info0
        return start, x, None, kw, info0

    def plan(self, x, w, weights, stats, group, heads, quant, gen) -> tuple:
        start, xr, wr, kw, info0 = self._search(x, w, quant, gen)
        if self.per_block:
            r, info = per_block_greedy(xr, weight=wr, start=start, **kw)
        else:
            r, info = greedy_rotation(xr, start=start, weight=wr, **kw)
        return [BlockRotation(r)], x, w, {**info0, **info}


@dataclass(frozen=True)
class DuQuantV1(GreedyRotation):
    """DuQuant v1: greedy rotation, zigzag permutation, greedy rotation (the permutation online)."""

    KIND: ClassVar[str] = "duquant-v1"

    def export_refusal(self, fold: bool) -> str | None:
        return (
            "is not exportable: its online zigzag permutation moves channels across 32-channel "
            "blocks, which a compressed-tensors block transform cannot express"
        )

    def plan(self, x, w, weights, stats, group, heads, quant, gen) -> tuple:
        start, xr, wr, kw, _ = self._search(x, w, quant, gen)
        r1, info1 = greedy_rotation(xr, start=start, weight=wr, **kw)
        rot1 = BlockRotation(r1)
        x1 = rot1(xr.float())
        perm = Permutation(zigzag_permutation(x1.abs().amax(dim=0), self.block_size))
        x2 = perm(x1)
        w2 = None if wr is None else perm.weight(rot1.weight(wr.float()))
        r2, info2 = greedy_rotation(x2, weight=w2, **kw)
        steps: list[Transform] = [rot1, perm, BlockRotation(r2)]
        return steps, x, w, {"steps": [info1["steps"], info2["steps"]]}
