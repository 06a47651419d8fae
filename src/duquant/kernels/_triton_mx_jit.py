"""The Triton source of the fused 32 x 32 block rotation + MXFP4 kernel (`triton_mx`).

Importing this module imports triton: `triton_mx` loads it only when the kernel is first run, after
$TRITON_INTERPRET is settled. The kernel is made of small @triton.jit helpers, one per stage of a
group's quantization, which Triton inlines (the compiled kernel is the one a single function gives).
Tensor arguments carry no annotations: Triton reads them (only `tl.constexpr` is meant for it).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rotated(x_ptr, r_ptr, offs, mask, g, cols, R_STRIDE: tl.constexpr, ROTATE: tl.constexpr):
    """A tile of one 32-wide group, times its 32 x 32 rotation when ROTATE."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if ROTATE:
        r = tl.load(r_ptr + g * R_STRIDE + cols[:, None] * 32 + cols[None, :])
        y = tl.dot(x, r, input_precision="ieee")
    else:
        y = x
    return y


@triton.jit
def _group_exponent(amax, OFFSET: tl.constexpr, THRESH: tl.constexpr, INCLUSIVE: tl.constexpr):
    """Each row's E8M0 exponent from the integer bits of its group maximum."""
    # the bit rules of mxfp4._exponent_from_bits (KERNEL_RULES gives OFFSET, THRESH, INCLUSIVE)
    e = (amax >> 23) - OFFSET
    if THRESH > 0:
        mant = amax & 0x7FFFFF
        if INCLUSIVE:
            e += (mant >= THRESH).to(tl.int32)
        else:
            e += (mant > THRESH).to(tl.int32)
    e = tl.minimum(tl.maximum(e, -127), 127)
    return e


@triton.jit
def _e2m1_index(a, AWAY: tl.constexpr):
    """The E2M1 magnitude index 0..7 of scaled magnitudes, by comparisons alone."""
    # E2M1 code index 0..7 by the midpoints of the grid {0, .5, 1, 1.5, 2, 3, 4, 6}; at a tie
    # `even` keeps the even code, `away` the larger magnitude; beyond 5 saturates to 6
    if AWAY:
        idx = (
            (a >= 0.25).to(tl.int32)
            + (a >= 0.75).to(tl.int32)
            + (a >= 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32)
            + (a >= 2.5).to(tl.int32)
            + (a >= 3.5).to(tl.int32)
            + (a >= 5.0).to(tl.int32)
        )
    else:
        idx = (
            (a > 0.25).to(tl.int32)
            + (a >= 0.75).to(tl.int32)
            + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32)
            + (a > 2.5).to(tl.int32)
            + (a >= 3.5).to(tl.int32)
            + (a > 5.0).to(tl.int32)
        )
    return idx


@triton.jit
def _store_packed(
    codes_ptr, scales_ptr, rows, g, M, K, idx, neg, bad, e, mask, BLOCK_M: tl.constexpr
):
    """Write a tile's codes, two per byte, and its E8M0 scale bytes (`mxfp4.pack`)."""
    code = idx + neg.to(tl.int32) * 8
    code = tl.where(bad[:, None], 0, code)
    lo, hi = tl.split(tl.reshape(code, (BLOCK_M, 16, 2)))
    byte = (lo | (hi << 4)).to(tl.uint8)
    half = tl.arange(0, 16)
    tl.store(codes_ptr + rows[:, None] * (K // 2) + g * 16 + half[None, :], byte, mask=mask)
    scale = tl.where(bad, 255, e + 127).to(tl.uint8)
    tl.store(scales_ptr + rows * (K // 32) + g, scale, mask=rows < M)


@triton.jit
def _store_dequantized(out_ptr, offs, idx, neg, bad, e, mask):
    """Write a tile's dequantized values, NaN in non-finite groups (fake quantization)."""
    mag = tl.where(
        idx < 4,
        idx.to(tl.float32) * 0.5,
        tl.where(idx == 4, 2.0, tl.where(idx == 5, 3.0, tl.where(idx == 6, 4.0, 6.0))),
    )
    # the sign as a bit, so that a negative input that rounds to zero gives -0.0 like the
    # torch codec (some Triton versions' interpreters fold -0.0 into 0.0)
    sign = neg.to(tl.uint32) << 31
    q = (mag.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    # 2^e, with 2^-127 the one subnormal (as mxfp4._pow2)
    pow2 = tl.where(e > -127, (e + 127) << 23, 0x00400000).to(tl.float32, bitcast=True)
    out = q * pow2[:, None]
    out = tl.where(bad[:, None], float("nan"), out)
    tl.store(out_ptr + offs, out, mask=mask)


@triton.jit
def rotate_quant_mxfp4(
    x_ptr,
    r_ptr,
    out_ptr,
    codes_ptr,
    scales_ptr,
    M,
    K,
    R_STRIDE: tl.constexpr,
    ROTATE: tl.constexpr,
    PACK: tl.constexpr,
    OFFSET: tl.constexpr,
    THRESH: tl.constexpr,
    INCLUSIVE: tl.constexpr,
    AWAY: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One tile of BLOCK_M rows by one 32-wide group: rotate, quantize, store."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, 32)
    mask = (rows < M)[:, None]
    offs = rows[:, None] * K + g * 32 + cols[None, :]
    y = _load_rotated(x_ptr, r_ptr, offs, mask, g, cols, R_STRIDE, ROTATE)
    bits = y.to(tl.int32, bitcast=True)
    ab = bits & 0x7FFFFFFF
    # integer max of |bits|: the float order for non-negative floats, NaN-proof
    amax = tl.max(ab, axis=1)
    bad = amax >= 0x7F800000
    e = _group_exponent(amax, OFFSET, THRESH, INCLUSIVE)
    # 2^-e exactly (e <= 126 for any finite maximum, so 2^-e is a normal float)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    # |y| / 2^e, exact (a power-of-two scaling); non-finite groups read as 0 (their output is NaN)
    a = tl.where(bad[:, None], 0, ab).to(tl.float32, bitcast=True) * inv[:, None]
    idx = _e2m1_index(a, AWAY)
    neg = bits < 0
    if PACK:
        _store_packed(codes_ptr, scales_ptr, rows, g, M, K, idx, neg, bad, e, mask, BLOCK_M)
    else:
        _store_dequantized(out_ptr, offs, idx, neg, bad, e, mask)
