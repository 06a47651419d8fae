"""Typed run configuration, serialised into every result so a result says how it was made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from duquant.formats import DEFAULT_SCALE_RULE


@dataclass
class RunConfig:
    """Everything needed to reproduce one quantize-and-evaluate run."""

    model: str | None = None
    method: str = "rtn"
    format: str = "mxfp4"
    w_scale_rule: str | None = None  # None: the format's (and method's) default
    a_scale_rule: str | None = None
    rounding: str = "even"
    weights: str = "rtn"  # weight quantizer: rtn or gptq
    act_order: bool = False
    # GPTQ Hessians: quantized (per group, as the layer sees its inputs) or fp (the statistics pass)
    gptq_hessian: str = "quantized"
    alpha: float | None = None
    block_size: int | None = None
    max_steps: int | None = None
    evals: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    max_windows: int | None = None
    nsamples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"

    def resolved_rules(self) -> tuple[str, str]:
        """(weight, activation) scale rules after applying the format default."""
        default = DEFAULT_SCALE_RULE[self.format]
        return self.w_scale_rule or default, self.a_scale_rule or default

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)
