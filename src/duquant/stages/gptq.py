"""The GPTQ stage: weights rounded onto the format's grid by GPTQ, one decoder block at a time.

Its options are GPTQ's; `quantize_block` runs it on one block whose linears were swapped for
QuantLinears with transformed, still unquantized weights (duquant.pipeline). The solver itself is
duquant.gptq.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor, nn

from duquant import distributed as dist
from duquant.calibrate import BlockInputs, feed_block_until
from duquant.config import ActOrderScope, GPTQTarget, HessianSource, ScaleSearch
from duquant.formats import QuantSpec
from duquant.gptq import (
    CrossAccumulator,
    GPTQResult,
    HessianAccumulator,
    as_quantized_weight,
    asymmetric_target,
    energy_ratio,
    gptq_quantize,
    hessian_row_energy,
)
from duquant.models.adapters import InputGroup
from duquant.plan import GroupPlan
from duquant.qlinear import quantize_weight
from duquant.stages.base import Stage, StageError, one_of, positive
from duquant.transforms.base import Transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQ(Stage):
    """GPTQ on the MX / NV grid (see duquant.gptq for the solver)."""

    KIND: ClassVar[str] = "gptq"
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

    def check(self) -> None:
        one_of(self, "hessian", tuple(HessianSource))
        one_of(self, "target", tuple(GPTQTarget))
        one_of(self, "act_order_scope", tuple(ActOrderScope))
        one_of(self, "scale_search", tuple(ScaleSearch))
        positive(self, "target_damp")
        if self.target != "quantized" and self.hessian != "quantized":
            raise StageError("an asymmetric gptq target needs the quantized Hessians")

    def fixed(self) -> dict:
        """The options a recipe fixes: those that differ from GPTQ's defaults (the run's command
        line gives the rest)."""
        base = GPTQ()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(base, f.name)
        }

    def quantize_block(
        self,
        block: nn.Module,
        groups: tuple[InputGroup, ...],
        inputs: BlockInputs,
        spec: QuantSpec,
        layer: int,
        given: dict[str, Tensor] | None = None,
        clips: dict[str, Tensor] | None = None,
        refs: dict[str, list[Tensor]] | None = None,
    ) -> list[dict]:
        """GPTQ the block's linears group by group, each on inputs through the groups already done.

        The Hessian of a group is built from what its linears really see: the transformed, quantized
        activations (the shared InputQuantizer's output), with every earlier group already
        quantized; `given` Hessians per group (hessian == "fp") replace those passes; `clips` are
        learned per-row weight clip ratios by linear name (FlatQuant), honoured by every scale
        choice. With an asymmetric `target` the weight GPTQ rounds is first moved to the
        least-squares answer to the reference inputs (`refs` per group and window for `model`; the
        same inputs before activation quantization for `unquantized`).
        """
        clips = clips or {}
        errors: list[dict] = []
        for g in groups:
            linears = [block.get_submodule(n) for n in g.linears]
            routed = g.observe is not None  # MoE experts: each linear sees its own tokens
            hs, crosses = self._hessians(block, g, linears, inputs, given, refs, routed)
            w_fps = [lin.weight.data.float() for lin in linears]
            solves = [[i] for i in range(len(linears))] if routed else None
            for k, idxs in enumerate(solves or shared_solves(spec, len(linears))):
                # under torch.distributed a solve of one linear (a routed expert, an NVFP4
                # linear with its own tensor scale) is done whole by rank k mod world, a shared
                # input's stacked MX rows are split over all ranks
                owner = k % dist.world() if routed or spec.per_tensor_scale else None
                errors += self._solve(
                    g, linears, w_fps, idxs, hs, crosses, spec, layer, clips, owner
                )
        return errors

    def _hessians(
        self, block, g, linears, inputs, given, refs, routed
    ) -> tuple[list, Tensor | None]:
        """Per linear of group `g`, the Hessian GPTQ weighs errors by, and the cross products of an
        asymmetric target (None for the classic one)."""
        if given is not None:
            return [given[g.name]] * len(linears), None
        if routed:
            return routed_hessians(block, inputs, g, linears), None
        acc = HessianAccumulator(product_dtype=torch.float32)
        iq = linears[0].input_quantizer
        cross = CrossAccumulator() if self.target != "quantized" else None
        window = iter(refs[g.name]) if self.target == "model" else None

        def add(x: Tensor, y: Tensor) -> None:
            acc.add(y)
            if window is not None:
                cross.add(next(window), y)
            elif cross is not None:
                cross.add(iq.online.apply_online(x) if iq.online is not None else x, y)

        try:
            feed_block_until(block, inputs, iq, add, with_input=True)
        finally:
            iq.reset()
        dim = linears[0].weight.shape[1]
        acc.all_reduce(dim)  # each rank fed its own windows: the sums of all of them
        if cross is not None:
            cross.all_reduce(dim)
        hs = [acc.finalize(consume=True) if acc.count else None] * len(linears)
        return hs, cross.finalize() if cross is not None and cross.count else None

    def _solve(
        self, g, linears, w_fps, idxs, hs, crosses, spec, layer, clips, owner=None
    ) -> list[dict]:
        """GPTQ the linears `idxs` of group `g` as one stacked matrix; their error records."""
        h = hs[idxs[0]]
        if h is None:  # an expert no calibration token reached: nothing to weigh errors by
            return _rtn_fallback(g, linears, w_fps, idxs, spec, layer, clips)
        # GPTQ is independent per output row given H (MX scales are per row and group), so the
        # linears reading one input (q/k/v, gate/up) are solved as one stacked matrix: the same
        # weights, one Cholesky and one column sweep instead of several
        w_stack = torch.cat([w_fps[i] for i in idxs])
        if g.observe is None and crosses is not None:
            w_stack = asymmetric_target(w_stack, h, crosses, self.target_damp)
        clip = stacked_clip([clips.get(g.linears[i]) for i in idxs], w_fps, idxs)
        if owner is not None and dist.active():
            res = (
                self._solve_rows(w_stack, h, spec, clip, split=False)
                if dist.rank() == owner
                else None
            )
            res = dist.broadcast_object(res, owner)
        else:
            res = self._solve_rows(w_stack, h, spec, clip)
        return _store(g, linears, w_fps, idxs, h, res, spec, layer, clips)

    def _solve_rows(
        self, w: Tensor, h: Tensor, spec: QuantSpec, clip: Tensor | None, split: bool = True
    ) -> GPTQResult:
        """GPTQ of `w` given `h`; under torch.distributed each rank solves its share of the rows
        and the quantized rows are gathered (GPTQ is independent per output row given H; a format
        with a per-tensor scale couples the rows, so every rank solves it whole)."""
        rows = range(w.shape[0])
        if split and dist.active() and not spec.per_tensor_scale:
            rows = dist.shard(w.shape[0])
        part = slice(rows.start, rows.stop)
        res = gptq_quantize(
            w[part],
            h,
            spec,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
            act_order=self.act_order,
            static_groups=self.static_groups,
            clip=None if clip is None else clip[part],
            act_order_scope=self.act_order_scope,
            scale_search=self.scale_search,
        )
        if len(rows) == w.shape[0]:
            return res
        return GPTQResult(
            weight=dist.gather_cat(res.weight),
            scales=dist.gather_cat(res.scales),
            codes=dist.gather_cat(res.codes),
            tensor_scale=res.tensor_scale,
            **_merged_diagnostics(res),
        )


def _merged_diagnostics(res: GPTQResult) -> dict:
    """The fields of a row-split GPTQResult other than its tensors, agreed over ranks."""
    parts = dist.gather_objects({f.name: getattr(res, f.name) for f in fields(res)[4:]})
    merged = dict(parts[0])  # damping comes from H alone: the same on every rank
    merged["seconds"] = max(p["seconds"] for p in parts)
    merged["fallback"] = any(p["fallback"] for p in parts)
    merged["loss"] = sum(p["loss"] for p in parts)
    return merged


def _rtn_fallback(g, linears, w_fps, idxs, spec, layer, clips) -> list[dict]:
    """Round-to-nearest weights for linears GPTQ has no Hessian for."""
    errors = []
    for i in idxs:
        name = g.linears[i]
        # codes and scales kept as for any quantized weight: the exporters write those
        linears[i].set_quantized(spec.quantize_weight(w_fps[i].float(), name, clip=clips.get(name)))
        errors.append({"layer": layer, "linear": g.linears[i], "fallback": "rtn"})
    log.warning("layer %d %s: no calibration tokens, RTN weights", layer, g.name)
    return errors


def _store(g, linears, w_fps, idxs, h, res, spec, layer, clips) -> list[dict]:
    """Give each solved linear its codes and scales; its RTN vs GPTQ output error record."""
    rows = [w_fps[i].shape[0] for i in idxs]
    qw = as_quantized_weight(res, spec)
    starts = [sum(rows[:k]) for k in range(len(rows))]
    energies = _error_energies(g, w_fps, idxs, h, res.weight, spec, clips)
    errors = []
    for k, i in enumerate(idxs):
        den, rtn, gptq = energies[k].tolist()
        errors.append(
            {
                "layer": layer,
                "linear": g.linears[i],
                "rtn_error": energy_ratio(rtn, den),
                "gptq_error": energy_ratio(gptq, den),
                "fallback": res.fallback,
                "solve_seconds": res.seconds,  # of the stacked solve
                "solved_with": [g.linears[j] for j in idxs],
            }
        )
        # the weight decoded from the codes and scales it keeps: w_q bit for bit (tested)
        linears[i].set_quantized(qw.rows(starts[k], starts[k] + rows[k]))
    return errors


def _error_energies(g, w_fps, idxs, h, w_q_stack, spec, clips) -> Tensor:
    """Per linear of the stacked solve, the H-weighted energies [its weight, RTN's error, GPTQ's
    error] (float64 [len(idxs), 3]). Under torch.distributed each rank sums its share of the
    stacked rows and the sums are all-reduced: the report's cost is spread like the solve (a
    format with a per-tensor scale rounds RTN over whole matrices, so there each rank does all)."""
    h32 = h.float()  # the error report's precision, converted once for all its products
    rows = [w_fps[i].shape[0] for i in idxs]
    split = dist.active() and not spec.per_tensor_scale
    mine = dist.shard(sum(rows)) if split else range(sum(rows))
    out = torch.zeros(len(idxs), 3, dtype=torch.float64, device=h.device)
    start = 0
    for k, (i, w_q) in enumerate(zip(idxs, w_q_stack.split(rows), strict=True)):
        a, b = max(mine.start - start, 0), min(mine.stop - start, rows[k])
        start += rows[k]
        if a >= b:
            continue
        name, w_fp = g.linears[i], w_fps[i]
        clip = clips.get(name)
        w_part = w_fp[a:b]
        w_rtn = quantize_weight(w_part, spec, name, None if clip is None else clip[a:b])
        for j, d in enumerate((w_part, w_part - w_rtn, w_part - w_q[a:b])):
            out[k, j] = hessian_row_energy(h32, d).sum().item()
    return dist.all_reduce_(out) if split else out


def stacked_clip(parts: list[Tensor | None], w_fps: list[Tensor], idxs: list[int]) -> Tensor | None:
    """The per-row clip ratios of linears solved as one stacked matrix (1 where one has none)."""
    if all(p is None for p in parts):
        return None
    return torch.cat(
        [
            p.reshape(-1, 1).float() if p is not None else torch.ones(w_fps[i].shape[0], 1)
            for p, i in zip(parts, idxs, strict=True)
        ]
    )


def routed_hessians(
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
    for acc, lin in zip(accs, linears, strict=True):
        acc.all_reduce(lin.weight.shape[1])  # an expert's tokens over every rank's windows
    return [a.finalize(consume=True) if a.count else None for a in accs]


def shared_solves(spec: QuantSpec, n: int) -> list[list[int]]:
    """Which of a group's n linears GPTQ solves together: all of them for MXFP4; one by one for
    NVFP4, whose per-tensor scale belongs to each linear."""
    return [[i] for i in range(n)] if spec.per_tensor_scale else [list(range(n))]


def transformed_hessian(h: Tensor, transform: Transform | None) -> Tensor:
    """The Hessian of x·T from that of x: Tᵀ H T, with T the linear map `transform` applies to rows."""
    if transform is None:
        return h
    t = transform(torch.eye(h.shape[0], dtype=torch.float64, device=h.device))
    return t.T @ h @ t


def transformed_inputs(xs: list[Tensor], plan: GroupPlan) -> list[Tensor]:
    """Raw inputs of a group mapped to what its transformed weights read (x·T, nothing quantized)."""
    t = plan.weight_transform
    return xs if t is None else [t(x.float()) for x in xs]
