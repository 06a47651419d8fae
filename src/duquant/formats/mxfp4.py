"""MXFP4 (OCP Microscaling v1.0): groups of 32 along the last dim, E8M0 shared scale, E2M1 elements.

Scale rules (all but `duquantpp-loggrid` give a power of two, which MXFP4 hardware takes as is):

| rule                | scale of a group with absolute maximum `amax`               | amax / scale |
|---------------------|-------------------------------------------------------------|--------------|
| `ocp`               | 2^(floor(log2 amax) - 2)                                    | [4, 8)       |
| `fpquant`           | 2^floor(log2 amax) / 3  (E8M0 times a global factor of 1/3) | [3, 6)       |
| `ceil`              | 2^ceil(log2(amax / 6))                                      | (3, 6]       |
| `ct-round`          | as `ocp` after rounding amax up to a power of two when its mantissa >= 1.75 | [3.5, 7) |
| `duquantpp-loggrid` | amax/6 floored onto 256 log-uniform levels between the tensor's extremes | ~6 |

Special values: an all-zero group gets the E8M0 scale 2^-127 and zeros. A group holding NaN or ±Inf
dequantizes to NaN in every element and packs with the E8M0 NaN code 0xFF, as the OCP spec encodes a
NaN scale: non-finite values are never silently clipped into range.
"""

from __future__ import annotations

import torch
from torch import Tensor

from duquant.formats.e2m1 import (
    E2M1_MAX,
    decode_e2m1,
    encode_e2m1,
    grouped,
    pack_nibbles,
    round_to_e2m1,
    unpack_nibbles,
)

GROUP_SIZE = 32
E8M0_BIAS = 127
E8M0_NAN = 255
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
SCALE_RULES = ("ocp", "fpquant", "ceil", "ct-round", "duquantpp-loggrid")
POWER_OF_TWO_RULES = ("ocp", "fpquant", "ceil", "ct-round")
# a rule whose E8M0 exponent is multiplied by a constant, folded into the GEMM epilogue on hardware
GLOBAL_FACTOR = {"fpquant": 1.0 / 3.0}
_LOGGRID_LEVELS = 255
_LOGGRID_FLOOR = 2.0**-126


def check_scale_rule(rule: str) -> None:
    """Raise a clear error for an unknown scale rule."""
    if rule not in SCALE_RULES:
        raise ValueError(f"unknown MXFP4 scale rule {rule!r}; choose one of {SCALE_RULES}")


def global_factor(rule: str) -> float:
    """The constant each E8M0 scale of `rule` is multiplied by (1/3 for `fpquant`, else 1)."""
    check_scale_rule(rule)
    return GLOBAL_FACTOR.get(rule, 1.0)


def _floor_log2(amax: Tensor) -> tuple[Tensor, Tensor]:
    """Exact floor(log2 amax) and the mantissa amax / 2^floor(log2 amax) in [1, 2), from the float bits."""
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2^exponent, mantissa in [0.5, 1)
    return exponent.to(torch.int32) - 1, mantissa * 2.0


def shared_exponent(amax: Tensor, rule: str) -> Tensor:
    """E8M0 exponent (int32, clamped to [-127, 127]) of each group for a power-of-two `rule`."""
    if rule not in POWER_OF_TWO_RULES:
        raise ValueError(
            f"scale rule {rule!r} is not a power of two and has no E8M0 exponent; "
            f"use one of {POWER_OF_TWO_RULES} to pack MXFP4"
        )
    e, m = _floor_log2(amax)
    if rule == "ocp":
        e = e - 2
    elif rule == "ceil":  # smallest e with 6 * 2^e >= amax
        e = e - 2 + (m > 1.5).to(torch.int32)
    elif rule == "ct-round":
        e = e - 2 + (m >= 1.75).to(torch.int32)
    # fpquant keeps floor(log2 amax): the stored scale is 3x the one used, see GLOBAL_FACTOR
    e = torch.where(amax > 0, e, torch.full_like(e, E8M0_MIN_EXP))
    return e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def _loggrid_scale(amax: Tensor) -> Tensor:
    """The released DuQuant++ code's scale: amax/6 floored onto a 256-level log grid over the tensor."""
    s = (amax / E2M1_MAX).clamp(min=_LOGGRID_FLOOR)
    finite = torch.isfinite(s)
    logs = torch.log2(s)
    lo = logs[finite].min() if finite.any() else logs.new_tensor(0.0)
    hi = logs[finite].max() if finite.any() else logs.new_tensor(0.0)
    span = hi - lo
    if span <= 0:  # every group has the same scale: the grid collapses to that one level
        return s
    # (logs - lo) / span first: it is exactly 1 for the largest group, which so keeps the top level
    code = torch.floor(_LOGGRID_LEVELS * ((logs - lo) / span)).clamp(0, _LOGGRID_LEVELS)
    return torch.exp2(lo + code * span / _LOGGRID_LEVELS)


def group_scales(x: Tensor, rule: str = "ocp", *, name: str = "tensor") -> Tensor:
    """Each group's scale [..., K/32] as `quantize_dequantize` applies it: the E8M0 power of two
    (the rule's global factor excluded, as `pack` stores it) or the loggrid scale; NaN for a group
    holding NaN or ±Inf. For `duquantpp-loggrid` the log grid spans the groups of `x` passed in.
    """
    check_scale_rule(rule)
    amax = grouped(x, GROUP_SIZE, name).abs().amax(dim=-1)
    bad = ~torch.isfinite(amax)
    if rule == "duquantpp-loggrid":
        scale = _loggrid_scale(amax)
    else:
        e = shared_exponent(torch.where(bad, 1.0, amax), rule)
        scale = torch.ldexp(torch.ones_like(amax), e)
    return torch.where(bad, torch.nan, scale)


def round_with_scale(x: Tensor, scale: Tensor, rule: str = "ocp", rounding: str = "even") -> Tensor:
    """Fake-quantize `x` elementwise with a given group `scale` (from `group_scales`, broadcast).

    The arithmetic of `_encode` / `_decode`, so `round_with_scale(g, group_scales(g))` is
    `quantize_dequantize(g)` bit for bit; GPTQ rounds a column with a scale fixed earlier.
    """
    check_scale_rule(rule)
    x, scale = x.float(), scale.float()
    if rule in GLOBAL_FACTOR:  # keep in step with _encode: x * 3 / 2^e is exact in float64
        y = x.double() * (1.0 / GLOBAL_FACTOR[rule]) / scale.double()
        q = round_to_e2m1(y, rounding).float()
    else:
        q = round_to_e2m1(x / scale, rounding)
    return _decode(q, scale, torch.isnan(scale), rule)


def _encode(x: Tensor, rule: str, rounding: str, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Group `x` and return (E2M1 grid values, group scale multiplier, non-finite group mask)."""
    check_scale_rule(rule)
    g = grouped(x, GROUP_SIZE, name)
    amax = g.abs().amax(dim=-1, keepdim=True)
    bad = ~torch.isfinite(amax)
    if rule == "duquantpp-loggrid":
        scale = _loggrid_scale(amax)
        return round_to_e2m1(g / scale, rounding), scale, bad
    e = shared_exponent(torch.where(bad, 1.0, amax), rule)
    pow2 = torch.ldexp(torch.ones_like(amax), e)
    if rule in GLOBAL_FACTOR:  # fpquant divides by 2^e / 3; the factor comes back in _decode
        # in float64, where x * 3 / 2^e is exact: float32 would round values next to a tie onto it
        # (then to the wrong side) and overflow for |x| near the float32 maximum
        y = g.double() * (1.0 / GLOBAL_FACTOR[rule]) / pow2.double()
        return round_to_e2m1(y, rounding).float(), pow2, bad
    return round_to_e2m1(g / pow2, rounding), pow2, bad  # dividing by 2^e is exact


def _decode(q: Tensor, scale: Tensor, bad: Tensor, rule: str) -> Tensor:
    """Grid values times their group scale (and the rule's global factor); NaN for non-finite groups."""
    if rule in GLOBAL_FACTOR:  # q * 2^e / 3 rounded once to float32, without overflow of q * 2^e
        out = (q.double() * scale.double() / (1.0 / GLOBAL_FACTOR[rule])).float()
    else:
        out = q * scale
    return torch.where(bad, torch.nan, out)


def quantize_dequantize(
    x: Tensor, scale_rule: str = "ocp", rounding: str = "even", *, name: str = "tensor"
) -> Tensor:
    """Fake-quantize `x` to MXFP4 along its last dim: same shape and dtype, values on the MXFP4 grid."""
    q, scale, bad = _encode(x, scale_rule, rounding, name)
    return _decode(q, scale, bad, scale_rule).reshape(x.shape).to(x.dtype)


def pack(
    x: Tensor, scale_rule: str = "ocp", rounding: str = "even", *, name: str = "tensor"
) -> tuple[Tensor, Tensor]:
    """Quantize `x` to MXFP4: (codes uint8 [..., K/2], two per byte, even element low; E8M0 scales uint8 [..., K/32])."""
    if scale_rule not in POWER_OF_TWO_RULES:
        check_scale_rule(scale_rule)
        raise ValueError(
            f"scale rule {scale_rule!r} is not a power of two and cannot be stored as E8M0; "
            f"pack with one of {POWER_OF_TWO_RULES} (its fake-quant stays available)"
        )
    q, pow2, bad = _encode(x, scale_rule, rounding, name)
    codes = encode_e2m1(torch.where(bad, 0.0, q)).reshape(x.shape)
    exps = _floor_log2(pow2)[0] + E8M0_BIAS
    scales = torch.where(bad, E8M0_NAN, exps).to(torch.uint8).squeeze(-1)
    return pack_nibbles(codes), scales


def unpack(
    codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32, *, scale_rule: str = "ocp"
) -> Tensor:
    """Dequantize packed MXFP4 (`pack`'s output) to `dtype`; `scale_rule` supplies the global factor."""
    check_scale_rule(scale_rule)
    q = decode_e2m1(unpack_nibbles(codes))
    q = q.reshape(*q.shape[:-1], q.shape[-1] // GROUP_SIZE, GROUP_SIZE)
    e = scales.to(torch.int32).unsqueeze(-1) - E8M0_BIAS
    bad = scales.unsqueeze(-1) == E8M0_NAN
    pow2 = torch.ldexp(torch.ones(e.shape, device=e.device), e)
    out = _decode(q, pow2, bad, scale_rule)
    return out.flatten(-2).to(dtype)
