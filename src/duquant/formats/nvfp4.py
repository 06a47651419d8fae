"""NVFP4: groups of 16 along the last dim, an FP8 E4M3 scale per group, one FP32 scale per tensor.

The per-tensor scale maps the tensor's absolute maximum to 6 x 448 (E2M1 max x E4M3 max), so group scales
use E4M3's full range; it is computed from the tensor unless given (a static activation scale, say).
A group whose E4M3 scale underflows to zero quantizes to zeros. A non-finite input gives NaN everywhere
(the per-tensor scale is NaN): a non-finite tensor has no meaningful NVFP4 encoding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from duquant.formats.e2m1 import (
    E2M1_MAX,
    check_rounding,
    decode_e2m1,
    encode_e2m1,
    fused_round,
    group_amax,
    grouped,
    pack_nibbles,
    round_e2m1_,
    round_to_e2m1,
    run_compiled,
    unpack_nibbles,
)
from duquant.formats.reference import nv_encode

GROUP_SIZE = 16
E4M3_MAX = 448.0
SCALE_RULES = ("e4m3",)


def tensor_scale_of(x: Tensor) -> Tensor:
    """The FP32 per-tensor scale amax / (6 * 448); 1 for an all-zero tensor."""
    x = x.detach()
    # max and -min, not |x|.amax(): no full-size temporary; abs_ gives a NaN amax the sign |x| would
    amax = torch.maximum(x.amax(), x.amin().neg()).abs_().float()
    # `amax == 0`, not `amax > 0`: a NaN amax must give a NaN scale (and so NaN everywhere), not 1
    return torch.where(amax == 0, torch.ones_like(amax), amax / (E2M1_MAX * E4M3_MAX))


def _encode(
    x: Tensor, rounding: str, tensor_scale: Tensor | None, name: str, inplace: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Group `x`: (E2M1 grid values as float32, E4M3 group scales as float32, per-tensor scale).

    The grid values overwrite `x` when `inplace` and x is float32 and contiguous, else are fresh.
    """
    check_rounding(rounding)
    g = grouped(x, GROUP_SIZE, name)
    own = inplace and g.data_ptr() == x.data_ptr() and x.is_contiguous()
    ts = tensor_scale_of(x) if tensor_scale is None else torch.as_tensor(tensor_scale).float()
    amax = group_amax(g)
    s = (amax / E2M1_MAX / ts).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
    st = s * ts
    live = s > 0
    if (live & ~((st > 0) & (st < float("inf")))).any():
        # a subnormal, zero or infinite tensor scale makes g / (s * ts) infinite or NaN in a live
        # group, where the sign of a NaN is y's and not g's: leave that corner to the plain code
        return nv_encode(x, rounding, ts)
    # s * ts > 0 in live groups, so y has g's signs
    y = round_e2m1_(g.div_(st), rounding) if own else round_e2m1_(g / st, rounding, sign=g)
    if not live.all():  # groups whose E4M3 scale underflows (or is NaN) quantize to +0
        y.masked_fill_(~live, 0.0)
    return y, s, ts


# ---- the format interface GPTQ, QuantLinear and the exporter use (same names in mxfp4) -------
# (how a checkpoint format lays the codes and scales out is the exporter's: duquant.export.ct)
PER_TENSOR_SCALE = True  # each linear has its own FP32 scale: linears sharing an input solve apart


def weight_tensor_scale(w: Tensor) -> Tensor:
    """The FP32 per-tensor scale of a weight (`tensor_scale_of`)."""
    return tensor_scale_of(w.float())


def grid_scales(x: Tensor, rule: str, tensor_scale: Tensor | None = None) -> Tensor:
    """Per-group E4M3 scale [..., K/16] of `x` (float32) given the per-tensor scale, as `_encode`."""
    check_scale_rule(rule)
    if tensor_scale is None:
        raise ValueError("NVFP4 group scales need the per-tensor scale")
    amax = group_amax(grouped(x, GROUP_SIZE, "tensor")).squeeze(-1)
    return (amax / E2M1_MAX / tensor_scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()


def encode_with_scale(
    x: Tensor, scale: Tensor, rule: str, rounding: str, tensor_scale: Tensor | None = None
) -> Tensor:
    """E2M1 grid values (float32) of `x` on the given group `scale` (broadcast) and tensor scale."""
    check_scale_rule(rule)
    if tensor_scale is None:
        raise ValueError("NVFP4 rounding needs the per-tensor scale")
    y = torch.where(scale > 0, x.float() / (scale * tensor_scale), 0.0)
    return round_to_e2m1(y, rounding)


def decode_with_scale(
    q: Tensor, scale: Tensor, rule: str, tensor_scale: Tensor | None = None
) -> Tensor:
    """Grid values times group and tensor scales: (q * s) * ts, the order `quantize_dequantize` uses."""
    if tensor_scale is None:
        raise ValueError("NVFP4 decoding needs the per-tensor scale")
    # q * s is exact, so only the multiplication by ts rounds
    return q.float() * scale.float() * tensor_scale


def encode_decode_with_scale(
    x: Tensor, scale: Tensor, rule: str, rounding: str, tensor_scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(grid values, decoded float32) of `x`: `encode_with_scale` then `decode_with_scale`."""
    q = encode_with_scale(x, scale, rule, rounding, tensor_scale)
    return q, decode_with_scale(q, scale, rule, tensor_scale)


def _fused_kernel(rounding: str, given_scale: bool) -> Callable[..., tuple[Tensor, Tensor]]:
    """The whole NVFP4 fake-quant of a (rows, K) tensor as one function, for torch.compile.

    `_encode`'s arithmetic out of place. The fallback flag sends non-finite inputs (whose NaN bit
    patterns the fused max reduction does not keep) and `_encode`'s corner of a live group with
    s * ts zero or infinite to the eager code.
    """

    def kernel(x2: Tensor, *given: Tensor) -> tuple[Tensor, Tensor]:
        g = x2.float().reshape(x2.shape[0], -1, GROUP_SIZE)
        if given_scale:
            ts = given[0]
        else:
            amax_t = torch.maximum(x2.amax(), x2.amin().neg()).abs().float()
            ts = torch.where(amax_t == 0, 1.0, amax_t / (E2M1_MAX * E4M3_MAX))
        amax = g.abs().amax(dim=-1, keepdim=True)
        s = (amax / E2M1_MAX / ts).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
        st = s * ts
        live = s > 0
        q = torch.where(live, fused_round(g / st, rounding), 0.0)
        out = (q * s * ts).reshape(x2.shape).to(x2.dtype)
        degenerate = live & ~((st > 0) & (st < float("inf")))
        return out, degenerate.any() | ~torch.isfinite(amax).all() | ~torch.isfinite(ts)

    return kernel


def quantize_dequantize(
    x: Tensor,
    scale_rule: str = "e4m3",
    rounding: str = "even",
    *,
    tensor_scale: Tensor | None = None,
    name: str = "tensor",
    inplace: bool = False,
) -> Tensor:
    """Fake-quantize `x` to NVFP4 along its last dim: same shape and dtype.

    `inplace=True` lets the codec overwrite a float32 `x` the caller owns and return it.
    """
    check_scale_rule(scale_rule)

    def eager() -> Tensor:
        q, s, ts = _encode(x, rounding, tensor_scale, name, inplace)
        return q.mul_(s).mul_(ts).reshape(x.shape).to(x.dtype)

    if rounding not in ("even", "away") or not x.is_floating_point():
        return eager()
    if x.ndim == 0 or x.shape[-1] % GROUP_SIZE:
        return eager()
    given = () if tensor_scale is None else (torch.as_tensor(tensor_scale).float(),)
    key = ("nvfp4", rounding, bool(given))
    return run_compiled(key, _fused_kernel(rounding, bool(given)), x, eager, *given)


def pack(
    x: Tensor,
    scale_rule: str = "e4m3",
    rounding: str = "even",
    *,
    tensor_scale: Tensor | None = None,
    name: str = "tensor",
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize `x` to NVFP4: (codes uint8 [..., K/2], E4M3 scale bytes uint8 [..., K/16], FP32 tensor scale)."""
    check_scale_rule(scale_rule)
    q, s, ts = _encode(x, rounding, tensor_scale, name)
    codes = pack_nibbles(encode_e2m1(q).reshape(x.shape))
    scale_bytes = s.squeeze(-1).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, scale_bytes, ts


def unpack(
    codes: Tensor, scales: Tensor, tensor_scale: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Dequantize packed NVFP4 (`pack`'s output) to `dtype`."""
    q = decode_e2m1(unpack_nibbles(codes))
    q = q.reshape(*q.shape[:-1], q.shape[-1] // GROUP_SIZE, GROUP_SIZE)
    s = scales.view(torch.float8_e4m3fn).float().unsqueeze(-1)
    return (q * s * torch.as_tensor(tensor_scale).float()).flatten(-2).to(dtype)


def check_scale_rule(rule: str) -> None:
    """NVFP4 has one scale rule; reject the MXFP4 names with a clear message."""
    if rule not in SCALE_RULES:
        raise ValueError(f"NVFP4 scale rule must be one of {SCALE_RULES}, got {rule!r}")
