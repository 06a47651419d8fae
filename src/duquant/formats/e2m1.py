"""FP4 E2M1 element codec shared by MXFP4 and NVFP4: grid rounding, 4-bit codes, nibble packing."""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

E2M1_MAX = 6.0
# magnitude of each 3-bit code 0..7; bit 3 of a 4-bit code is the sign
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
ROUNDING_MODES = ("even", "away")


def check_rounding(rounding: str) -> None:
    """Raise a clear error for an unknown element rounding mode."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDING_MODES}")


# The fast rounding adds and subtracts a "magic" constant C = 1.5 * 2^(mantissa bits - 1) * step:
# y + C lands in C's binade, whose float spacing is exactly the E2M1 step of y, so the addition itself
# rounds y to the grid (ties to even: C / step is even) and subtracting C is exact. C comes from y's
# exponent bits, floored at the binade [1, 2) where E2M1's spacing stops shrinking. Per dtype: the
# integer view, the exponent mask, the bits of 1.0 and 4.0 (floor and ceiling of the exponent once
# |y| <= 6) and the bits to add to turn 2^k into C.
_MAGIC = {
    torch.float32: (torch.int32, 0x7F800000, 0x3F800000, 0x40800000, (22 << 23) | (1 << 22)),
    torch.float64: (
        torch.int64,
        0x7FF0000000000000,
        0x3FF0000000000000,
        0x4010000000000000,
        (51 << 52) | (1 << 51),
    ),
}


def _magic(y: Tensor) -> Tensor:
    """The per-element constant C whose float spacing near C is the E2M1 step of y (|y| <= 6)."""
    itype, emask, lo, hi, add = _MAGIC[y.dtype]
    bits = torch.bitwise_and(y.view(itype), emask)
    return bits.clamp_(lo, hi).add_(add).view(y.dtype)  # the ceiling keeps NaN's C finite


def round_e2m1_(
    y: Tensor, rounding: str, sign: Tensor | None = None, saturate: bool = True
) -> Tensor:
    """In place on `y` (float32/float64, owned by the caller): E2M1 rounding as `round_to_e2m1`.

    The magic-constant rounding returns +0 where a small negative should give -0, so the signs are
    restored at the end: from `sign` (broadcastable to `y`, e.g. the unscaled input) when given,
    else from C itself, given y's sign before the rounding. `saturate=False` skips the clamp when
    the caller knows |y| <= 6 (or masks the group later).
    """
    if rounding == "even":
        if saturate:
            y.clamp_(-E2M1_MAX, E2M1_MAX)
        c = _magic(y)
        if sign is None:  # (y + ±C) - ±C rounds symmetrically and ±C remembers the sign
            sign = c.copysign_(y)
        y.add_(c).sub_(c)
    else:  # away: of the ties-to-even and ties-to-odd roundings, ties differ and the larger wins
        if sign is None:
            sign = y.clone()
        y.abs_()
        if saturate:
            y.clamp_(max=E2M1_MAX)
        c = _magic(y)
        even = (y + c).sub_(c)
        c.view(_MAGIC[y.dtype][0]).add_(1)  # C + step: the same spacing, odd multiple of the step
        y.add_(c).sub_(c)
        # where, not maximum: maximum's vector path turns a NaN into the all-ones NaN pattern
        torch.where(even > y, even, y, out=y)
    return y.copysign_(sign)


def round_to_e2m1(y: Tensor, rounding: str = "even") -> Tensor:
    """Round scaled values to the nearest E2M1 value (ties per `rounding`), saturating at ±6; NaN stays NaN.

    Bit for bit `duquant.formats.reference.round_to_e2m1` (grid spacing 0.5 below 2, 1 in [2, 4), 2 in
    [4, 6]; ties to the even code or away from zero). float32/float64 round in their own precision
    and dtype; other floating dtypes give float32, as the reference's float32 step promotes them to.
    """
    check_rounding(rounding)
    if y.dtype not in _MAGIC:  # |y| clamped in y's dtype, as the reference (it makes NaN canonical)
        a = y.abs().clamp(max=E2M1_MAX).float()
        return round_e2m1_(a, rounding, sign=y, saturate=False)
    return round_e2m1_(y.clamp(-E2M1_MAX, E2M1_MAX), rounding, sign=y, saturate=False)


# Constants C of `_MAGIC` for |y| < 2, [2, 4) and [4, 6], picked with where() in fused kernels, where
# a comparison is cheaper than an integer temporary and nothing is materialised anyway.
_FUSED_C = {
    torch.float32: (1.5 * 2.0**22, 1.5 * 2.0**23, 1.5 * 2.0**24),
    torch.float64: (1.5 * 2.0**51, 1.5 * 2.0**52, 1.5 * 2.0**53),
}


def fused_round(y: Tensor, rounding: str, saturate: bool = True) -> Tensor:
    """E2M1 rounding of float32/float64 `y` out of place, for `torch.compile`: `round_to_e2m1`'s values.

    NaN payloads may differ from the eager path: fused callers mask every group holding a NaN.
    """
    c1, c2, c3 = _FUSED_C[y.dtype]
    a = y.abs()
    if saturate:
        a = a.clamp(max=E2M1_MAX)
    lt2, lt4 = a < 2.0, a < 4.0
    c = torch.where(lt2, c1, torch.where(lt4, c2, c3))
    r = (a + c) - c
    if rounding == "away":  # ties to odd with C + step; at a tie the larger one is away from zero
        c_odd = c + torch.where(lt2, 0.5, torch.where(lt4, 1.0, 2.0))
        r = torch.maximum(r, (a + c_odd) - c_odd)
    return torch.copysign(r, y)


# ---- optional torch.compile of whole quantize-dequantize kernels ---------------------------
# Eager torch spends one pass over memory per op; inductor fuses the group reduction and the
# rounding into one loop (several times faster on CPU, measured in docs/benchmarks.md). It costs
# seconds of compilation per (kernel, last dim, dtype) and needs a C++ compiler, so it is opt-in.
COMPILE_ENV = "DUQUANT_COMPILE_CODEC"
COMPILE_MIN_NUMEL = 1 << 16  # below this the eager ops are cheap and the guards are not
_compiled: dict[tuple, Callable] = {}
_compile_off: set[tuple] = set()
_compile_checked: set[tuple] = set()


def compile_requested() -> bool:
    """Whether $DUQUANT_COMPILE_CODEC asks for the compiled codec (1 / true / on)."""
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bit-for-bit equality (signed zeros and NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    it = ints[a.element_size()]
    return torch.equal(a.contiguous().view(it), b.contiguous().view(it))


def _own_code(fn: Callable) -> Callable:
    """`fn` with a code object of its own: dynamo caches graphs per code object and stops at a few
    recompiles, which closures of one `def` for several formats, rules and dtypes would exhaust."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{len(_compiled)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def run_compiled(
    key: tuple,
    kernel: Callable[..., tuple[Tensor, Tensor]],
    x: Tensor,
    eager: Callable[[], Tensor],
    *args: Tensor,
) -> Tensor:
    """`kernel(x2, *args)` compiled, x2 being `x` viewed as (rows, K); `eager()` when off or failing.

    `key` must determine `kernel` (it is compiled once per key, dtype and K); tensors that vary
    between calls go in `args`. The kernel returns (output, fallback): a true 0-d `fallback` sends
    the call to `eager` (a corner the kernel does not cover). The first call of each key is checked
    bit for bit against `eager`; a mismatch or any compile / run error turns the key off for the
    process, with a warning.
    """
    if not compile_requested() or x.numel() < COMPILE_MIN_NUMEL or x.device.type != "cpu":
        return eager()
    key = (*key, x.dtype, x.shape[-1])
    if key in _compile_off:
        return eager()
    x2 = x.reshape(-1, x.shape[-1])
    try:
        fn = _compiled.get(key)
        if fn is None:
            fn = _compiled[key] = torch.compile(_own_code(kernel), fullgraph=True)
        # rows vary with the batch and sequence length: one graph for all, K stays static
        torch._dynamo.maybe_mark_dynamic(x2, 0)
        out, fallback = fn(x2, *args)
    except Exception as exc:  # no compiler, an unsupported op, ...: the eager codec is always right
        log.warning("compiled codec %s unavailable, using the eager one: %s", key, exc)
        _compile_off.add(key)
        return eager()
    if bool(fallback):
        return eager()
    out = out.reshape(x.shape)
    if key not in _compile_checked:
        ref = eager()
        if not same_bits(out, ref):
            log.warning("compiled codec %s differs from the eager one; using the eager one", key)
            _compile_off.add(key)
            return ref
        _compile_checked.add(key)
    return out


def encode_e2m1(q: Tensor) -> Tensor:
    """Map values already on the E2M1 grid to 4-bit codes (uint8 0..15, bit 3 = sign)."""
    a = q.abs()
    mag = torch.where(a < 2.0, a * 2.0, torch.where(a < 4.0, a + 2.0, a * 0.5 + 4.0))
    sign = torch.signbit(q).to(torch.uint8) << 3
    return mag.to(torch.uint8) | sign


def decode_e2m1(codes: Tensor) -> Tensor:
    """Map 4-bit codes (uint8 0..15) to float32 E2M1 values."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=codes.device)
    return table[codes.long()]


def pack_nibbles(codes: Tensor) -> Tensor:
    """Pack 4-bit codes pairwise along the last dim into bytes: even element in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(
            f"cannot pack an odd number of codes along the last dim: {tuple(codes.shape)}"
        )
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of `pack_nibbles`: bytes to 4-bit codes, twice as many along the last dim."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def group_amax(g: Tensor) -> Tensor:
    """max |g| over the last dim (keepdim), as `g.abs().amax(-1)` without a full-size |g| temporary."""
    # two reductions over the input beat materialising |g| (a pass and an allocation); abs_ on the
    # small result clears the sign bit a NaN may carry, as |g| would have
    return torch.maximum(g.amax(dim=-1, keepdim=True), g.amin(dim=-1, keepdim=True).neg_()).abs_()


def grouped(x: Tensor, group_size: int, name: str) -> Tensor:
    """View the last dim of `x` as (K / group_size, group_size) in float32, or explain why it cannot."""
    if x.ndim == 0 or x.shape[-1] % group_size:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}: its last (reduction) dimension must be divisible "
            f"by the group size {group_size}; duquant never pads silently"
        )
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
