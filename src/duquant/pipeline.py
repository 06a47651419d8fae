"""model -> calibration statistics -> transforms -> quantized layers, one decoder block at a time."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from duquant.calibrate import BlockInputs, capture_block_inputs, collect_input_stats, run_block
from duquant.formats import QuantSpec
from duquant.methods import MethodConfig
from duquant.methods.build import GroupPlan, plan_group
from duquant.models.adapters import Adapter
from duquant.qlinear import InputQuantizer, make_quant_linear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantConfig:
    """Formats of weights and activations; `None` leaves that side in full precision."""

    weight: QuantSpec | None = QuantSpec()
    act: QuantSpec | None = QuantSpec()


@dataclass
class QuantizeReport:
    """What quantization did: per-layer plans (for analysis and export) and timings."""

    plans: list[dict[str, GroupPlan]] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    adapter: Adapter,
    method: MethodConfig,
    quant: QuantConfig,
    calib_windows: torch.Tensor | None = None,
    seed: int = 0,
) -> QuantizeReport:
    """Replace every linear of every decoder block by a QuantLinear, in place, following `method`."""
    start = time.perf_counter()
    report = QuantizeReport()
    if not method.quantize:
        report.seconds = time.perf_counter() - start
        return report
    if method.needs_calibration and calib_windows is None:
        raise ValueError(f"method {method.name} needs calibration windows")
    blocks = adapter.blocks(model)
    inputs: BlockInputs | None = None
    if method.needs_calibration:
        inputs = capture_block_inputs(model, adapter, calib_windows)
    for i, block in enumerate(tqdm(blocks, desc=f"quantize {method.name}", leave=False)):
        stats = None
        if inputs is not None:
            stats = collect_input_stats(block, adapter.groups, inputs, seed=seed + i)
        plans = {}
        for group in adapter.groups:
            plan = plan_group(block, group, method, quant, stats[group.name] if stats else None,
                              seed=seed * 1000 + i)
            _apply_plan(block, group, plan, quant, layer=i)
            plans[group.name] = plan
        report.plans.append(plans)
        if inputs is not None and i + 1 < len(blocks):
            inputs = BlockInputs(run_block(block, inputs), inputs.kwargs)
    report.seconds = time.perf_counter() - start
    return report


def _apply_plan(block: nn.Module, group, plan: GroupPlan, quant: QuantConfig, layer: int) -> None:
    """Fold the plan's offline part into the producer / norm and swap the group's linears."""
    plan.fold(block)
    iq = InputQuantizer(plan.online, quant.act, name=f"layers.{layer}.{group.name} input")
    for lname in group.linears:
        linear = block.get_submodule(lname)
        qlin = make_quant_linear(linear, plan.weight_transform, iq, quant.weight,
                                 name=f"layers.{layer}.{lname}.weight")
        parent, _, attr = lname.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, qlin)
