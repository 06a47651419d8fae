"""GPTQ (Frantar et al., 2023) onto the MXFP4 / NVFP4 grid, Hessian accumulation, output-error metrics.

Integration is one call per linear: `gptq_quantize(weight, hessian, spec)`, where `weight` is the FP
weight [out, in] as the kernel will see it (after any input transform) and `hessian` is
`HessianAccumulator`'s 2/N Σ x xᵀ over the inputs that linear sees at inference (transformed and
fake-quantized, as DuQuant++ does). The result's `weight` holds dequantized float32 values on the grid
and `scales` the group scales they lie on; export must use those scales (see `GPTQResult`).

Design choices (reference behaviour: design/reference-implementations.md §2.3 and §3.3):

* Group scale timing. By default (`static_groups=False`) a group's scale is computed when the column
  loop enters the group, from the group's *current* weights: every error update so far, including
  those from earlier columns of the same lazy block. The reference GPTQ code (and DuQuant++) reads the
  outer W instead, which misses the intra-block updates, so its scale depends on where the group sits
  in its 128-column block. Ours is the scale unbatched GPTQ would compute from the weights it is about
  to round, which makes the result independent of `blocksize` (lazy batching is then purely an
  optimisation, as in the paper). On random correlated layers the output error of the two timings
  is the same within noise; the gain is consistency. `static_groups=True` computes every scale once
  from the weight before any update (FP-Quant / MR-GPTQ).
* NVFP4: the FP32 per-tensor scale comes from the whole weight up front (it must be one number for
  the tensor); the E4M3 group scales follow the timing above.
* `duquantpp-loggrid`: a dynamic group scale is snapped to a log grid spanning that 32-column slice
  over all rows (DuQuant++'s `per_token_fp4` on the slice); a static one to the whole weight's grid.
* act_order keeps MX groups whole: groups are ordered by descending summed diag(H) of their columns,
  and columns within a group by descending diag(H). Each group is processed contiguously, its scale
  comes from its own columns only, and un-permuting gives groups contiguous in the original column
  order, so the weight packs like any other. (MR-GPTQ instead orders single columns globally, which
  only works with static scales.)
* `act_order_scope="column"` is MR-GPTQ's (FP-Quant) order: single columns by descending diag(H)
  over the whole weight, each rounded on the static scale of its original group (needs
  `static_groups`, since a group's columns are no longer visited together).
* `scale_search` (MXFP4): `"hessian"` (ours) chooses, when a group's scale is fixed, between the two
  E8M0 exponents every power-of-two rule picks from (the `ocp` exponent e and e + 1) by the GPTQ loss
  of the group's own columns (`_hessian_pick`); `"fpquant-mse"` is FP-Quant's MSE weight observer
  (`fpquant_mse_scales`), static scales computed once from the weight.
* Dead columns (diag(H) == 0, inputs always zero) get H_ii = 1 and W[:, i] = 0 before anything else,
  so they neither enter the scales nor the NVFP4 tensor scale.
* Precision: H, its damping, inverse and Cholesky factor are float64 (ill-conditioned Hessians fail
  Cholesky far less often than in float32); the weight being updated is `compute_dtype` (float64 by
  default, so changing blocksize only reorders sums at the 1e-16 level; float32 is the cheaper choice
  where float64 is slow, as on most GPUs). Scales and rounding see the float32 value through the
  codec's own arithmetic, as `QuantSpec.fake_quant` does, so a diagonal H gives RTN bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from duquant import distributed as dist
from duquant.config import ActOrderScope, ScaleSearch
from duquant.formats import QuantizedWeight, QuantSpec
from duquant.formats.e2m1 import encode_e2m1, pack_nibbles

logger = logging.getLogger(__name__)

DAMP_RETRIES = 3  # extra Cholesky attempts, each with 10x the previous damping, before RTN
# the option vocabularies are duquant.config's (one source for the command line and the library)
ACT_ORDER_SCOPES = tuple(s.value for s in ActOrderScope)
SCALE_SEARCHES = tuple(s.value for s in ScaleSearch)
# scale rules whose scale is one of the two E8M0 powers of two the Hessian search compares
HESSIAN_SEARCH_RULES = ("ocp", "ceil", "ct-round", "mse")
# FP-Quant's MSE observer (src/quantization/quantizer.py `get_quantization_params`): 100 shrink
# factors 1 - i * 0.8 / 100 of amax / 6, error sum |x - q|^2.4, E8M0 cast after the choice
FPQUANT_MSE_STEPS, FPQUANT_MSE_SHRINK, FPQUANT_MSE_NORM = 100, 0.8, 2.4


@dataclass
class GPTQResult:
    """A GPTQ-quantized weight, the group scales it lies on, and diagnostics of the call.

    `scales` [out, in / group] in original column order, as the format stores them: for MXFP4 the
    E8M0 power of two (w = e2m1 · s, times 1/3 for `fpquant`) or the loggrid scale; for NVFP4 the
    E4M3 group scale (w = e2m1 · s · `tensor_scale`). Export must use these rather than re-derive
    scales from `weight`: for `fpquant`, `duquantpp-loggrid` and NVFP4 a group whose largest element
    rounded low re-quantizes to another scale (for `fpquant` even plain RTN output does, since
    6 · 2^e / 3 = 2^(e+1) moves the E8M0 exponent up).
    """

    weight: Tensor  # float32 [out, in], dequantized values on the grid
    scales: Tensor  # float32 [out, in / group_size]
    codes: Tensor  # uint8 [out, in / 2]: the packed E2M1 codes `weight` decodes from
    tensor_scale: Tensor | None  # NVFP4 per-tensor FP32 scale; None for MXFP4
    percdamp: float  # relative damping of the successful Cholesky (last one tried on fallback)
    damping: float  # absolute value added to diag(H)
    fallback: bool  # Cholesky failed at every damping: `weight` is RTN (spec.fake_quant)
    dead_columns: int  # input channels with diag(H) == 0, quantized to zero
    loss: float  # GPTQ objective Σ (w - q)² / (2 [U]_ii²), U the upper Cholesky factor of H⁻¹
    seconds: float  # wall time of the call


def grid_scales(x: Tensor, spec: QuantSpec, tensor_scale: Tensor | None = None) -> Tensor:
    """Per-group stored scale [..., K / group] of `x`: MXFP4 E8M0 (or loggrid) scale, NVFP4 E4M3 scale."""
    return spec.group_scales(x, tensor_scale)


def round_to_grid(
    x: Tensor, scale: Tensor, spec: QuantSpec, tensor_scale: Tensor | None = None
) -> Tensor:
    """Round float32 `x` onto the grid of fixed group `scale` (broadcast against `x`) with the spec's rounding."""
    return spec.decode(spec.encode(x, scale, tensor_scale), scale, tensor_scale)


def act_order_permutation(diag: Tensor, group_size: int) -> Tensor:
    """Column order keeping groups whole: groups by descending summed diag(H), then columns by diag(H)."""
    d = diag.reshape(-1, group_size)
    group_order = torch.argsort(d.sum(dim=1), descending=True, stable=True)
    within = torch.argsort(d, dim=1, descending=True, stable=True)
    starts = torch.arange(d.shape[0], device=diag.device).unsqueeze(1) * group_size
    return (starts + within)[group_order].reshape(-1)


def column_act_order(diag: Tensor) -> Tensor:
    """MR-GPTQ's column order: every column by descending diag(H), groups ignored."""
    return torch.argsort(diag, descending=True, stable=True)


def fpquant_mse_scales(w: Tensor, spec: QuantSpec) -> Tensor:
    """FP-Quant's MSE observer on float32 `w` [out, in]: per group, the shrink f of the float scale
    f * amax / 6 with the smallest sum |x - q|^2.4 (first on ties), then the rule's E8M0 scale of
    f * amax (for `fpquant`, FP-Quant's own cast). The error is that of the float scale, before the
    power-of-two cast, as FP-Quant computes it."""
    from duquant.formats import mxfp4
    from duquant.formats.e2m1 import E2M1_MAX, round_to_e2m1

    g = w.float().reshape(w.shape[0], -1, spec.group_size)
    amax = g.abs().amax(dim=-1, keepdim=True)
    base = amax / E2M1_MAX
    safe = torch.where(base > 0, base, torch.ones_like(base))
    best = torch.full_like(amax, math.inf)
    best_f = torch.ones_like(amax)
    for i in range(FPQUANT_MSE_STEPS):
        f = 1.0 - i * FPQUANT_MSE_SHRINK / FPQUANT_MSE_STEPS
        s = safe * f
        err = (g - round_to_e2m1(g / s, spec.rounding) * s).abs().pow(FPQUANT_MSE_NORM)
        err = err.sum(dim=-1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        best_f = torch.where(better, torch.full_like(best_f, f), best_f)
    e = mxfp4.shared_exponent((best_f * amax).squeeze(-1), spec.scale_rule)
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e)


def check_gptq_options(
    spec: QuantSpec, act_order: bool, act_order_scope: str, static_groups: bool, scale_search: str
) -> None:
    """Reject GPTQ option combinations that have no meaning, saying which and why."""
    if act_order_scope not in ACT_ORDER_SCOPES:
        raise ValueError(
            f"act_order_scope must be one of {ACT_ORDER_SCOPES}, got {act_order_scope!r}"
        )
    if scale_search not in SCALE_SEARCHES:
        raise ValueError(f"scale_search must be one of {SCALE_SEARCHES}, got {scale_search!r}")
    if act_order and act_order_scope == ActOrderScope.COLUMN and not static_groups:
        raise ValueError("column act order (MR-GPTQ) needs static group scales (static_groups)")
    if scale_search == ScaleSearch.NONE:
        return
    if spec.format != "mxfp4":
        raise ValueError(
            f"scale search {scale_search} applies to MXFP4 E8M0 scales, not {spec.format}"
        )
    if scale_search == ScaleSearch.FPQUANT_MSE:
        from duquant.formats.mxfp4 import AMAX_RULES

        if not static_groups:
            raise ValueError(
                "scale search fpquant-mse is a static observer: it needs static_groups"
            )
        if spec.scale_rule not in AMAX_RULES:
            raise ValueError(
                f"scale search fpquant-mse casts a shrunk group maximum with the scale rule; "
                f"{spec.scale_rule} is not one of {AMAX_RULES}"
            )
    if scale_search == ScaleSearch.HESSIAN:
        if spec.scale_rule not in HESSIAN_SEARCH_RULES:
            raise ValueError(
                f"scale search hessian chooses between the ocp exponent and the next; scale rule "
                f"{spec.scale_rule} is not one of {HESSIAN_SEARCH_RULES}"
            )
        if act_order and act_order_scope == ActOrderScope.COLUMN:
            raise ValueError("scale search hessian needs whole groups: use act_order_scope group")


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    compute_dtype: torch.dtype = torch.float64,
    act_order_scope: str = ActOrderScope.GROUP,
    scale_search: str = ScaleSearch.NONE,
    clip: Tensor | None = None,
) -> GPTQResult:
    """Quantize `weight` [out, in] onto `spec`'s grid with GPTQ, given the input Hessian [in, in].

    `clip` [out, 1] (learned weight clipping, FlatQuant): each group scale is chosen for the row's
    ratio times the group's maximum, as `QuantSpec.fake_quant_clipped` does.
    """
    start = time.perf_counter()
    _check_inputs(weight, hessian, spec, blocksize, percdamp)
    check_gptq_options(spec, act_order, act_order_scope, static_groups, scale_search)
    if clip is not None and scale_search != ScaleSearch.NONE:
        raise ValueError("learned weight clipping fixes the scales: use scale_search none")
    gs = spec.group_size
    w, h, dead = _drop_dead_columns(weight, hessian, compute_dtype)
    w32 = w.float()
    ts = spec.weight_tensor_scale(w32)
    clip = None if clip is None else clip.detach().float().reshape(-1, 1).to(w.device)
    static = _static_scales(w32, spec, ts, clip, scale_search) if static_groups else None
    # the weight each group's Hessian-search candidates come from: static -> the original one
    search_ref = w32 if scale_search == ScaleSearch.HESSIAN and static_groups else None

    columns = act_order and act_order_scope == ActOrderScope.COLUMN
    perm = _act_order_perm(h, gs, columns) if act_order else None
    col_group = None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
        if columns:
            col_group = perm // gs  # each permuted column keeps its original group's static scale
        else:
            static, search_ref = _permute_groups(static, search_ref, perm, gs)

    def fresh() -> Tensor:  # H as prepared above, again (a retry after a failed factorization)
        hh = _drop_dead_columns(weight[:1], hessian, compute_dtype)[1]
        return hh if perm is None else hh[perm][:, perm]

    u, rel, damp = _inverse_cholesky(h, percdamp, fresh)  # h (our copy) becomes the factor
    del h  # the column loop needs only the factor
    if u is None:
        return _rtn_fallback(weight, spec, clip, rel, damp, int(dead.numel()), start)

    search = scale_search == ScaleSearch.HESSIAN
    q, grid, scales, loss = _column_loop(
        w, u, spec, ts, blocksize, static, col_group, search, search_ref, clip
    )
    if perm is not None:
        q, grid, scales = _unpermute(q, grid, scales, perm, gs, whole_groups=col_group is None)
    seconds = time.perf_counter() - start
    logger.debug(
        "GPTQ %s on %s: percdamp %.3g, %d dead columns, loss %.4g, %.2fs",
        spec,
        tuple(weight.shape),
        rel,
        dead.numel(),
        loss,
        seconds,
    )
    codes = pack_nibbles(encode_e2m1(grid))
    return GPTQResult(q, scales, codes, ts, rel, damp, False, int(dead.numel()), loss, seconds)


def _drop_dead_columns(
    weight: Tensor, hessian: Tensor, compute_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(weight in `compute_dtype`, float64 Hessian, dead column indices) with every dead column
    (diag(H) == 0) given H_ii = 1 and a zero weight, before scales or the tensor scale see it."""
    w = weight.detach().to(compute_dtype).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    dead = torch.nonzero(torch.diagonal(h) == 0).squeeze(1)
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h, dead


def _static_scales(
    w32: Tensor, spec: QuantSpec, ts: Tensor | None, clip: Tensor | None, scale_search: str
) -> Tensor:
    """Every group's scale, computed once from the weight before any update (`static_groups`)."""
    if scale_search == ScaleSearch.FPQUANT_MSE:
        return fpquant_mse_scales(w32, spec)
    return grid_scales(_clipped(w32, clip), spec, ts)


def _act_order_perm(h: Tensor, group_size: int, columns: bool) -> Tensor:
    """The act-order column permutation from diag(H): single columns (MR-GPTQ) or whole groups."""
    diag = torch.diagonal(h)
    return column_act_order(diag) if columns else act_order_permutation(diag, group_size)


def _permute_groups(
    static: Tensor | None, search_ref: Tensor | None, perm: Tensor, group_size: int
) -> tuple[Tensor | None, Tensor | None]:
    """Static scales and the Hessian search's reference weight in a group-keeping permutation's order."""
    if static is not None:
        static = static[:, perm[::group_size] // group_size]
    if search_ref is not None:
        search_ref = search_ref[:, perm]
    return static, search_ref


def _unpermute(
    q: Tensor, grid: Tensor, scales: Tensor, perm: Tensor, group_size: int, whole_groups: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Weight, grid values and (with `whole_groups`) scales back in the original column order;
    column act order keeps its scales in original group order already."""
    q, grid = q[:, torch.argsort(perm)], grid[:, torch.argsort(perm)]
    if whole_groups:
        scales = scales[:, torch.argsort(perm[::group_size] // group_size)]
    return q, grid, scales


def _rtn_fallback(
    weight: Tensor,
    spec: QuantSpec,
    clip: Tensor | None,
    rel: float,
    damp: float,
    dead_columns: int,
    start: float,
) -> GPTQResult:
    """The RTN result (spec.fake_quant, clipped) when Cholesky failed at every damping."""
    logger.warning(
        "GPTQ: Cholesky failed up to percdamp %.3g; falling back to RTN for a %s weight",
        rel,
        tuple(weight.shape),
    )
    rtn = spec.quantize_weight(weight.detach().float(), clip=clip)
    return GPTQResult(
        weight=rtn.dequantize(),
        scales=rtn.scales,
        codes=rtn.packed,
        tensor_scale=rtn.tensor_scale,
        percdamp=rel,
        damping=damp,
        fallback=True,
        dead_columns=dead_columns,
        loss=float("nan"),
        seconds=time.perf_counter() - start,
    )


def _clipped(w: Tensor, clip: Tensor | None) -> Tensor:
    """`w` with each row scaled by its clip ratio (what the scale rule sees), or `w` itself."""
    return w if clip is None else w * clip


def _check_inputs(
    weight: Tensor, hessian: Tensor, spec: QuantSpec, blocksize: int, percdamp: float
) -> None:
    """Reject shapes, block sizes and non-finite values GPTQ cannot handle, saying why."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian has shape {tuple(hessian.shape)}; a weight with {cols} inputs needs ({cols}, {cols})"
        )
    gs = spec.group_size
    if cols % gs:
        raise ValueError(f"{cols} input channels are not divisible by the {spec.format} group {gs}")
    if blocksize <= 0 or blocksize % gs:
        raise ValueError(
            f"blocksize {blocksize} must be a positive multiple of the group size {gs}"
        )
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight holds NaN or Inf; GPTQ would spread it to every column")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian holds NaN or Inf; check the calibration inputs")


def _inverse_cholesky(
    h: Tensor, percdamp: float, fresh: Callable[[], Tensor]
) -> tuple[Tensor | None, float, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, raising λ tenfold on failure; None if every try fails.
    `h` (the caller's own copy) becomes the factor: it is damped, factored, inverted and factored
    again in place, so the solve holds one [in, in] float64 matrix beside the caller's H (134 MB
    at in = 4096) instead of three; a retry starts again from `fresh()` (a new copy of H)."""
    diag = torch.diagonal(h).clone()
    mean_diag = diag.mean().item()
    rel = damp = 0.0
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for attempt in range(DAMP_RETRIES + 1):
        rel = percdamp * 10.0**attempt
        damp = rel * mean_diag
        if attempt:
            h = fresh()
        torch.diagonal(h).add_(damp)
        torch.linalg.cholesky_ex(h, out=(h, info))  # the lower factor L, in h's storage
        if info.item() == 0:
            torch.cholesky_inverse(h, out=h)  # (L Lᵀ)⁻¹
            torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
            if info.item() == 0 and torch.isfinite(h).all():
                return h, rel, damp
        logger.info("GPTQ: Cholesky failed at percdamp %.3g, retrying with more damping", rel)
    return None, rel, damp


def hessian_candidates(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(the rule's scale, the other candidate) per group of float32 `x` [rows, K]: the candidates
    are the `ocp` power of two 2^e (amax / s in [4, 8)) and 2^(e + 1) ([2, 4)), the pair every
    power-of-two rule of HESSIAN_SEARCH_RULES picks from; 2^(e + 1) only where 6 * 2^(e + 1)
    stays finite in float32."""
    from duquant.formats import mxfp4

    rule = grid_scales(x, spec)
    lo = mxfp4.group_scales(x, "ocp")
    hi = torch.where(lo <= 2.0**124, lo * 2.0, lo)
    return rule, torch.where(rule == lo, hi, lo)


def _hessian_pick(
    x: Tensor, u: Tensor, rule: Tensor, other: Tensor, spec: QuantSpec, ts: Tensor | None
) -> Tensor:
    """Per row, the scale (`rule` or `other`, [rows]) with the smaller GPTQ loss of the group `x`
    [rows, g] (current weights of its columns) swept with `u` (its block of the upper Cholesky
    factor of H^-1); a tie keeps `rule`.

    Why this criterion: Σ_j ((x_j - q_j) / U_jj)² over the group's columns, with the in-group error
    feedback, is exactly the increase of the layer objective tr(ΔW H ΔWᵀ) that fixing this group
    costs when the columns before it are fixed and those after it still compensate (the Schur
    complement GPTQ's own loss accumulates). A diag(H)-weighted MSE would ignore that compensation,
    which is what GPTQ exists for; the exact form costs one extra sweep of the group's 32 columns.
    """
    rows = x.shape[0]
    xs = torch.cat([x, x]).clone()
    s = torch.cat([rule, other])
    loss = torch.zeros(2 * rows, dtype=x.dtype, device=x.device)
    for j in range(x.shape[1]):
        col = xs[:, j]
        qx = spec.decode(spec.encode(col.float(), s, ts), s, ts).to(x.dtype)
        e = (col - qx) / u[j, j]
        xs[:, j + 1 :].addr_(e, u[j, j + 1 :], alpha=-1.0)
        loss += e.square()
    return torch.where(loss[rows:] < loss[:rows], other, rule)


def _column_loop(
    w: Tensor,
    u: Tensor,
    spec: QuantSpec,
    ts: Tensor | None,
    blocksize: int,
    static: Tensor | None,
    col_group: Tensor | None = None,
    search: bool = False,
    search_ref: Tensor | None = None,
    clip: Tensor | None = None,
) -> tuple[Tensor, Tensor, float]:
    """The GPTQ sweep over (permuted) columns with lazy block updates: (weight, grid values, scales, loss).

    `col_group` (column act order) gives each column's original group, whose `static` scale it
    uses; `search` picks each group's scale by `_hessian_pick`, from candidates of the group's
    current weights, or of `search_ref` (the original weight, permuted like `w`) with static scales.
    """
    rows, cols = w.shape
    gs = spec.group_size
    u = u.to(w.dtype)
    q = torch.empty(rows, cols, dtype=torch.float32, device=w.device)
    grid = torch.empty(rows, cols, dtype=torch.float32, device=w.device)
    if col_group is not None:
        scales = static.clone()
    else:
        scales = torch.empty(rows, cols // gs, dtype=torch.float32, device=w.device)
    loss = torch.zeros((), dtype=w.dtype, device=w.device)
    scale = scales[:, 0]
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        w1 = w[:, b0:b1].clone()
        u1 = u[b0:b1, b0:b1]
        diag = u1.diagonal().tolist()  # python floats: one op fewer a column than u1[i, i]
        err1 = torch.empty_like(w1)
        for i in range(b1 - b0):
            col = b0 + i
            if col_group is not None:
                scale = scales[:, col_group[col]]
            elif col % gs == 0:  # entering a group; blocks start on group boundaries
                g = col // gs
                if search:
                    ref = w1[:, i : i + gs] if search_ref is None else search_ref[:, col : col + gs]
                    rule, other = hessian_candidates(ref.float(), spec)
                    scales[:, g] = _hessian_pick(
                        w1[:, i : i + gs],
                        u1[i : i + gs, i : i + gs],
                        rule[:, 0],
                        other[:, 0],
                        spec,
                        ts,
                    )
                elif static is None:
                    # w1 already holds every update so far, intra-block ones included
                    cur = _clipped(w1[:, i : i + gs].float(), clip)
                    scales[:, g] = grid_scales(cur, spec, ts)[:, 0]
                else:
                    scales[:, g] = static[:, g]
                scale = scales[:, g]
            # the hot loop: each op costs microseconds of dispatch against 576-row vectors, so
            # results are written into their destinations (bit for bit the plain expressions)
            x = w1[:, i]
            gx, qx = spec.encode_decode(x.float(), scale, ts)
            grid[:, col] = gx
            q[:, col] = qx
            e = torch.sub(x, qx, out=err1[:, i]).div_(diag[i])  # x - qx promotes qx exactly
            w1[:, i + 1 :].addr_(e, u1[i, i + 1 :], alpha=-1.0)
        loss += err1.square().sum()
        w[:, b1:] -= err1 @ u[b0:b1, b1:]
    return q, grid, scales, loss.item() / 2.0


class HessianAccumulator:
    """Running H = 2/N Σ x xᵀ over the rows of every batch added (all leading dims count as tokens)."""

    def __init__(
        self, dtype: torch.dtype = torch.float64, product_dtype: torch.dtype | None = None
    ) -> None:
        self.dtype = dtype
        # float32 products of each batch into the float64 sum: 2x faster, relative error ~1e-6
        self.product_dtype = product_dtype or dtype
        self.count = 0
        self._sum: Tensor | None = None

    def add(self, x: Tensor) -> None:
        """Accumulate the tokens of `x` [..., in]."""
        x2 = x.detach().reshape(-1, x.shape[-1])
        if not torch.isfinite(x2).all():
            raise ValueError("calibration input holds NaN or Inf; it would poison the Hessian")
        if self._sum is None:
            self._sum = torch.zeros(x2.shape[1], x2.shape[1], dtype=self.dtype, device=x2.device)
        elif x2.shape[1] != self._sum.shape[0]:
            raise ValueError(
                f"input has {x2.shape[1]} features; the Hessian was started with {self._sum.shape[0]}"
            )
        # summing and dividing once at the end is exact up to the float sums, unlike a running mean
        x2 = x2.to(self.product_dtype)
        # added in the sum's dtype without a converted copy of the product (134 MB at in = 4096)
        self._sum.add_(x2.T @ x2)
        self.count += x2.shape[0]

    def all_reduce(self, dim: int) -> None:
        """Sum the running sums and counts of every rank (torch.distributed), so each holds the
        Hessian of all ranks' tokens; a rank that saw none takes part with zeros of size `dim`."""
        if not dist.active():
            return
        if self._sum is None:
            self._sum = torch.zeros(dim, dim, dtype=self.dtype)
        dist.all_reduce_(self._sum)
        self.count = dist.sum_int(self.count)
        if self.count == 0:
            self._sum = None

    def finalize(self, consume: bool = False) -> Tensor:
        """H = 2/N Σ x xᵀ over everything added so far; `consume`: scaled in place in the running
        sum's storage (no second [in, in] matrix), the accumulator left empty."""
        if self._sum is None or self.count == 0:
            raise ValueError("no inputs were added to the Hessian accumulator")
        if not consume:
            return self._sum * (2.0 / self.count)
        h, self._sum, self.count = self._sum.mul_(2.0 / self.count), None, 0
        return h


class CrossAccumulator:
    """Running D = 2/N Σ (x_ref − x)ᵀ x over token rows: how the inputs a layer sees (x) miss
    the inputs it should answer to (x_ref), weighted by x, for GPTQ's asymmetric target."""

    def __init__(self) -> None:
        self.count = 0
        self._sum: Tensor | None = None

    def add(self, x_ref: Tensor, x: Tensor) -> None:
        """Accumulate the aligned tokens of `x_ref` and `x` [..., in]."""
        r = x_ref.detach().reshape(-1, x_ref.shape[-1]).float()
        q = x.detach().reshape(-1, x.shape[-1]).float()
        if r.shape != q.shape:
            raise ValueError(
                f"reference inputs {tuple(r.shape)} do not match inputs {tuple(q.shape)}"
            )
        if self._sum is None:
            self._sum = torch.zeros(q.shape[1], q.shape[1], dtype=torch.float64, device=q.device)
        self._sum.add_(((r - q).T @ q).double())
        self.count += q.shape[0]

    def all_reduce(self, dim: int) -> None:
        """Sum the running sums and counts of every rank (see HessianAccumulator.all_reduce)."""
        if not dist.active():
            return
        if self._sum is None:
            self._sum = torch.zeros(dim, dim, dtype=torch.float64)
        dist.all_reduce_(self._sum)
        self.count = dist.sum_int(self.count)
        if self.count == 0:
            self._sum = None

    def finalize(self) -> Tensor:
        """D = 2/N Σ (x_ref − x)ᵀ x, on the scale of HessianAccumulator's H."""
        if self._sum is None or self.count == 0:
            raise ValueError("no inputs were added to the cross accumulator")
        return self._sum * (2.0 / self.count)


def asymmetric_target(weight: Tensor, hessian: Tensor, cross: Tensor, percdamp: float) -> Tensor:
    """W* = W + W·D·(H + λI)⁻¹, the least-squares weight for inputs x given reference inputs x_ref.

    ‖x_ref Wᵀ − x Ŵᵀ‖² = ‖x (W* − Ŵ)ᵀ‖² + const, so GPTQ of W* on H minimises the error against
    the reference outputs (GPTAQ's asymmetric calibration) with GPTQ's own column loop; the ridge
    λ = percdamp·mean diag(H) shrinks the correction, not W (D = 0 gives W back exactly).
    """
    h = hessian.detach().double().clone()
    h.diagonal().add_(percdamp * torch.diagonal(h).mean().item())
    w = weight.detach().double()
    corr = torch.linalg.solve(h, (w @ cross.double()).T).T  # W·D·H⁻¹ (H symmetric)
    return (w + corr).to(weight.dtype)


def hessian_from_inputs(x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """H = 2/N Σ x xᵀ of `x` [..., in] in one go."""
    acc = HessianAccumulator(dtype)
    acc.add(x)
    return acc.finalize()


def layer_output_error(x: Tensor, w_ref: Tensor, w_q: Tensor) -> float:
    """Relative output error ‖X Wᵀ − X W_qᵀ‖ / ‖X Wᵀ‖ (Frobenius) over the tokens of `x` [..., in]."""
    x2 = x.detach().reshape(-1, x.shape[-1]).double()
    ref = w_ref.detach().double()
    num = torch.linalg.matrix_norm(x2 @ (ref - w_q.detach().double()).T)
    den = torch.linalg.matrix_norm(x2 @ ref.T)
    return _ratio(num.item(), den.item())


def hessian_output_error(hessian: Tensor, w_ref: Tensor, w_q: Tensor) -> float:
    """`layer_output_error` from H = 2/N XᵀX instead of X: sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))."""
    h = hessian.detach().double()
    ref = w_ref.detach().double()
    delta = ref - w_q.detach().double()
    num = ((delta @ h) * delta).sum().clamp(min=0.0).item()
    den = ((ref @ h) * ref).sum().clamp(min=0.0).item()
    return energy_ratio(num, den)


def energy_ratio(num_sq: float, den_sq: float) -> float:
    """sqrt(num_sq / den_sq): a relative output error from squared energies (0/0 = 0)."""
    return _ratio(math.sqrt(num_sq), math.sqrt(den_sq))


def hessian_row_energy(hessian: Tensor, w: Tensor) -> Tensor:
    """Per output row, (w H wᵀ)_rr in float32: sums of these over a linear's rows give the
    terms of `hessian_output_error` for reports, at a quarter of its float64 cost."""
    return ((w.float() @ hessian.float()) * w.float()).sum(dim=1).clamp(min=0.0)


def _ratio(num: float, den: float) -> float:
    """num / den, with 0 / 0 = 0 and x / 0 = inf."""
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def as_quantized_weight(res: GPTQResult, spec: QuantSpec) -> QuantizedWeight:
    """The codes and scales of a GPTQ result as the quantized linear keeps them."""
    return QuantizedWeight(spec, res.codes, res.scales, res.tensor_scale)


__all__ = [
    "GPTQResult",
    "as_quantized_weight",
    "HessianAccumulator",
    "act_order_permutation",
    "check_gptq_options",
    "column_act_order",
    "fpquant_mse_scales",
    "hessian_candidates",
    "gptq_quantize",
    "grid_scales",
    "hessian_from_inputs",
    "hessian_output_error",
    "hessian_row_energy",
    "energy_ratio",
    "layer_output_error",
    "round_to_grid",
]
