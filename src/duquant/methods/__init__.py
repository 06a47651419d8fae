"""Methods: each a small declarative composition of input transforms and a weight quantizer."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MethodConfig:
    """What a method does to every linear input of a decoder block.

    `rotation` names the block rotation after smoothing: none, hadamard (Sylvester, deterministic),
    random-hadamard (random ±1 signs), greedy (DuQuant's outlier-aware search), duquant-v1
    (rotation, zigzag permutation, rotation). `global_rotation` is QuaRot's residual-stream Hadamard.
    """

    name: str
    quantize: bool = True
    smooth: bool = False
    alpha: float = 0.6
    rotation: str = "none"
    global_rotation: bool = False
    block_size: int = 32
    max_steps: int = 128
    per_block: bool = False  # one rotation per block instead of one shared matrix
    objective: str = "range"  # greedy search objective: range (paper) or mx (MX quantization error)
    swap_index: str = "column"  # column (paper) or row_mod_b (released code)
    refine_from: str = "identity"  # greedy start: identity (paper) or random-hadamard
    objective_rows: int = 128  # activation and weight rows the MX-error objective sees
    start_candidates: int = 1  # random-Hadamard starts scored by MX error; the best is refined
    fold: bool = True  # fold exactly-foldable steps into norms / producers (False: all online)
    search_rows: int = 512  # calibration activation rows (tokens) the rotation search sees
    # learned transforms trained block by block (duquant.learn): none, or flatquant
    learn: str = "none"
    learn_epochs: int = 15  # FlatQuant's default
    learn_lr: float = 5e-3  # FlatQuant's scripts (--flat_lr 5e-3); clip logits at 10x
    learn_batch: int = 4  # windows a step (FlatQuant's --cali_bsz)
    flat_alpha: float = 0.3  # FlatQuant's per-channel scale start: SmoothQuant-style, α = 0.3
    clip_init: float = 4.0  # FlatQuant's clip logit start: ratio sigmoid(4) = 0.982

    @property
    def needs_calibration(self) -> bool:
        """Whether the method reads calibration activations."""
        return self.smooth or self.rotation in ("greedy", "duquant-v1") or self.learn != "none"


_DQPP_MX = MethodConfig(
    "duquant++mx",
    smooth=True,
    rotation="greedy",
    objective="mx",
    refine_from="random-hadamard",
    start_candidates=16,
    max_steps=0,
)

_FLATQUANT = MethodConfig("flatquant", learn="flatquant")

METHODS: dict[str, MethodConfig] = {
    m.name: m
    for m in (
        MethodConfig("fp", quantize=False),
        MethodConfig("rtn"),
        MethodConfig("smoothquant", smooth=True, alpha=0.5),
        # block Hadamard B=32 (BRQ / MR-GPTQ style: deterministic Sylvester blocks)
        MethodConfig("hadamard", rotation="hadamard"),
        MethodConfig("random-hadamard", rotation="random-hadamard"),
        # DuQuant++ with the greedy rotation replaced by a randomized block Hadamard (the ablation)
        MethodConfig("smooth+hadamard", smooth=True, rotation="random-hadamard"),
        MethodConfig("quarot", global_rotation=True),
        MethodConfig("duquant", smooth=True, rotation="duquant-v1"),
        # the paper: smoothing then ONE B=32 greedy outlier-aware rotation shared by all blocks
        MethodConfig("duquant++", smooth=True, rotation="greedy"),
        # ours: smoothing + the best of 16 randomized block Hadamards, scored by the MX quantization
        # error of the calibration activations and the rotated weights (docs/results.md has the
        # measurement against smooth+hadamard); same online cost as duquant++ (one 32 x 32 block)
        _DQPP_MX,
        # variants measured on the way there (dqpp-best-had is duquant++mx under its trial name)
        replace(_DQPP_MX, name="dqpp-best-had"),
        replace(_DQPP_MX, name="dqpp-mx", start_candidates=1, max_steps=16),
        replace(_DQPP_MX, name="dqpp-best-had-mx", max_steps=16),
        # FlatQuant (Sun et al., 2024) as published, on the MX grid: learned Kronecker transforms,
        # channel scales and clipping, 15 epochs a block (duquant.learn.flatquant)
        _FLATQUANT,
        # the same with 2 epochs: the CPU-sized setting of the quick protocol
        replace(_FLATQUANT, name="flatquant-quick", learn_epochs=2),
    )
}


def get_method(name: str, **overrides) -> MethodConfig:
    """The registered method `name`, with fields overridden (None values are ignored)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return replace(METHODS[name], **{k: v for k, v in overrides.items() if v is not None})


__all__ = ["METHODS", "MethodConfig", "get_method"]
