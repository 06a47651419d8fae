"""NVFP4: groups of 16 along the last dim, an FP8 E4M3 scale per group, one FP32 scale per tensor.

The per-tensor scale maps the tensor's absolute maximum to 6 x 448 (E2M1 max x E4M3 max), so group scales
use E4M3's full range; it is computed from the tensor unless given (a static activation scale, say).
A group whose E4M3 scale underflows to zero quantizes to zeros. A non-finite input gives NaN everywhere
(the per-tensor scale is NaN): a non-finite tensor has no meaningful NVFP4 encoding.
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

GROUP_SIZE = 16
E4M3_MAX = 448.0
SCALE_RULES = ("e4m3",)


def tensor_scale_of(x: Tensor) -> Tensor:
    """The FP32 per-tensor scale amax / (6 * 448); 1 for an all-zero tensor."""
    amax = x.detach().abs().amax().float()
    # `amax == 0`, not `amax > 0`: a NaN amax must give a NaN scale (and so NaN everywhere), not 1
    return torch.where(amax == 0, torch.ones_like(amax), amax / (E2M1_MAX * E4M3_MAX))


def _encode(
    x: Tensor, rounding: str, tensor_scale: Tensor | None, name: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Group `x`: (E2M1 grid values, E4M3 group scales as float32, per-tensor scale)."""
    g = grouped(x, GROUP_SIZE, name)
    ts = tensor_scale_of(x) if tensor_scale is None else torch.as_tensor(tensor_scale).float()
    amax = g.abs().amax(dim=-1, keepdim=True)
    s = (amax / E2M1_MAX / ts).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
    y = torch.where(s > 0, g / (s * ts), 0.0)
    return round_to_e2m1(y, rounding), s, ts


def quantize_dequantize(
    x: Tensor,
    scale_rule: str = "e4m3",
    rounding: str = "even",
    *,
    tensor_scale: Tensor | None = None,
    name: str = "tensor",
) -> Tensor:
    """Fake-quantize `x` to NVFP4 along its last dim: same shape and dtype."""
    _check_rule(scale_rule)
    q, s, ts = _encode(x, rounding, tensor_scale, name)
    return (q * s * ts).reshape(x.shape).to(x.dtype)


def pack(
    x: Tensor,
    scale_rule: str = "e4m3",
    rounding: str = "even",
    *,
    tensor_scale: Tensor | None = None,
    name: str = "tensor",
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize `x` to NVFP4: (codes uint8 [..., K/2], E4M3 scale bytes uint8 [..., K/16], FP32 tensor scale)."""
    _check_rule(scale_rule)
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


def _check_rule(rule: str) -> None:
    """NVFP4 has one scale rule; reject the MXFP4 names with a clear message."""
    if rule not in SCALE_RULES:
        raise ValueError(f"NVFP4 scale rule must be one of {SCALE_RULES}, got {rule!r}")
