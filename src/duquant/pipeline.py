"""model -> calibration statistics -> transforms -> quantized layers, one decoder block at a time.

`quantize_model` runs a recipe's stages (duquant.stages) at fixed points: `setup` and
`transform_model` before the block loop, then per block the plan (the transform stages), `refine_block`
(learning), the fold and the swap to QuantLinears, GPTQ, and `finish` after the loop.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from duquant import distributed as dist
from duquant.calibrate import (
    BlockInputs,
    capture_block_inputs,
    collect_input_stats,
    run_block,
    run_block_recording,
)
from duquant.formats import QuantSpec, spec_for
from duquant.gptq import check_gptq_options
from duquant.methods import Recipe
from duquant.models.adapters import Adapter, InputGroup
from duquant.models.moe import unfuse_block
from duquant.models.streaming import BlockStore, InMemoryBlocks, ScratchBlocks
from duquant.plan import GroupPlan, HeadShape, plan_group
from duquant.qlinear import (
    InputQuantizer,
    QuantLinear,
    make_quant_linear,
    reset_caches_after_forward,
)
from duquant.stages import GPTQ, EndToEnd, NormTweak
from duquant.stages.gptq import transformed_hessian, transformed_inputs
from duquant.stages.learned import BlockLearner
from duquant.utils import replace_submodule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantConfig:
    """Formats of weights and activations (`None` leaves that side in full precision) and the
    weight quantizer: `rtn` (round to nearest) or `gptq` (on the same grid)."""

    weight: QuantSpec | None = spec_for("mxfp4")
    act: QuantSpec | None = spec_for("mxfp4")
    weights: str = "rtn"
    gptq: GPTQ = GPTQ()  # the GPTQ stage's options when weights == 'gptq'

    def __post_init__(self) -> None:
        if self.weights not in ("rtn", "gptq"):
            raise ValueError(f"weights must be 'rtn' or 'gptq', got {self.weights!r}")
        if self.weights == "gptq" and self.weight is not None:
            g = self.gptq
            check_gptq_options(
                self.weight, g.act_order, g.act_order_scope, g.static_groups, g.scale_search
            )


@dataclass
class QuantizeReport:
    """What quantization did: per-layer plans (for analysis and export) and timings."""

    plans: list[dict[str, GroupPlan]] = field(default_factory=list)
    layer_errors: list[dict] = field(default_factory=list)  # per linear, RTN vs GPTQ output error
    learn: list[dict] = field(default_factory=list)  # per block, the learned transforms' MSE
    norm_tuning: dict = field(default_factory=dict)  # norm tweaking's KL per epoch
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


@dataclass
class QuantContext:
    """What the stages of one quantization share: the model, the request, and the state the
    pipeline and the stages pass on (block inputs, a teacher, learned or global plans)."""

    model: nn.Module
    adapter: Adapter
    recipe: Recipe
    quant: QuantConfig
    windows: Tensor | None
    seed: int
    store: BlockStore
    report: QuantizeReport
    log: logging.Logger = log
    heads: HeadShape | None = None
    inputs: BlockInputs | None = None  # the current block's calibration inputs
    fp_stream: BlockInputs | None = None  # the full-precision model's, when a stage needs them
    fp_out: list | None = None  # the full-precision block's outputs on fp_stream
    teacher: list | None = None  # NormTweak.setup: the FP model's compact next-token targets
    block_plans: list[dict[str, GroupPlan]] | None = None  # set by EndToEnd: plans per block
    global_online: dict = field(default_factory=dict)  # set by QuaRot: online transform per input

    @property
    def gptq(self) -> GPTQ | None:
        """The GPTQ stage when weights are GPTQ'd (and quantized at all): the recipe's (its fixed
        options over the run's), else the run's when it asks for GPTQ weights."""
        q = self.quant
        if q.weight is None:
            return None
        if self.recipe.gptq is not None:
            return replace(q.gptq, **self.recipe.gptq.fixed())
        return q.gptq if q.weights == "gptq" else None

    def plan_scratch(self) -> list[dict[str, GroupPlan]]:
        """Every block's plans as the recipe's transform stages search them, the model quantized
        with RTN weights block by block on copies of one block at a time (for EndToEnd, which
        trains them); the model is left as it was."""
        recipe = self.recipe.without(EndToEnd).without(NormTweak)
        quant = replace(self.quant, weights="rtn")
        scratch = ScratchBlocks(self.store)
        rep = quantize_model(
            self.model, self.adapter, recipe, quant, self.windows, self.seed, scratch
        )
        return rep.plans


def check_request(ctx: QuantContext) -> None:
    """Refuse what this model, store or request cannot do, before anything changes."""
    recipe, quant, adapter = ctx.recipe, ctx.quant, ctx.adapter
    if any(
        isinstance(m, QuantLinear) or hasattr(m, "quantization_scheme") for m in ctx.model.modules()
    ):
        raise ValueError("the model is already quantized; evaluate it with method fp")
    for stage in recipe.stages:
        stage.check_quant(quant)
    gptq = ctx.gptq
    if (recipe.needs_windows or gptq) and ctx.windows is None:
        raise ValueError(
            f"method {recipe.name} with {'gptq' if gptq else quant.weights} weights needs "
            "calibration windows"
        )
    if ctx.windows is not None:
        dist.check_divides(len(ctx.windows), "calibration windows (--nsamples)")
    if gptq and gptq.target != "quantized" and adapter.experts is not None:
        raise ValueError(
            f"--gptq-target {gptq.target} is not supported for the {adapter.name} family "
            "(routed experts see their own tokens); use --gptq-target quantized"
        )
    if gptq and gptq.hessian == "fp" and adapter.experts is not None:
        raise ValueError(
            f"--gptq-hessian fp is not supported for the {adapter.name} family: the statistics "
            "pass sees every token, an expert only its routed ones; use --gptq-hessian quantized"
        )
    if recipe.conflict:
        raise ValueError(recipe.conflict)
    if recipe.whole_model_step and not ctx.store.whole_model:
        raise ValueError(
            f"method {recipe.name} {recipe.whole_model_step}; streaming quantization holds one "
            "block at a time: load the model in memory"
        )


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    adapter: Adapter,
    method: Recipe,
    quant: QuantConfig,
    calib_windows: torch.Tensor | None = None,
    seed: int = 0,
    store: BlockStore | None = None,
) -> QuantizeReport:
    """Replace every linear of every decoder block by a QuantLinear, in place, following the
    recipe `method`'s stages.

    `store` brings each block in before its turn and takes it out after (streaming from disk:
    duquant.models.streaming); by default every block is already in memory.
    """
    store = store or InMemoryBlocks(adapter.blocks(model))
    start = time.perf_counter()
    report = QuantizeReport()
    why = adapter.refuse(method)
    if why:
        raise ValueError(why)
    if not method.quantize:
        report.seconds = time.perf_counter() - start
        return report
    ctx = QuantContext(model, adapter, method, quant, calib_windows, seed, store, report)
    check_request(ctx)
    ctx.heads = HeadShape.of(model.config)
    for stage in method.stages:
        stage.setup(ctx)  # e.g. keep the full-precision teacher
    for stage in method.stages:
        stage.transform_model(ctx)  # e.g. QuaRot's global rotation, end-to-end learning
    _capture_inputs(ctx)
    blocks = range(len(adapter.blocks(model)))
    for i in tqdm(blocks, desc=f"quantize {method.name}", leave=False, disable=not dist.is_main()):
        _quantize_block(ctx, i)
    for stage in method.stages:
        stage.finish(ctx)  # e.g. norm tweaking
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    return report


def _capture_inputs(ctx: QuantContext) -> None:
    """The first block's calibration inputs, when a stage or GPTQ reads activations; the
    full-precision stream too when a stage or GPTQ matches the unquantized model."""
    if not (ctx.recipe.needs_calibration or ctx.gptq):
        return
    # under torch.distributed each rank carries its own contiguous share of the windows through
    # the blocks; the statistics, Hessians and gradients are combined over ranks where read
    mine = dist.shard(len(ctx.windows))
    with ctx.store.embedding(ctx.model):
        ctx.inputs = capture_block_inputs(
            ctx.model, ctx.adapter, ctx.windows[mine.start : mine.stop]
        )
    learner = ctx.recipe.get(BlockLearner)
    gptq = ctx.gptq
    if (learner is not None and learner.target == "model") or (gptq and gptq.target == "model"):
        ctx.fp_stream = ctx.inputs


def _quantize_block(ctx: QuantContext, i: int) -> None:
    """Plan, refine, fold, swap and (GPTQ) quantize block `i`; move the calibration inputs on."""
    block = ctx.store.load(i)
    unfuse_block(block, ctx.adapter)
    groups = ctx.adapter.block_groups(block)
    fp_seen = None
    ctx.fp_out = None
    if ctx.fp_stream is not None:
        ctx.fp_out, fp_seen = run_block_recording(block, groups, ctx.fp_stream)
        gptq = ctx.gptq
        fp_seen = fp_seen if gptq and gptq.target == "model" else None
    stats = _block_stats(ctx, block, groups, i)
    if ctx.block_plans is not None:
        plans = ctx.block_plans[i]
    else:
        plans = _plan_block(ctx, block, groups, stats, i)
    for stage in ctx.recipe.stages:
        plans = stage.refine_block(ctx, block, groups, plans, stats, i)
    # fold every group first: folds rewrite producers (v_proj, up_proj) that are quantized later
    for g in groups:
        plans[g.name].fold(block, g, ctx.heads, ctx.adapter.norm_offset)
    for g in groups:
        _swap_linears(block, g, plans[g.name], ctx.quant, layer=i, rtn=ctx.gptq is None)
    reset_caches_after_forward(block)
    if ctx.gptq is not None:
        ctx.report.layer_errors += _gptq(ctx, block, groups, plans, stats, fp_seen, i)
    ctx.report.plans.append(plans)
    if ctx.inputs is not None and i + 1 < len(ctx.adapter.blocks(ctx.model)):
        ctx.inputs = ctx.inputs.next(run_block(block, ctx.inputs), i + 1)
        if ctx.fp_stream is not None:
            ctx.fp_stream = ctx.fp_stream.next(ctx.fp_out, i + 1)
    ctx.store.release(i)


def _block_stats(ctx: QuantContext, block: nn.Module, groups, i: int) -> dict | None:
    """Per input group, the calibration statistics the stages (and fp Hessians) read."""
    fp_hessians = ctx.gptq is not None and ctx.gptq.hessian == "fp"
    planned = ctx.recipe.needs_calibration and ctx.block_plans is None
    if not (planned or fp_hessians):
        return None
    return collect_input_stats(
        block,
        groups,
        ctx.inputs,
        sample_rows=ctx.recipe.search_rows,
        seed=ctx.seed + i,
        moments=fp_hessians,
    )


def _plan_block(ctx: QuantContext, block: nn.Module, groups, stats: dict | None, i: int) -> dict:
    """Each input group's plan from the recipe's transform stages. Under torch.distributed every
    rank holds the same statistics (samples gathered, maxima all-reduced), so group j is planned
    by rank j mod world alone and its plan broadcast: the same plan, its search not repeated."""
    recipe = ctx.recipe

    def plan(j: int, g: InputGroup):
        stat = stats.get(g.name) if stats and recipe.needs_calibration else None
        rec = _group_recipe(recipe, stats, g, i)
        return plan_group(
            block, g, rec, ctx.quant, stat, ctx.heads, seed=ctx.seed * 1000 + i * 10 + j
        )

    if not dist.active():
        return {g.name: plan(j, g) for j, g in enumerate(groups)}
    w, me = dist.world(), dist.rank()
    mine: dict[int, tuple] = {}
    for j, g in enumerate(groups):  # all of this rank's searches first: they run side by side
        if j % w != me:
            continue
        try:
            mine[j] = (plan(j, g), None)
        except Exception as exc:  # every rank raises it, none waits for a plan never sent
            mine[j] = (None, exc)
            break
    plans = {}
    for j, g in enumerate(groups):
        plans[g.name], err = dist.broadcast_object(mine.get(j, (None, None)), j % w)
        if err is not None:
            raise err
    return plans


def _gptq(ctx: QuantContext, block, groups, plans: dict, stats, fp_seen, i: int) -> list[dict]:
    """Run the GPTQ stage on block `i` with the Hessians, clips and references it needs."""
    given = None
    if ctx.gptq.hessian == "fp":
        given = {
            g.name: transformed_hessian(
                stats[g.name].moments.finalize(), plans[g.name].weight_transform
            )
            for g in groups
        }
    clips = {n: c for g in groups for n, c in plans[g.name].weight_clip.items()}
    refs = None
    if fp_seen is not None:  # the FP model's inputs, in the transformed coordinates
        refs = {g.name: transformed_inputs(fp_seen[g.name], plans[g.name]) for g in groups}
    return ctx.gptq.quantize_block(
        block, groups, ctx.inputs, ctx.quant.weight, layer=i, given=given, clips=clips, refs=refs
    )


def _group_recipe(recipe: Recipe, stats: dict | None, group: InputGroup, layer: int) -> Recipe:
    """`recipe`, or its data-free part for a group no calibration token reached (an expert that
    the router never picked): no smoothing, the greedy search's starting rotation."""
    if not recipe.needs_calibration or stats is None or group.name in stats:
        return recipe
    free = recipe.data_free()
    log.warning(
        "layer %d group %s saw no calibration tokens: %s without smoothing, as %s",
        layer,
        group.name,
        recipe.name,
        [s.KIND for s in free.transforms] or "no transform",
    )
    return free


def online_flops_per_token(model: nn.Module) -> int:
    """FLOPs of the online input transforms per token, each shared input position counted once."""
    seen, total = set(), 0
    for mod in model.modules():
        iq = getattr(mod, "input_quantizer", None)
        if isinstance(mod, QuantLinear) and id(iq) not in seen:
            seen.add(id(iq))
            if iq.online is not None:
                total += iq.online.flops_per_token(mod.in_features)
    return total


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _swap_linears(
    block: nn.Module, group, plan: GroupPlan, quant: QuantConfig, layer: int, rtn: bool = True
) -> None:
    """Replace the group's linears by QuantLinears sharing one online input quantizer.

    With `rtn=False` the weights stay transformed but unquantized, for GPTQ to quantize next.
    """
    iq = InputQuantizer(
        plan.online, quant.act, name=f"layers.{layer}.{group.name} input", clip=plan.act_clip
    )
    for lname in group.linears:
        linear = block.get_submodule(lname)
        qlin = make_quant_linear(
            linear,
            plan.weight_transform,
            iq,
            quant.weight if rtn else None,
            name=f"layers.{layer}.{lname}.weight",
            clip=plan.weight_clip.get(lname),
        )
        replace_submodule(block, lname, qlin)
