"""FP4 E2M1 element codec shared by MXFP4 and NVFP4: grid rounding, 4-bit codes, nibble packing."""

from __future__ import annotations

import torch
from torch import Tensor

E2M1_MAX = 6.0
# magnitude of each 3-bit code 0..7; bit 3 of a 4-bit code is the sign
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
ROUNDING_MODES = ("even", "away")


def check_rounding(rounding: str) -> None:
    """Raise a clear error for an unknown element rounding mode."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDING_MODES}")


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


def grouped(x: Tensor, group_size: int, name: str) -> Tensor:
    """View the last dim of `x` as (K / group_size, group_size) in float32, or explain why it cannot."""
    if x.ndim == 0 or x.shape[-1] % group_size:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}: its last (reduction) dimension must be divisible "
            f"by the group size {group_size}; duquant never pads silently"
        )
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
