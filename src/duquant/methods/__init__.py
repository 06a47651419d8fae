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
    # block-wise training of the transform on the quantized block-output error (duquant.learn):
    # none, rotation (ours: refine the smoothing and block rotation found above), flatquant
    # (FlatQuant's Kronecker transforms, channel scales and clipping: duquant.learn.flatquant)
    learn: str = "none"
    learn_epochs: int = 2
    learn_lr: float = 1e-3
    learn_batch: int = 4
    # what the quantized block is trained to reproduce: its full-precision self on the same
    # (quantized-stream) inputs, `block`, or the full-precision model's output of this block,
    # `model` (also corrects the error accumulated in earlier blocks)
    learn_target: str = "block"
    learn_normalized_loss: bool = False  # step on MSE / its detached value (FlatQuant)
    # norm tweaking after quantization (duquant.learn.norms): epochs of training the pre-norm
    # weights through the whole quantized model on the KL from full precision (0: off)
    norm_epochs: int = 0
    norm_lr: float = 1e-2
    flat_alpha: float = 0.3  # FlatQuant's per-channel scale start: SmoothQuant-style, α = 0.3
    clip_init: float = 4.0  # FlatQuant's clip logit start: ratio sigmoid(4) = 0.982
    # the weight quantizer and GPTQ options a method fixes (None: the command line's)
    weights: str | None = None  # rtn or gptq
    act_order: bool | None = None
    act_order_scope: str | None = None  # group or column (duquant.gptq.ACT_ORDER_SCOPES)
    static_groups: bool | None = None
    scale_search: str | None = None  # none, hessian or fpquant-mse (duquant.gptq.SCALE_SEARCHES)

    def gptq_overrides(self) -> dict:
        """The GPTQConfig fields this method fixes."""
        names = ("act_order", "act_order_scope", "static_groups", "scale_search")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def __post_init__(self) -> None:
        if self.norm_epochs < 0 or not self.norm_lr > 0:
            raise ValueError("norm_epochs must be >= 0 and norm_lr > 0")
        if self.learn_target not in ("block", "model"):
            raise ValueError(f"learn_target must be 'block' or 'model', got {self.learn_target!r}")

    @property
    def whole_model_step(self) -> str | None:
        """What this method does to the whole model at once (None: it works block by block), the
        reason a streamed quantization, which holds one block at a time, cannot run it."""
        if self.global_rotation:
            return "rotates the whole model at once (embeddings, every block, the head)"
        if self.learn == "e2e" or self.norm_epochs:
            return "trains through the whole model at once (end-to-end training or norm tweaking)"
        return None

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
        # ours, learned: duquant++mx's smoothing and rotation refined block by block on the
        # quantized block-output error (duquant.learn.rotation); same online cost and export
        replace(_DQPP_MX, name="duquant++learn", learn="rotation"),
        # ours, learned end to end: every block's smoothing and rotation trained at once on the
        # KL from the full-precision model through the quantized model (duquant.learn.e2e)
        replace(_DQPP_MX, name="duquant++e2e", learn="e2e", learn_batch=1, learn_lr=3e-3),
        # ours, norm-tweaked: duquant++mx, then (after GPTQ) the pre-norm weights, which hold the
        # folded smoothing and stay in full precision, trained on the KL from the full-precision
        # model through the quantized model (duquant.learn.norms); same online cost and export
        replace(_DQPP_MX, name="duquant++nt", norm_epochs=2),
        # MR-GPTQ (FP-Quant, Egiazarian et al. 2025): block-32 randomized Hadamard, then GPTQ with
        # static group scales from FP-Quant's MSE observer and single columns in descending
        # diag(H) order (FP-Quant's --quantization_order activation --w_observer mse)
        MethodConfig(
            "mr-gptq",
            rotation="random-hadamard",
            weights="gptq",
            act_order=True,
            act_order_scope="column",
            static_groups=True,
            scale_search="fpquant-mse",
        ),
        # FlatQuant (Sun et al., 2024) as published, on the MX grid: learned Kronecker transforms,
        # channel scales and clipping, trained block by block with FlatQuant's defaults (15 epochs,
        # lr 5e-3, 4 windows a step); the quick CPU setting is --learn-epochs 2
        MethodConfig(
            "flatquant",
            learn="flatquant",
            learn_epochs=15,
            learn_lr=5e-3,
            learn_batch=4,
            learn_normalized_loss=True,
        ),
        # variants measured on the way there (dqpp-best-had is duquant++mx under its trial name)
        replace(_DQPP_MX, name="dqpp-best-had"),
        replace(_DQPP_MX, name="dqpp-mx", start_candidates=1, max_steps=16),
        replace(_DQPP_MX, name="dqpp-best-had-mx", max_steps=16),
    )
}


# `--method best`: the most accurate registered method, with the weight quantizer it was measured
# with (docs/results.md §11 has the measurement); results record the resolved name
ALIASES: dict[str, tuple[str, dict]] = {"best": ("duquant++nt", {"weights": "gptq"})}


def method_names() -> list[str]:
    """Every name `--method` accepts: the registered methods and the aliases."""
    return sorted([*METHODS, *ALIASES])


def get_method(name: str, **overrides) -> MethodConfig:
    """The registered method `name` (an alias resolved), with fields overridden (None values are
    ignored)."""
    fixed: dict = {}
    if name in ALIASES:
        name, fixed = ALIASES[name]
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {method_names()}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(METHODS[name], **{**fixed, **given})


__all__ = ["ALIASES", "METHODS", "MethodConfig", "get_method", "method_names"]
