"""One-pass 32 x 32 block rotation + MXFP4 quantization as a Triton kernel.

Each program takes a tile of rows and one 32-wide group: it rotates the tile (`tl.dot` in IEEE
float32, no TF32), finds the group maximum from the float bits, derives the E8M0 exponent with the
same bit rules as `duquant.formats.mxfp4`, rounds to E2M1 with comparisons against the midpoints
(no arithmetic that a compiler could contract or reassociate) and writes either the dequantized
values (fake quantization) or packed codes and E8M0 scales (`mxfp4.pack`'s layout).

Runs on CUDA tensors through the Triton compiler and on CPU tensors through Triton's interpreter,
which is how the tests check it bit for bit against the CPU codec on a machine without a GPU.
The kernel's source, small @triton.jit helpers one per stage, is `_triton_mx_jit`, imported only when
the kernel first runs.
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


def interpreter_on() -> bool:
    """Whether Triton runs kernels in its CPU interpreter ($TRITON_INTERPRET=1 before it is imported)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


@functools.cache
def _kernel():
    """The jitted kernel: compiled for CUDA, or interpreted when $TRITON_INTERPRET=1."""
    # imported here, not at the top: importing this module needs no triton
    from duquant.kernels._triton_mx_jit import rotate_quant_mxfp4

    return rotate_quant_mxfp4


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
