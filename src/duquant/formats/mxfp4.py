"""MXFP4 (OCP Microscaling v1.0): groups of 32 along the last dim, E8M0 shared scale, E2M1 elements.

Scale rules (all but `duquantpp-loggrid` give a power of two, which MXFP4 hardware takes as is):

| rule                | scale of a group with absolute maximum `amax`               | amax / scale |
|---------------------|-------------------------------------------------------------|--------------|
| `ocp`               | 2^(floor(log2 amax) - 2)                                    | [4, 8)       |
| `fpquant`           | 2^floor(log2 amax) / 3  (E8M0 times a global factor of 1/3) | [3, 6)       |
| `ceil`              | 2^ceil(log2(amax / 6))                                      | (3, 6]       |
| `ct-round`          | as `ocp` after rounding amax up to a power of two when its mantissa >= 1.75 | [3.5, 7) |
| `mse`               | whichever of the `ocp` scale and twice it gives the group the smaller squared error | [2, 8) |
| `duquantpp-loggrid` | amax/6 floored onto 256 log-uniform levels between the tensor's extremes | ~6 |

`ceil` and `ct-round` choose between the same two powers of two as `mse` from the mantissa of amax
alone; `mse` looks at the whole group (both roundings, twice the codec work), so no other E8M0 rule
with amax / scale in [3, 8) gives a group a smaller error.

Special values: an all-zero group gets the E8M0 scale 2^-127 and zeros. A group holding NaN or ±Inf
dequantizes to NaN in every element and packs with the E8M0 NaN code 0xFF, as the OCP spec encodes a
NaN scale: non-finite values are never silently clipped into range.
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

GROUP_SIZE = 32
E8M0_BIAS = 127
E8M0_NAN = 255
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
SCALE_RULES = ("ocp", "fpquant", "ceil", "ct-round", "mse", "duquantpp-loggrid")
# rules whose exponent is a function of the group maximum alone (`shared_exponent`)
AMAX_RULES = ("ocp", "fpquant", "ceil", "ct-round")
POWER_OF_TWO_RULES = (*AMAX_RULES, "mse")
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
    """E8M0 exponent (int32, clamped to [-127, 127]) of each group from its maximum, for an amax rule."""
    if rule not in AMAX_RULES:
        raise ValueError(
            f"scale rule {rule!r} is not a function of the group maximum alone; "
            f"use one of {AMAX_RULES} here (`group_scales` covers every rule)"
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


# exponent field offset and mantissa threshold (bits below the hidden one) of each power-of-two rule:
# e = floor(log2 amax) - 2 (+1 when the mantissa exceeds the threshold), read off the float32 bits
_RULE_BITS = {
    "ocp": (129, None, False),
    "fpquant": (127, None, False),
    "ceil": (129, 0x400000, False),  # mantissa > 1.5
    "ct-round": (129, 0x600000, True),  # mantissa >= 1.75
}


def _exponent_from_bits(amax: Tensor, rule: str) -> tuple[Tensor, Tensor]:
    """(E8M0 exponent as `shared_exponent` gives it, non-finite mask) of float32 group maxima >= 0.

    Subnormal maxima read as exponent -127 and zero as well: every rule's exponent is then at most
    -127 and clamps there, as `shared_exponent` clamps frexp's exact value. A non-finite group's
    exponent is arbitrary (its output is NaN).
    """
    bits = amax.view(torch.int32)
    bad = bits >= 0x7F800000
    offset, threshold, inclusive = _RULE_BITS[rule]
    e = (bits >> 23) - offset
    if threshold is not None:
        mant = bits & 0x7FFFFF
        e += (mant >= threshold if inclusive else mant > threshold).to(torch.int32)
    return e.clamp_(E8M0_MIN_EXP, E8M0_MAX_EXP), bad


def _pow2(e: Tensor) -> Tensor:
    """2^e (float32) for int32 e in [-127, 127], bit for bit `torch.ldexp(1, e)`, from the bits."""
    # ldexp goes through a vectorised pow, several times slower; 2^-127 is the one subnormal
    return torch.where(e > E8M0_MIN_EXP, (e + 127) << 23, 0x00400000).view(torch.float32)


def _mse_encode(g: Tensor, amax: Tensor, rounding: str) -> tuple[Tensor, Tensor, Tensor]:
    """`mse` rule on groups `g` [..., 32]: (grid values, E8M0 exponent, non-finite mask), each group
    rounded with the `ocp` exponent e and with e + 1 and kept at whichever gives the smaller error.

    Errors are compared in units of 2^e in float64, where every difference and square is exact;
    a tie keeps e (the finer step). e + 1 is not taken where its largest value, 4 * 2^(e + 1),
    would overflow float32 (e > 124).
    """
    e, bad = _exponent_from_bits(amax, "ocp")
    y = g * _pow2(-e)  # exact: a power-of-two scaling
    q0 = round_e2m1_(y.clone(), rounding, sign=g)
    q1 = round_e2m1_(y * 0.5, rounding, sign=g)  # |y| / 2 < 4: never saturates
    yd = y.double()
    err0 = (q0.double() - yd).square_().sum(-1, keepdim=True)
    err1 = (q1.double() * 2.0 - yd).square_().sum(-1, keepdim=True)
    up = (err1 < err0) & (e <= E8M0_MAX_EXP - 3)
    return torch.where(up, q1, q0), e + up.to(torch.int32), bad


def group_scales(x: Tensor, rule: str = "ocp", *, name: str = "tensor") -> Tensor:
    """Each group's scale [..., K/32] as `quantize_dequantize` applies it: the E8M0 power of two
    (the rule's global factor excluded, as `pack` stores it) or the loggrid scale; NaN for a group
    holding NaN or ±Inf. For `duquantpp-loggrid` the log grid spans the groups of `x` passed in.
    """
    check_scale_rule(rule)
    amax = group_amax(grouped(x, GROUP_SIZE, name)).squeeze(-1)
    if rule == "duquantpp-loggrid":
        bad = ~torch.isfinite(amax)
        scale = _loggrid_scale(amax)
    elif rule == "mse":
        g = grouped(x, GROUP_SIZE, name).float()
        # either rounding gives the same choice: a tie is equally far from both neighbours
        _, e, bad = _mse_encode(g, amax.unsqueeze(-1), "even")
        scale, bad = _pow2(e).squeeze(-1), bad.squeeze(-1)
    else:
        e, bad = _exponent_from_bits(amax, rule)
        scale = _pow2(e)
    return torch.where(bad, torch.nan, scale)


def round_with_scale(x: Tensor, scale: Tensor, rule: str = "ocp", rounding: str = "even") -> Tensor:
    """Fake-quantize `x` elementwise with a given group `scale` (from `group_scales`, broadcast).

    The arithmetic of `_encode` / `_decode`, so `round_with_scale(g, group_scales(g))` is
    `quantize_dequantize(g)` bit for bit; GPTQ rounds a column with a scale fixed earlier.
    """
    scale = scale.float()
    return _decode(encode_with_scale(x, scale, rule, rounding), scale, torch.isnan(scale), rule)


# ---- the format interface GPTQ, QuantLinear and the exporter use (same names in nvfp4) -------
# (how a checkpoint format lays the codes and scales out is the exporter's: duquant.export.ct)
PER_TENSOR_SCALE = False  # MX scales are per row and group: linears sharing an input stack freely


def weight_tensor_scale(w: Tensor) -> None:
    """MXFP4 has no per-tensor scale."""
    return None


def grid_scales(x: Tensor, rule: str, tensor_scale: Tensor | None = None) -> Tensor:
    """Per-group stored scale [..., K/32] of `x` (`group_scales`; `tensor_scale` is unused)."""
    return group_scales(x, rule)


def encode_with_scale(
    x: Tensor, scale: Tensor, rule: str, rounding: str, tensor_scale: Tensor | None = None
) -> Tensor:
    """E2M1 grid values (float32/float64, unscaled) of `x` on the given `scale` (broadcast)."""
    check_scale_rule(rule)
    check_rounding(rounding)
    x, scale = x.float(), scale.float()
    if rule in GLOBAL_FACTOR:  # keep in step with _encode: x * 3 / 2^e is exact in float64
        return round_to_e2m1(x.double() * (1.0 / GLOBAL_FACTOR[rule]) / scale.double(), rounding)
    return round_to_e2m1(x / scale, rounding)


def encode_decode_with_scale(
    x: Tensor, scale: Tensor, rule: str, rounding: str, tensor_scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(grid values, decoded float32) of float32 `x` on finite positive `scale`: `encode_with_scale`
    then `decode_with_scale` bit for bit, without their checks, copies and NaN mask (GPTQ's column loop)."""
    if rule in GLOBAL_FACTOR:
        q = encode_with_scale(x, scale, rule, rounding)
        return q, decode_with_scale(q, scale, rule)
    q = x / scale
    round_e2m1_(q, rounding, sign=x)  # a positive scale keeps x's sign, so x can stand for q's
    return q, q * scale


def decode_with_scale(
    q: Tensor, scale: Tensor, rule: str, tensor_scale: Tensor | None = None
) -> Tensor:
    """Grid values `q` times their group `scale` (broadcast), float32, as `quantize_dequantize`."""
    scale = scale.float()
    return _decode(q.clone(), scale, torch.isnan(scale), rule)


def e8m0_bytes(scales: Tensor) -> Tensor:
    """E8M0 bytes (uint8, 127 + exponent) of power-of-two scales; ValueError for any other scale."""
    mant, exp = torch.frexp(scales.float())  # scale = 2^e exactly: mantissa 0.5, exponent e + 1
    if not bool((mant == 0.5).all()):
        raise ValueError("MXFP4 weight scales must be powers of two to export")
    return (exp - 1 + E8M0_BIAS).to(torch.uint8)


def _encode(
    x: Tensor, rule: str, rounding: str, name: str, inplace: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Group `x`: (E2M1 grid values, group scale multiplier, non-finite group mask [..., K/32, 1]).

    The grid values are a tensor the caller may overwrite (float64 for `fpquant`, else float32):
    `x`'s own storage when `inplace` and x is float32 and contiguous, else a fresh one. Scaling by a
    power of two is exact, so g * 2^-e is g / 2^e; every rounding is `round_to_e2m1`'s, done in place
    with the signs of g (scales are positive).
    """
    check_scale_rule(rule)
    check_rounding(rounding)
    g = grouped(x, GROUP_SIZE, name)
    own = inplace and g.data_ptr() == x.data_ptr() and x.is_contiguous()
    amax = group_amax(g)
    if rule == "duquantpp-loggrid":
        bad = ~torch.isfinite(amax)
        scale = _loggrid_scale(amax)  # not a power of two: divide, as the reference does
        y = g.div_(scale) if own else g / scale
        return round_e2m1_(y, rounding, sign=None if own else g), scale, bad
    if rule == "mse":
        q, e, bad = _mse_encode(g.float(), amax, rounding)
        return q, _pow2(e), bad
    e, bad = _exponent_from_bits(amax, rule)
    pow2 = _pow2(e)
    if rule in GLOBAL_FACTOR:  # fpquant divides by 2^e / 3; the factor comes back in _decode
        # in float64, where x * 3 / 2^e is exact: float32 would round values next to a tie onto it
        # (then to the wrong side) and overflow for |x| near the float32 maximum. amax * 3 / 2^e
        # lies in [3, 6) (or below 6 when e clamps at -127), so no element needs saturating
        factor = _pow2(-e).double().mul_(1.0 / GLOBAL_FACTOR[rule])  # 3 * 2^-e: exact
        y = g.double().mul_(factor)
        return round_e2m1_(y, rounding, sign=g, saturate=False), pow2, bad
    # ceil puts amax / 2^e in (3, 6]: nothing to saturate; ocp and ct-round reach 8 and 7
    y = g.mul_(_pow2(-e)) if own else g * _pow2(-e)
    saturate = rule != "ceil"
    return round_e2m1_(y, rounding, sign=None if own else g, saturate=saturate), pow2, bad


def _decode(q: Tensor, scale: Tensor, bad: Tensor, rule: str) -> Tensor:
    """Grid values times their group scale (and the rule's global factor); NaN for non-finite groups.

    Overwrites `q` (float32 / float64 from `_encode` or `round_to_e2m1`).
    """
    if rule in GLOBAL_FACTOR:  # q * 2^e / 3 rounded once to float32, without overflow of q * 2^e
        out = q.double().mul_(scale.double()).div_(1.0 / GLOBAL_FACTOR[rule]).float()
    else:
        out = q.mul_(scale)
    if bad.any():  # rare: skip the full-size masked write in the common all-finite case
        out.masked_fill_(bad, torch.nan)
    return out


def _fused_kernel(rule: str, rounding: str) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """The whole power-of-two-rule fake-quant of a (rows, K) tensor as one function, for torch.compile.

    The arithmetic of `_encode` / `_decode` written out of place (inductor fuses it into one loop);
    NaN groups are masked by where(), so the rounding's NaN payloads never show.
    """

    def kernel(x2: Tensor) -> tuple[Tensor, Tensor]:
        g = x2.float().reshape(x2.shape[0], -1, GROUP_SIZE)
        amax = g.abs().amax(dim=-1, keepdim=True)
        # a NaN max may come out with the sign bit set (vector max): mask it before comparing
        bits = amax.view(torch.int32) & 0x7FFFFFFF
        e, bad = _exponent_from_bits(bits.view(torch.float32), rule)
        pow2 = _pow2(e)
        if rule in GLOBAL_FACTOR:
            y = g.double() * (_pow2(-e).double() * (1.0 / GLOBAL_FACTOR[rule]))
            q = fused_round(y, rounding, saturate=False)
            out = (q * pow2.double() / (1.0 / GLOBAL_FACTOR[rule])).float()
        else:
            out = fused_round(g * _pow2(-e), rounding, saturate=rule != "ceil") * pow2
        out = torch.where(bad, torch.nan, out).reshape(x2.shape).to(x2.dtype)
        return out, torch.zeros((), dtype=torch.bool)

    return kernel


def quantize_dequantize(
    x: Tensor,
    scale_rule: str = "ocp",
    rounding: str = "even",
    *,
    name: str = "tensor",
    inplace: bool = False,
) -> Tensor:
    """Fake-quantize `x` to MXFP4 along its last dim: same shape and dtype, values on the MXFP4 grid.

    `inplace=True` lets the codec overwrite a float32 `x` the caller owns and return it (saving a
    full-size allocation); use the returned tensor either way.
    """

    def eager() -> Tensor:
        q, scale, bad = _encode(x, scale_rule, rounding, name, inplace)
        return _decode(q, scale, bad, scale_rule).reshape(x.shape).to(x.dtype)

    # loggrid's tensor-wide grid and mse stay eager; eager raises the clear errors
    if scale_rule not in AMAX_RULES or rounding not in ("even", "away"):
        return eager()
    if x.ndim == 0 or x.shape[-1] % GROUP_SIZE or not x.is_floating_point():
        return eager()
    kernel = _fused_kernel(scale_rule, rounding)
    return run_compiled(("mxfp4", scale_rule, rounding), kernel, x, eager)


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
    codes = encode_e2m1(torch.where(bad, 0.0, q.float())).reshape(x.shape)
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
