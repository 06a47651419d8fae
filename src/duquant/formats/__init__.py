"""Number formats: pure quantize / dequantize / pack functions, one format a module."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from duquant.formats import mxfp4, nvfp4
from duquant.formats.e2m1 import check_rounding

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


def spec_for(fmt: str, scale_rule: str | None = None, rounding: str = "even") -> QuantSpec:
    """A QuantSpec with the format's default scale rule when none is given."""
    return QuantSpec(fmt, scale_rule or DEFAULT_SCALE_RULE.get(fmt, "ocp"), rounding)


__all__ = ["FORMATS", "QuantSpec", "mxfp4", "nvfp4", "spec_for"]
