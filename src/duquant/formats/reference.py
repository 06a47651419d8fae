"""The simple MXFP4 / NVFP4 fake-quant codec, kept verbatim as the specification of the fast one.

`duquant.formats.mxfp4` / `nvfp4` compute the same values with fewer passes over memory (bit tricks,
in-place ops); `tests/test_fast_codec.py` checks them against this module bit for bit. Nothing in the
library calls it: it is a readable statement of the arithmetic, one step per line.
"""

from __future__ import annotations

import torch
from torch import Tensor

from duquant.formats.e2m1 import E2M1_MAX, check_rounding, grouped

MX_GROUP, NV_GROUP = 32, 16
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
E4M3_MAX = 448.0
MX_GLOBAL_FACTOR = {"fpquant": 1.0 / 3.0}
_LOGGRID_LEVELS = 255
_LOGGRID_FLOOR = 2.0**-126


def round_to_e2m1(y: Tensor, rounding: str = "even") -> Tensor:
    """Round scaled values to the nearest E2M1 value (ties per `rounding`), saturating at ±6; NaN stays NaN."""
    check_rounding(rounding)
    a = y.abs().clamp(max=E2M1_MAX)
    # the grid spacing is 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]: dividing by a power of two
    # is exact, so rounding a/step to an integer is rounding to the grid; an integer tie at
    # a/step is a tie between two grid points and the even integer is the even E2M1 code
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    scaled = a / step
    if rounding == "even":
        r = torch.round(scaled)
    else:  # not floor(scaled + 0.5): that sum rounds up to 1 for the float just below 0.5
        r = torch.floor(scaled)
        r = r + (scaled - r >= 0.5).to(scaled.dtype)  # the fraction scaled - r is exact
    return torch.copysign(r * step, y)


def _floor_log2(amax: Tensor) -> tuple[Tensor, Tensor]:
    """Exact floor(log2 amax) and the mantissa amax / 2^floor(log2 amax) in [1, 2), from the float bits."""
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2^exponent, mantissa in [0.5, 1)
    return exponent.to(torch.int32) - 1, mantissa * 2.0


def mx_shared_exponent(amax: Tensor, rule: str) -> Tensor:
    """E8M0 exponent (int32, clamped to [-127, 127]) of each group for a power-of-two `rule`."""
    e, m = _floor_log2(amax)
    if rule == "ocp":
        e = e - 2
    elif rule == "ceil":  # smallest e with 6 * 2^e >= amax
        e = e - 2 + (m > 1.5).to(torch.int32)
    elif rule == "ct-round":
        e = e - 2 + (m >= 1.75).to(torch.int32)
    elif rule != "fpquant":
        raise ValueError(f"scale rule {rule!r} has no E8M0 exponent")
    e = torch.where(amax > 0, e, torch.full_like(e, E8M0_MIN_EXP))
    return e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def mx_mse_exponent(g: Tensor, rounding: str = "even") -> Tensor:
    """`mse` rule: of the `ocp` exponent e and e + 1, the one whose rounding of the group [..., 32]
    has the smaller sum of squared errors (float64); a tie keeps e; e + 1 only while 4 * 2^(e + 1)
    stays finite in float32."""
    amax = g.abs().amax(dim=-1, keepdim=True)
    e = mx_shared_exponent(torch.where(torch.isfinite(amax), amax, 1.0), "ocp")
    errors = []
    for cand in (e, e + 1):
        pow2 = torch.ldexp(torch.ones_like(amax), cand)
        q = round_to_e2m1(g / pow2, rounding).double() * pow2.double()
        errors.append((q - g.double()).square().sum(dim=-1, keepdim=True))
    up = (errors[1] < errors[0]) & (e <= E8M0_MAX_EXP - 3)
    return e + up.to(torch.int32)


def mx_loggrid_scale(amax: Tensor) -> Tensor:
    """The released DuQuant++ code's scale: amax/6 floored onto a 256-level log grid over the tensor."""
    s = (amax / E2M1_MAX).clamp(min=_LOGGRID_FLOOR)
    finite = torch.isfinite(s)
    logs = torch.log2(s)
    lo = logs[finite].min() if finite.any() else logs.new_tensor(0.0)
    hi = logs[finite].max() if finite.any() else logs.new_tensor(0.0)
    span = hi - lo
    if span <= 0:
        return s
    code = torch.floor(_LOGGRID_LEVELS * ((logs - lo) / span)).clamp(0, _LOGGRID_LEVELS)
    return torch.exp2(lo + code * span / _LOGGRID_LEVELS)


def mx_group_scales(x: Tensor, rule: str = "ocp") -> Tensor:
    """Each group's scale [..., K/32] as `mx_quantize_dequantize` applies it (NaN for non-finite groups)."""
    amax = grouped(x, MX_GROUP, "tensor").abs().amax(dim=-1)
    bad = ~torch.isfinite(amax)
    if rule == "duquantpp-loggrid":
        scale = mx_loggrid_scale(amax)
    elif rule == "mse":
        e = mx_mse_exponent(grouped(x, MX_GROUP, "tensor")).squeeze(-1)
        scale = torch.ldexp(torch.ones_like(amax), e)
    else:
        e = mx_shared_exponent(torch.where(bad, 1.0, amax), rule)
        scale = torch.ldexp(torch.ones_like(amax), e)
    return torch.where(bad, torch.nan, scale)


def mx_round_with_scale(
    x: Tensor, scale: Tensor, rule: str = "ocp", rounding: str = "even"
) -> Tensor:
    """Fake-quantize `x` elementwise with a given group `scale` (broadcast), as GPTQ does."""
    x, scale = x.float(), scale.float()
    if rule in MX_GLOBAL_FACTOR:
        y = x.double() * (1.0 / MX_GLOBAL_FACTOR[rule]) / scale.double()
        q = round_to_e2m1(y, rounding).float()
    else:
        q = round_to_e2m1(x / scale, rounding)
    return _mx_decode(q, scale, torch.isnan(scale), rule)


def _mx_encode(x: Tensor, rule: str, rounding: str) -> tuple[Tensor, Tensor, Tensor]:
    """Group `x` and return (E2M1 grid values, group scale multiplier, non-finite group mask)."""
    g = grouped(x, MX_GROUP, "tensor")
    amax = g.abs().amax(dim=-1, keepdim=True)
    bad = ~torch.isfinite(amax)
    if rule == "duquantpp-loggrid":
        scale = mx_loggrid_scale(amax)
        return round_to_e2m1(g / scale, rounding), scale, bad
    if rule == "mse":
        e = mx_mse_exponent(g, rounding)
    else:
        e = mx_shared_exponent(torch.where(bad, 1.0, amax), rule)
    pow2 = torch.ldexp(torch.ones_like(amax), e)
    if rule in MX_GLOBAL_FACTOR:  # x * 3 / 2^e in float64, where it is exact
        y = g.double() * (1.0 / MX_GLOBAL_FACTOR[rule]) / pow2.double()
        return round_to_e2m1(y, rounding).float(), pow2, bad
    return round_to_e2m1(g / pow2, rounding), pow2, bad


def _mx_decode(q: Tensor, scale: Tensor, bad: Tensor, rule: str) -> Tensor:
    """Grid values times their group scale (and the rule's global factor); NaN for non-finite groups."""
    if rule in MX_GLOBAL_FACTOR:
        out = (q.double() * scale.double() / (1.0 / MX_GLOBAL_FACTOR[rule])).float()
    else:
        out = q * scale
    return torch.where(bad, torch.nan, out)


def mx_quantize_dequantize(x: Tensor, rule: str = "ocp", rounding: str = "even") -> Tensor:
    """MXFP4 fake-quant of `x` along its last dim: same shape and dtype."""
    q, scale, bad = _mx_encode(x, rule, rounding)
    return _mx_decode(q, scale, bad, rule).reshape(x.shape).to(x.dtype)


def nv_tensor_scale(x: Tensor) -> Tensor:
    """The FP32 per-tensor scale amax / (6 * 448); 1 for an all-zero tensor."""
    amax = x.detach().abs().amax().float()
    return torch.where(amax == 0, torch.ones_like(amax), amax / (E2M1_MAX * E4M3_MAX))


def nv_encode(
    x: Tensor, rounding: str, tensor_scale: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Group `x`: (E2M1 grid values, E4M3 group scales as float32, per-tensor scale)."""
    g = grouped(x, NV_GROUP, "tensor")
    ts = nv_tensor_scale(x) if tensor_scale is None else torch.as_tensor(tensor_scale).float()
    amax = g.abs().amax(dim=-1, keepdim=True)
    s = (amax / E2M1_MAX / ts).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
    y = torch.where(s > 0, g / (s * ts), 0.0)
    return round_to_e2m1(y, rounding), s, ts


def nv_quantize_dequantize(
    x: Tensor, rounding: str = "even", tensor_scale: Tensor | None = None
) -> Tensor:
    """NVFP4 fake-quant of `x` along its last dim: same shape and dtype."""
    q, s, ts = nv_encode(x, rounding, tensor_scale)
    return (q * s * ts).reshape(x.shape).to(x.dtype)
