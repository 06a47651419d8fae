"""One-pass 32 x 32 block rotation + MXFP4 quantization as a Triton kernel.

Each program takes a tile of rows and one 32-wide group: it rotates the tile (`tl.dot` in IEEE
float32, no TF32), finds the group maximum from the float bits, derives the E8M0 exponent with the
same bit rules as `duquant.formats.mxfp4`, rounds to E2M1 with comparisons against the midpoints
(no arithmetic that a compiler could contract or reassociate) and writes either the dequantized
values (fake quantization) or packed codes and E8M0 scales (`mxfp4.pack`'s layout).

Runs on CUDA tensors through the Triton compiler and on CPU tensors through Triton's interpreter,
which is how the tests check it bit for bit against the CPU codec on a machine without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from duquant.formats import mxfp4

GROUP = mxfp4.GROUP_SIZE
# (exponent field offset, mantissa threshold, threshold inclusive) per rule, as mxfp4._RULE_BITS;
# fpquant (x 1/3) and the non-amax rules stay on the torch codec
KERNEL_RULES = {rule: mxfp4._RULE_BITS[rule] for rule in ("ocp", "ceil", "ct-round")}
ROUNDINGS = ("even", "away")


def triton_available() -> bool:
    """Whether the `triton` package can be imported (CPU tensors then run in its interpreter)."""
    return importlib.util.find_spec("triton") is not None


def supports(rule: str, rounding: str) -> bool:
    """Whether the kernel implements this scale rule and rounding."""
    return rule in KERNEL_RULES and rounding in ROUNDINGS


def supports_spec(spec) -> bool:
    """Whether the kernel implements a QuantSpec: MXFP4 (the kernel's format) with its rule and rounding."""
    return spec.codec is mxfp4 and supports(spec.scale_rule, spec.rounding)


def _kernel_source():
    """The kernel body; defined in a function so that importing this module needs no triton."""
    import triton.language as tl

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
        pid_m = tl.program_id(0)
        g = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, 32)
        mask = (rows < M)[:, None]
        offs = rows[:, None] * K + g * 32 + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if ROTATE:
            r = tl.load(r_ptr + g * R_STRIDE + cols[:, None] * 32 + cols[None, :])
            y = tl.dot(x, r, input_precision="ieee")
        else:
            y = x
        bits = y.to(tl.int32, bitcast=True)
        ab = bits & 0x7FFFFFFF
        # integer max of |bits|: the float order for non-negative floats, NaN-proof
        amax = tl.max(ab, axis=1)
        bad = amax >= 0x7F800000
        e = (amax >> 23) - OFFSET
        if THRESH > 0:
            mant = amax & 0x7FFFFF
            if INCLUSIVE:
                e += (mant >= THRESH).to(tl.int32)
            else:
                e += (mant > THRESH).to(tl.int32)
        e = tl.minimum(tl.maximum(e, -127), 127)
        # 2^-e exactly (e <= 126 for any finite maximum, so 2^-e is a normal float)
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
        # |y| / 2^e, exact (a power-of-two scaling); non-finite groups read as 0 (their output is NaN)
        a = tl.where(bad[:, None], 0, ab).to(tl.float32, bitcast=True) * inv[:, None]
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
        neg = bits < 0
        if PACK:
            code = idx + neg.to(tl.int32) * 8
            code = tl.where(bad[:, None], 0, code)
            lo, hi = tl.split(tl.reshape(code, (BLOCK_M, 16, 2)))
            byte = (lo | (hi << 4)).to(tl.uint8)
            half = tl.arange(0, 16)
            tl.store(codes_ptr + rows[:, None] * (K // 2) + g * 16 + half[None, :], byte, mask=mask)
            scale = tl.where(bad, 255, e + 127).to(tl.uint8)
            tl.store(scales_ptr + rows * (K // 32) + g, scale, mask=rows < M)
        else:
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

    return rotate_quant_mxfp4


def interpreter_on() -> bool:
    """Whether Triton runs kernels in its CPU interpreter ($TRITON_INTERPRET=1 before it is imported)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


@functools.cache
def _kernel():
    """The jitted kernel: compiled for CUDA, or interpreted when $TRITON_INTERPRET=1."""
    import triton

    return triton.jit(_kernel_source())


def rotate_quantize_mxfp4(
    x: Tensor,
    rotation: Tensor | None = None,
    rule: str = "ct-round",
    rounding: str = "even",
    *,
    pack: bool = False,
    block_m: int = 64,
) -> Tensor | tuple[Tensor, Tensor]:
    """MXFP4 of `x @ blockdiag(R)` along the last dim in one kernel pass.

    `rotation` is one (32, 32) matrix shared by every group, (K/32, 32, 32) one per group, or None.
    Returns the dequantized float32 tensor (the shape of `x`), or with `pack=True` the codes
    (uint8 [..., K/2]) and E8M0 scales (uint8 [..., K/32]) exactly as `mxfp4.pack` lays them out.
    """
    if not triton_available():
        raise RuntimeError("the fused kernel needs `pip install triton` (CPU runs its interpreter)")
    if not supports(rule, rounding):
        raise ValueError(
            f"the fused kernel implements rules {tuple(KERNEL_RULES)} with rounding {ROUNDINGS}; "
            f"got {rule!r} / {rounding!r} (use duquant.formats.mxfp4 for the others)"
        )
    k = x.shape[-1]
    if k % GROUP:
        raise ValueError(f"last dim {k} is not divisible by the MXFP4 group {GROUP}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if x.device.type != "cuda" and not interpreter_on():
        raise RuntimeError(
            "the fused kernel runs on CUDA tensors, or on CPU tensors in Triton's interpreter: "
            "set TRITON_INTERPRET=1 before triton is first imported"
        )
    x2 = x.reshape(-1, k).float().contiguous()
    m = x2.shape[0]
    r_stride = 0
    r = x2.new_zeros(1)
    if rotation is not None:
        r = rotation.to(device=x2.device, dtype=torch.float32).contiguous()
        if r.shape == (GROUP, GROUP):
            r_stride = 0
        elif r.shape == (k // GROUP, GROUP, GROUP) or (r.ndim == 3 and r.shape[0] == 1):
            r_stride = 0 if r.shape[0] == 1 else GROUP * GROUP
        else:
            raise ValueError(
                f"rotation of shape {tuple(r.shape)}: expected (32, 32) or ({k // GROUP}, 32, 32)"
            )
    out = x2.new_empty(0) if pack else torch.empty_like(x2)
    codes = torch.empty(m if pack else 0, k // 2, dtype=torch.uint8, device=x2.device)
    scales = torch.empty(m if pack else 0, k // GROUP, dtype=torch.uint8, device=x2.device)
    offset, thresh, inclusive = KERNEL_RULES[rule]
    grid = ((m + block_m - 1) // block_m, k // GROUP)
    _kernel()[grid](
        x2,
        r,
        out,
        codes,
        scales,
        m,
        k,
        R_STRIDE=r_stride,
        ROTATE=rotation is not None,
        PACK=pack,
        OFFSET=offset,
        THRESH=thresh or 0,
        INCLUSIVE=inclusive,
        AWAY=rounding == "away",
        BLOCK_M=block_m,
    )
    if pack:
        return codes.reshape(*x.shape[:-1], k // 2), scales.reshape(*x.shape[:-1], k // GROUP)
    return out.reshape(x.shape)
