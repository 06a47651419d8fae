"""Number formats: pure quantize / dequantize / pack functions, one format a module."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from torch import Tensor

from duquant.formats import mxfp4, nvfp4
from duquant.formats.e2m1 import check_rounding, encode_e2m1, pack_nibbles

FORMATS = {"mxfp4": mxfp4, "nvfp4": nvfp4}
# the methods' default (measured, docs/results.md §3): ct-round beat ocp by 42% PPL under RTN and by
# 0.7 PPL under duquant++mx on SmolLM2, and it is what vLLM computes for activations; the codec
# functions keep `ocp` (the OCP spec's rule) as their default
DEFAULT_SCALE_RULE = {"mxfp4": "ct-round", "nvfp4": "e4m3"}


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor kind (weights or activations) is quantized: format, scale rule, element rounding."""

    format: str = "mxfp4"
    scale_rule: str = "ocp"
    rounding: str = "even"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose one of {tuple(FORMATS)}")
        rules = FORMATS[self.format].SCALE_RULES
        if self.scale_rule not in rules:
            raise ValueError(
                f"scale rule {self.scale_rule!r} does not apply to {self.format}; choose one of {rules}"
            )
        check_rounding(self.rounding)

    @property
    def group_size(self) -> int:
        """Number of consecutive values along the reduction dim that share one scale."""
        return FORMATS[self.format].GROUP_SIZE

    def fake_quant(self, x: Tensor, name: str = "tensor") -> Tensor:
        """Quantize-dequantize `x` along its last dim with this spec."""
        return FORMATS[self.format].quantize_dequantize(
            x, self.scale_rule, self.rounding, name=name
        )

    def fake_quant_clipped(self, x: Tensor, ratio: Tensor | float) -> Tensor:
        """Quantize-dequantize `x` with each group's scale chosen for `ratio` times its maximum.

        `ratio` (<= 1: learned clipping, FlatQuant) broadcasts against `x`'s rows (a number, or one
        per row as [rows, 1]); the scale rule sees ratio * amax and values beyond the grid's largest
        element saturate there. `ratio` 1 is `fake_quant` bit for bit (max(r|x|) = r max|x|).
        """
        ts = self.weight_tensor_scale(x)
        scales = _per_element(self.group_scales(x.float() * ratio, ts), self.group_size)
        return self.decode(self.encode(x.float(), scales, ts), scales, ts)

    # the format interface, one module a format (mxfp4, nvfp4): GPTQ, QuantLinear and the
    # exporters go through these instead of testing the format's name
    @property
    def codec(self) -> ModuleType:
        """The format's module."""
        return FORMATS[self.format]

    @property
    def per_tensor_scale(self) -> bool:
        """Whether a weight has a scale of its own besides the group scales (NVFP4)."""
        return self.codec.PER_TENSOR_SCALE

    def weight_tensor_scale(self, w: Tensor) -> Tensor | None:
        """The per-tensor scale of weight `w` (None for formats without one)."""
        return self.codec.weight_tensor_scale(w)

    def group_scales(self, x: Tensor, tensor_scale: Tensor | None = None) -> Tensor:
        """The stored scale of each group of `x` [..., K / group], float32."""
        return self.codec.grid_scales(x, self.scale_rule, tensor_scale)

    def encode(self, x: Tensor, scale: Tensor, tensor_scale: Tensor | None = None) -> Tensor:
        """E2M1 grid values of `x` on fixed group scales (`scale` broadcast against `x`)."""
        return self.codec.encode_with_scale(x, scale, self.scale_rule, self.rounding, tensor_scale)

    def decode(self, q: Tensor, scale: Tensor, tensor_scale: Tensor | None = None) -> Tensor:
        """Grid values `q` back to float32 on their scales, as `fake_quant` computes them."""
        return self.codec.decode_with_scale(q, scale, self.scale_rule, tensor_scale)

    def encode_decode(
        self, x: Tensor, scale: Tensor, tensor_scale: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(`encode`, `decode` of it) of float32 `x` on finite positive scales, in the fewest ops."""
        return self.codec.encode_decode_with_scale(
            x, scale, self.scale_rule, self.rounding, tensor_scale
        )

    def quantize_weight(
        self, w: Tensor, name: str = "weight", clip: Tensor | None = None
    ) -> QuantizedWeight:
        """Round-to-nearest a weight [out, in]: codes and scales, `fake_quant(w)` when decoded
        (`fake_quant_clipped(w, clip)` with a per-row clip ratio `clip` [out, 1])."""
        ts = self.weight_tensor_scale(w)
        scales = self.group_scales(w if clip is None else w.float() * clip, ts)
        q = self.encode(w, _per_element(scales, self.group_size), ts)
        return QuantizedWeight(self, pack_nibbles(encode_e2m1(q)), scales, ts)


def _per_element(scales: Tensor, group_size: int) -> Tensor:
    """Group scales [..., K / g] repeated to one per element [..., K]."""
    return scales.repeat_interleave(group_size, dim=-1)


@dataclass
class QuantizedWeight:
    """A weight as its format stores it: what the quantized linear computes with and export writes."""

    spec: QuantSpec
    packed: Tensor  # uint8 [out, in / 2], E2M1 codes, even column in the low nibble
    scales: Tensor  # float32 [out, in / group]: E8M0 power of two, E4M3 value or loggrid scale
    tensor_scale: Tensor | None  # NVFP4's FP32 per-tensor scale

    def grid(self) -> Tensor:
        """The E2M1 values [out, in] (float32, unscaled)."""
        from duquant.formats.e2m1 import decode_e2m1, unpack_nibbles

        return decode_e2m1(unpack_nibbles(self.packed))

    def dequantize(self) -> Tensor:
        """The float32 weight the codes and scales stand for (the model's weight, bit for bit)."""
        scales = _per_element(self.scales, self.spec.group_size)
        return self.spec.decode(self.grid(), scales, self.tensor_scale)

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output rows [start, stop) (a linear's share of a stacked GPTQ solve)."""
        if self.tensor_scale is not None and (start, stop) != (0, self.packed.shape[0]):
            raise ValueError("a weight with a per-tensor scale cannot be split by rows")
        return QuantizedWeight(
            self.spec, self.packed[start:stop], self.scales[start:stop], self.tensor_scale
        )

    def nbytes(self) -> int:
        """Bytes of the codes and scales as stored."""
        return (
            self.packed.numel() + self.scales.numel() + (4 if self.tensor_scale is not None else 0)
        )


def spec_for(fmt: str, scale_rule: str | None = None, rounding: str = "even") -> QuantSpec:
    """A QuantSpec with the format's default scale rule when none is given."""
    return QuantSpec(fmt, scale_rule or DEFAULT_SCALE_RULE.get(fmt, "ocp"), rounding)


__all__ = ["FORMATS", "QuantSpec", "QuantizedWeight", "mxfp4", "nvfp4", "spec_for"]
