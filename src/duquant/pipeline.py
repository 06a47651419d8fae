"""model -> calibration statistics -> transforms -> quantized layers, one decoder block at a time."""

from __future__ import annotations

import copy
import logging
import resource
import time
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from duquant.calibrate import (
    BlockInputs,
    capture_block_inputs,
    collect_input_stats,
    feed_block_until,
    run_block,
    run_block_recording,
)
from duquant.config import HessianSource
from duquant.formats import QuantSpec, spec_for
from duquant.gptq import (
    CrossAccumulator,
    HessianAccumulator,
    as_quantized_weight,
    asymmetric_target,
    check_gptq_options,
    energy_ratio,
    gptq_quantize,
    hessian_row_energy,
)
from duquant.learn import learn_block
from duquant.methods import MethodConfig
from duquant.methods.build import GroupPlan, HeadShape, plan_group
from duquant.models.adapters import Adapter, InputGroup
from duquant.models.moe import unfuse_block, unfuse_experts
from duquant.models.streaming import BlockStore, InMemoryBlocks
from duquant.qlinear import (
    InputQuantizer,
    QuantLinear,
    make_quant_linear,
    quantize_weight,
    reset_caches_after_forward,
)
from duquant.transforms.base import Transform
from duquant.transforms.quarot import apply_quarot
from duquant.utils import replace_submodule

log = logging.getLogger(__name__)


HESSIAN_SOURCES = tuple(h.value for h in HessianSource)  # where GPTQConfig.hessian comes from
GPTQ_TARGETS = ("quantized", "unquantized", "model")


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ options (see duquant.gptq)."""

    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    act_order_scope: str = "group"  # group: MX groups kept whole; column: MR-GPTQ (needs static)
    scale_search: str = "none"  # none, hessian (ours), fpquant-mse (FP-Quant's observer)
    # `quantized`: each group's Hessian from what it sees at inference (transformed, fake-quantized,
    # earlier groups of the block already GPTQ'd), one partial block pass per group. `fp`: from the
    # raw inputs of the statistics pass, transformed exactly (Tᵀ H T), no activation quantization,
    # as llm-compressor and non-true-sequential GPTQ do: no extra pass at all
    hessian: str = "quantized"
    # what the quantized layer's outputs are matched to: `quantized` (classic GPTQ) its own inputs
    # through the unquantized weight; `unquantized` the same inputs before activation quantization;
    # `model` the unquantized model's inputs at that position (GPTAQ: also undoes earlier drift)
    target: str = "quantized"
    # ridge of that correction, relative to mean diag(H): GPTQ's 0.01 lets a few outlier tokens
    # of 16k rewrite the weights (SmolLM2 PPL 66.8 vs 41.1); 1.0 measured best (docs/results.md §11)
    target_damp: float = 1.0

    def __post_init__(self) -> None:
        if self.hessian not in HESSIAN_SOURCES:
            raise ValueError(f"gptq hessian must be one of {HESSIAN_SOURCES}, got {self.hessian!r}")
        if self.target not in GPTQ_TARGETS:
            raise ValueError(f"gptq target must be one of {GPTQ_TARGETS}, got {self.target!r}")
        if not self.target_damp > 0:
            raise ValueError(f"gptq target_damp must be > 0, got {self.target_damp}")
        if self.target != "quantized" and self.hessian != "quantized":
            raise ValueError("an asymmetric gptq target needs the quantized Hessians")


@dataclass(frozen=True)
class QuantConfig:
    """Formats of weights and activations (`None` leaves that side in full precision) and the
    weight quantizer: `rtn` (round to nearest) or `gptq` (on the same grid)."""

    weight: QuantSpec | None = spec_for("mxfp4")
    act: QuantSpec | None = spec_for("mxfp4")
    weights: str = "rtn"
    gptq: GPTQConfig = GPTQConfig()

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


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    adapter: Adapter,
    method: MethodConfig,
    quant: QuantConfig,
    calib_windows: torch.Tensor | None = None,
    seed: int = 0,
    store: BlockStore | None = None,
) -> QuantizeReport:
    """Replace every linear of every decoder block by a QuantLinear, in place, following `method`.

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
    if any(
        isinstance(m, QuantLinear) or hasattr(m, "quantization_scheme") for m in model.modules()
    ):
        raise ValueError("the model is already quantized; evaluate it with method fp")
    if method.learn == "flatquant":
        from duquant.learn.flatquant import check_quant

        check_quant(quant)
    gptq = quant.weights == "gptq" and quant.weight is not None
    needs_inputs = method.needs_calibration or gptq
    if needs_inputs and calib_windows is None:
        raise ValueError(
            f"method {method.name} with {quant.weights} weights needs calibration windows"
        )
    if gptq and quant.gptq.target != "quantized" and adapter.experts is not None:
        raise ValueError(
            f"--gptq-target {quant.gptq.target} is not supported for the {adapter.name} family "
            "(routed experts see their own tokens); use --gptq-target quantized"
        )
    if gptq and quant.gptq.hessian == "fp" and adapter.experts is not None:
        raise ValueError(
            f"--gptq-hessian fp is not supported for the {adapter.name} family: the statistics "
            "pass sees every token, an expert only its routed ones; use --gptq-hessian quantized"
        )
    if method.whole_model_step and not store.whole_model:
        raise ValueError(
            f"method {method.name} {method.whole_model_step}; streaming quantization holds one "
            "block at a time: load the model in memory"
        )
    blocks = adapter.blocks(model)
    heads = HeadShape.of(model.config)
    inputs: BlockInputs | None = None
    e2e_plans = None
    # the full-precision model, the teacher of norm tweaking after quantization (with nothing
    # quantized there is nothing to tune: the model stays exactly the full-precision one)
    tune = method.norm_epochs > 0 and (quant.weight is not None or quant.act is not None)
    teacher = copy.deepcopy(model).requires_grad_(False) if tune else None
    if method.learn == "e2e":  # before anything changes the model: it is the teacher
        from duquant.learn.e2e import learn_end_to_end

        e2e_plans, info = learn_end_to_end(model, adapter, method, quant, calib_windows, seed)
        report.learn.append(info)
    if method.global_rotation:
        unfuse_experts(model, adapter)
    global_online = apply_quarot(model, adapter, seed) if method.global_rotation else {}
    if needs_inputs:
        with store.embedding(model):
            inputs = capture_block_inputs(model, adapter, calib_windows)
    fp_hessians = gptq and quant.gptq.hessian == "fp"
    target = quant.gptq.target if gptq else "quantized"
    learn_to_model = method.learn != "none" and method.learn_target == "model"
    # the full-precision model's block inputs, for learning or GPTQ towards the unquantized model
    fp_stream = inputs if learn_to_model or target == "model" else None
    for i in tqdm(range(len(blocks)), desc=f"quantize {method.name}", leave=False):
        block = store.load(i)
        unfuse_block(block, adapter)
        groups = adapter.block_groups(block)
        fp_out, fp_seen = None, None
        if fp_stream is not None:
            fp_out, fp_seen = run_block_recording(block, groups, fp_stream)
            fp_seen = fp_seen if target == "model" else None
        stats = None
        if (method.needs_calibration and e2e_plans is None) or fp_hessians:
            stats = collect_input_stats(
                block,
                groups,
                inputs,
                sample_rows=method.search_rows,
                seed=seed + i,
                moments=fp_hessians,
            )
        if e2e_plans is not None:
            plans = e2e_plans[i]
        else:
            plans = {
                g.name: plan_group(
                    block,
                    g,
                    _group_method(method, stats, g, i),
                    quant,
                    stats.get(g.name) if stats and method.needs_calibration else None,
                    heads,
                    seed=seed * 1000 + i * 10 + j,
                )
                for j, g in enumerate(groups)
            }
        if method.learn not in ("none", "e2e"):
            plans, info = learn_block(
                block,
                groups,
                inputs,
                plans,
                stats,
                method,
                quant,
                heads,
                seed=seed * 1000 + i,
                targets=fp_out if learn_to_model else None,
            )
            report.learn.append(info)
            log.info(
                "layer %d learned: block MSE %.4g -> %.4g",
                i,
                info["loss_before"],
                info["loss_after"],
            )
        for name, online in global_online.items():
            if name in plans:
                plans[name] = GroupPlan(weight_transform=online, online=online)
        # fold every group first: folds rewrite producers (v_proj, up_proj) that are quantized later
        for g in groups:
            plans[g.name].fold(block, g, heads, adapter.norm_offset)
        for g in groups:
            _swap_linears(block, g, plans[g.name], quant, layer=i, rtn=not gptq)
        reset_caches_after_forward(block)
        if gptq:
            given = None
            if fp_hessians:
                given = {
                    g.name: transformed_hessian(
                        stats[g.name].moments.finalize(), plans[g.name].weight_transform
                    )
                    for g in groups
                }
            clips = {n: c for g in groups for n, c in plans[g.name].weight_clip.items()}
            refs = None
            if fp_seen is not None:  # the FP model's inputs, in the transformed coordinates
                refs = {g.name: _transformed(fp_seen[g.name], plans[g.name]) for g in groups}
            report.layer_errors += _gptq_block(
                block, groups, inputs, quant, layer=i, given=given, clips=clips, refs=refs
            )
        report.plans.append(plans)
        if inputs is not None and i + 1 < len(blocks):
            inputs = inputs.next(run_block(block, inputs), i + 1)
            if fp_stream is not None:
                fp_stream = fp_stream.next(fp_out, i + 1)
        store.release(i)
    if teacher is not None:
        from duquant.learn.norms import tune_norms

        report.norm_tuning = tune_norms(
            model,
            teacher,
            adapter,
            calib_windows,
            epochs=method.norm_epochs,
            lr=method.norm_lr,
            seed=seed,
        )
        del teacher
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    return report


def _group_method(
    method: MethodConfig, stats: dict | None, group: InputGroup, layer: int
) -> MethodConfig:
    """`method`, or its data-free part for a group no calibration token reached (an expert that
    the router never picked): no smoothing, the greedy search's starting rotation."""
    if not method.needs_calibration or stats is None or group.name in stats:
        return method
    rotation = "random-hadamard" if method.refine_from == "random-hadamard" else "none"
    if method.rotation not in ("greedy", "duquant-v1"):
        rotation = method.rotation
    log.warning(
        "layer %d group %s saw no calibration tokens: %s without smoothing, rotation %s",
        layer,
        group.name,
        method.name,
        rotation,
    )
    return replace(method, smooth=False, rotation=rotation)


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


def transformed_hessian(h: Tensor, transform: Transform | None) -> Tensor:
    """The Hessian of x·T from that of x: Tᵀ H T, with T the linear map `transform` applies to rows."""
    if transform is None:
        return h
    t = transform(torch.eye(h.shape[0], dtype=torch.float64, device=h.device))
    return t.T @ h @ t


def _transformed(xs: list[Tensor], plan: GroupPlan) -> list[Tensor]:
    """Raw inputs of a group mapped to what its transformed weights read (x·T, nothing quantized)."""
    t = plan.weight_transform
    return xs if t is None else [t(x.float()) for x in xs]


def _gptq_block(
    block: nn.Module,
    groups: tuple[InputGroup, ...],
    inputs: BlockInputs,
    quant: QuantConfig,
    layer: int,
    given: dict[str, Tensor] | None = None,
    clips: dict[str, Tensor] | None = None,
    refs: dict[str, list[Tensor]] | None = None,
) -> list[dict]:
    """GPTQ the block's linears group by group, each on inputs through the groups already done.

    The Hessian of a group is built from what its linears really see: the transformed, quantized
    activations (the shared InputQuantizer's output), with every earlier group already quantized;
    `given` Hessians per group (GPTQConfig.hessian == "fp") replace those passes; `clips` are
    learned per-row weight clip ratios by linear name (FlatQuant), honoured by every scale choice.
    With an asymmetric `GPTQConfig.target` the weight GPTQ rounds is first moved to the least-squares
    answer to the reference inputs (`refs` per group and window for `model`; the same inputs before
    activation quantization for `unquantized`).
    """
    clips = clips or {}
    target = quant.gptq.target
    errors = []
    for g in groups:
        linears = [block.get_submodule(n) for n in g.linears]
        routed = g.observe is not None  # MoE experts: each linear sees its own tokens
        crosses = None
        if given is not None:
            hs = [given[g.name]] * len(linears)
        elif routed:
            hs = _routed_hessians(block, inputs, g, linears)
        else:
            acc = HessianAccumulator(product_dtype=torch.float32)
            iq = linears[0].input_quantizer
            cross = CrossAccumulator() if target != "quantized" else None
            window = iter(refs[g.name]) if target == "model" else None

            def add(x: Tensor, y: Tensor, acc=acc, iq=iq, cross=cross, window=window) -> None:
                acc.add(y)
                if window is not None:
                    cross.add(next(window), y)
                elif cross is not None:
                    cross.add(iq.online.apply_online(x) if iq.online is not None else x, y)

            try:
                feed_block_until(block, inputs, iq, add, with_input=True)
            finally:
                iq.reset()
            hs = [acc.finalize() if acc.count else None] * len(linears)
            crosses = cross.finalize() if cross is not None and cross.count else None
        w_fps = [lin.weight.data.float() for lin in linears]
        solves = [[i] for i in range(len(linears))] if routed else None
        for idxs in solves or _shared_solves(quant.weight, len(linears)):
            h = hs[idxs[0]]
            if h is None:  # an expert no calibration token reached: nothing to weigh errors by
                for i in idxs:
                    w = quantize_weight(
                        w_fps[i], quant.weight, g.linears[i], clips.get(g.linears[i])
                    )
                    linears[i].weight.data = w.to(linears[i].weight.dtype)
                    errors.append({"layer": layer, "linear": g.linears[i], "fallback": "rtn"})
                log.warning("layer %d %s: no calibration tokens, RTN weights", layer, g.name)
                continue
            h32 = h.float()  # the error report's precision, converted once for all its products
            # GPTQ is independent per output row given H (MX scales are per row and group), so the
            # linears reading one input (q/k/v, gate/up) are solved as one stacked matrix: the
            # same weights, one Cholesky and one column sweep instead of several
            w_stack = torch.cat([w_fps[i] for i in idxs])
            if not routed and crosses is not None:
                w_stack = asymmetric_target(w_stack, h, crosses, quant.gptq.target_damp)
            res = gptq_quantize(
                w_stack,
                h,
                quant.weight,
                blocksize=quant.gptq.blocksize,
                percdamp=quant.gptq.percdamp,
                act_order=quant.gptq.act_order,
                static_groups=quant.gptq.static_groups,
                clip=_stacked_clip([clips.get(g.linears[i]) for i in idxs], w_fps, idxs),
                act_order_scope=quant.gptq.act_order_scope,
                scale_search=quant.gptq.scale_search,
            )
            rows = [w_fps[i].shape[0] for i in idxs]
            qw = as_quantized_weight(res, quant.weight)
            starts = [sum(rows[:k]) for k in range(len(rows))]
            for k, (i, w_q) in enumerate(zip(idxs, res.weight.split(rows), strict=True)):
                name, w_fp = g.linears[i], w_fps[i]
                w_rtn = quantize_weight(w_fp, quant.weight, name, clips.get(name))
                den = hessian_row_energy(h32, w_fp).sum().item()
                errors.append(
                    {
                        "layer": layer,
                        "linear": name,
                        "rtn_error": energy_ratio(
                            hessian_row_energy(h32, w_fp - w_rtn).sum().item(), den
                        ),
                        "gptq_error": energy_ratio(
                            hessian_row_energy(h32, w_fp - w_q).sum().item(), den
                        ),
                        "fallback": res.fallback,
                        "solve_seconds": res.seconds,  # of the stacked solve
                        "solved_with": [g.linears[j] for j in idxs],
                    }
                )
                # the weight decoded from the codes and scales it keeps: w_q bit for bit (tested)
                linears[i].set_quantized(qw.rows(starts[k], starts[k] + rows[k]))
    return errors


def _stacked_clip(
    parts: list[Tensor | None], w_fps: list[Tensor], idxs: list[int]
) -> Tensor | None:
    """The per-row clip ratios of linears solved as one stacked matrix (1 where one has none)."""
    if all(p is None for p in parts):
        return None
    return torch.cat(
        [
            p.reshape(-1, 1).float() if p is not None else torch.ones(w_fps[i].shape[0], 1)
            for p, i in zip(parts, idxs, strict=True)
        ]
    )


def _routed_hessians(
    block: nn.Module, inputs: BlockInputs, group: InputGroup, linears: list[nn.Module]
) -> list[Tensor | None]:
    """Per linear of a routed group (MoE experts sharing one input quantizer), the Hessian of the
    quantized inputs it alone received (None for an expert no token reached), in one partial pass."""
    accs = [HessianAccumulator(product_dtype=torch.float32) for _ in linears]
    current = [0]

    def calling(k: int):
        def hook(_module, _args) -> None:
            current[0] = k

        return hook

    iq = linears[0].input_quantizer
    handles = [lin.register_forward_pre_hook(calling(k)) for k, lin in enumerate(linears)]
    handles.append(iq.register_forward_hook(lambda _m, _a, out: accs[current[0]].add(out)))
    try:
        feed_block_until(block, inputs, block.get_submodule(group.observed), lambda _out: None)
    finally:
        for handle in handles:
            handle.remove()
        iq.reset()
    return [a.finalize() if a.count else None for a in accs]


def _shared_solves(spec: QuantSpec, n: int) -> list[list[int]]:
    """Which of a group's n linears GPTQ solves together: all of them for MXFP4; one by one for
    NVFP4, whose per-tensor scale belongs to each linear."""
    return [[i] for i in range(n)] if spec.per_tensor_scale else [list(range(n))]


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
