"""The experiment configuration: one typed description of a run, from which the command lines of
`run`, `demo` and `compare` are generated, of which compare's jobs are made, and which every result
records; and the one vocabulary of every option with a fixed set of values (the StrEnums below).

This module is the ground floor: it imports nothing of duquant but the number formats. Each field
carries its command-line help in its metadata; `add_arguments` turns a config class into argparse
options and `from_namespace` back into a config. Construction (`__post_init__`) checks what a value
alone decides (ranges, choices, paths to write); whatever needs the method registry, the model or the
exporters is checked by the orchestration layer (`duquant.api.check`) before any model is loaded.
Both raise `ConfigError` with one line naming the option and the fix.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from duquant.formats import DEFAULT_SCALE_RULE, FORMATS


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message names the option."""


class Format(StrEnum):
    """Number formats."""

    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"


ScaleRule = StrEnum(
    "ScaleRule",
    {r.replace("-", "_").upper(): r for f in FORMATS.values() for r in f.SCALE_RULES},
)
ScaleRule.__doc__ = "Shared-scale rules of every format (which apply depends on the format)."


class Rounding(StrEnum):
    """Element rounding on the E2M1 grid."""

    EVEN = "even"
    AWAY = "away"


class WeightQuantizer(StrEnum):
    """How weights are rounded onto the format's grid."""

    RTN = "rtn"
    GPTQ = "gptq"


class ScaleSearch(StrEnum):
    """How GPTQ chooses each MXFP4 group's E8M0 scale (duquant.gptq.SCALE_SEARCHES)."""

    NONE = "none"  # the scale rule's
    HESSIAN = "hessian"  # the rule's or its E8M0 neighbour, by the group's GPTQ loss
    FPQUANT_MSE = "fpquant-mse"  # FP-Quant's MSE observer (static scales)


class ActOrderScope(StrEnum):
    """How GPTQ's act order permutes columns (duquant.gptq)."""

    GROUP = "group"  # MX groups kept whole, ordered by their diag(H)
    COLUMN = "column"  # single columns in descending diag(H) order (MR-GPTQ; needs static groups)


class HessianSource(StrEnum):
    """Where GPTQ's Hessians come from."""

    QUANTIZED = "quantized"  # per group, as the layer sees its transformed, quantized inputs
    FP = "fp"  # the statistics pass's full-precision inputs (one calibration pass per block)


class GPTQTarget(StrEnum):
    """Whose outputs GPTQ matches (see duquant.pipeline.GPTQConfig.target)."""

    QUANTIZED = "quantized"  # classic: the layer's own (quantized) inputs through the FP weight
    UNQUANTIZED = "unquantized"  # the same inputs before activation quantization
    MODEL = "model"  # the unquantized model's inputs at that position (GPTAQ)


class ZeroShotSource(StrEnum):
    """Where zero-shot task data come from."""

    AUTO = "auto"
    HUB = "hub"
    LOCAL = "local"


class DType(StrEnum):
    """Model dtypes."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


# the settings a run may override in its recipe: the one list (duquant.stages' OVERRIDES map them)
METHOD_OVERRIDES = (
    "alpha",
    "block_size",
    "max_steps",
    "learn_epochs",
    "learn_lr",
    "learn_batch",
    "norm_epochs",
    "norm_lr",
    "norm_batch",
)


def opt(default: Any, help: str, **cli: Any) -> Any:
    """A config field with its command-line help; `cli` holds argparse extras (flag, nargs, csv,
    choices) and the range an integer must keep (`minimum`), checked by `check_ranges`."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


def flag_of(name: str) -> str:
    """The command-line flag of a field."""
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- checks


def _enum(cls: type[StrEnum], name: str, value: Any) -> StrEnum:
    """`value` as a member of `cls`, or a ConfigError naming the option and the choices."""
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ConfigError(f"{flag_of(name)} {value}: choose one of {choices}") from None


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """An integer option at or above `minimum` (None allowed when optional)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{flag_of(name)} {value}: must be {what}")


def check_ranges(cfg: Any) -> None:
    """Every integer field with a `minimum` in its metadata is an integer at or above it (None is
    allowed where None is the field's default)."""
    for f in fields(cfg):
        if "minimum" in f.metadata:
            _check_int(f.name, getattr(cfg, f.name), f.metadata["minimum"], f.default is None)


def check_output_file(path: str | Path, option: str) -> None:
    """A file path that can be written: not a directory, in a writable directory (probed)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(
            f"{option} {path}: is a directory; give a file path such as {p / 'result.json'}"
        )
    parent = _existing_ancestor(p.parent)
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is not a directory; choose another path")
    _probe_writable(parent, option, path)


def check_output_dir(path: str | Path, option: str) -> None:
    """A directory path that can be written: not an existing file, in a writable place (probed)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {path}: is a file, not a directory; choose a directory path")
    parent = _existing_ancestor(p)
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is not a directory; choose another path")
    _probe_writable(parent, option, path)


def _existing_ancestor(p: Path) -> Path:
    """The nearest existing path among `p` and its parents."""
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(directory: Path, option: str, path: str | Path) -> None:
    """Create and delete a file in `directory` (os.access is wrong for root and read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".duquant-probe-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(
            f"{option} {path}: cannot write in {directory} ({exc.strerror or exc}); "
            "choose a writable place"
        ) from None


def check_device(device: str) -> None:
    """A torch device string this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device}: not a device; use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device}: duquant runs on cpu or cuda")


# ----------------------------------------------------------------------------- configs


@dataclass
class QuantSettings:
    """The settings shared by a run and by every job of a compare: model, format, method knobs,
    calibration, evaluation windows, seed and machine."""

    model: str | None = opt(None, "HF id, local HF dir or .gguf file (default: SmolLM2-135M)")
    format: Format = opt(Format.MXFP4, "number format of weights and activations")
    w_scale_rule: ScaleRule | None = opt(None, "weight scale rule (default: the format's)")
    a_scale_rule: ScaleRule | None = opt(None, "activation scale rule (default: the format's)")
    rounding: Rounding = opt(Rounding.EVEN, "element rounding: ties to even or away from zero")
    act_order: bool = opt(False, "GPTQ act-order (MX groups kept whole)")
    gptq_scale_search: ScaleSearch | None = opt(
        None,
        "GPTQ E8M0 scale choice: the rule's (none), the rule's or its neighbour by the group's "
        "GPTQ loss (hessian), FP-Quant's MSE observer (fpquant-mse, static scales) (default: the "
        "method's, else none)",
    )
    gptq_hessian: HessianSource = opt(
        HessianSource.QUANTIZED,
        "GPTQ Hessians from the transformed, quantized inputs each group sees (one partial block "
        "pass per group), or from the statistics pass's FP inputs (faster)",
    )
    gptq_target: GPTQTarget = opt(
        GPTQTarget.QUANTIZED,
        "what GPTQ matches: the layer's output on its own quantized inputs (quantized), on those "
        "inputs before activation quantization (unquantized), or the unquantized model's (model)",
    )
    gptq_target_damp: float = opt(
        1.0,
        "ridge of the asymmetric GPTQ target's weight correction, relative to mean diag(H), > 0",
    )
    alpha: float | None = opt(None, "smoothing strength α in [0, 1] (default: the method's)")
    block_size: int | None = opt(
        None, "rotation block size B, a power of two (default: 32)", minimum=1
    )
    max_steps: int | None = opt(
        None, "greedy rotation steps, >= 0 (default: the method's)", minimum=0
    )
    learn_epochs: int | None = opt(
        None, "training epochs of a learned method's transforms (default: the method's)", minimum=0
    )
    learn_lr: float | None = opt(
        None, "learning rate of a learned method's transforms, > 0 (default: the method's)"
    )
    learn_batch: int | None = opt(
        None,
        "calibration windows per training step of a learned method (default: the method's)",
        minimum=1,
    )
    norm_epochs: int | None = opt(
        None,
        "epochs of norm tweaking after quantization (the pre-norm weights trained on the KL from "
        "full precision through the quantized model; 0: off) (default: the method's)",
        minimum=0,
    )
    norm_lr: float | None = opt(None, "learning rate of norm tweaking, > 0 (default: the method's)")
    norm_batch: int | None = opt(
        None,
        "calibration windows per norm-tweaking step; one window is cut into token shares (one a "
        "rank under torchrun), a multiple of the rank count is shared by windows (default: the method's)",
        minimum=1,
    )
    seqlen: int = opt(2048, "evaluation window in tokens", minimum=2)
    max_windows: int | None = opt(None, "evaluate only the first N windows", minimum=1)
    nsamples: int = opt(128, "calibration windows", minimum=1)
    calib_seqlen: int = opt(2048, "calibration window length in tokens", minimum=2)
    seed: int = opt(0, "seed of calibration sampling and random transforms", minimum=0)
    dtype: DType = opt(DType.FLOAT32, "model dtype")
    device: str = opt("cpu", "cpu or cuda[:N]")
    dist_timeout: int = opt(
        1800,
        "under torchrun: seconds a rank waits for the others (the rendezvous, every exchange) "
        "before the run ends with an error",
        minimum=1,
    )
    c4_windows: int = opt(256, "C4 windows drawn (protocol: 256)", minimum=1)
    limit: int | None = opt(None, "zero-shot / LAMBADA examples per task", minimum=1)
    tasks: list[str] | None = opt(None, "zero-shot tasks (default: all seven)", csv=True)
    batch_size: int = opt(8, "zero-shot batch size", minimum=1)
    zeroshot_source: ZeroShotSource = opt(ZeroShotSource.AUTO, "zero-shot data source")

    def __post_init__(self) -> None:
        self.format = _enum(Format, "format", self.format)
        self.rounding = _enum(Rounding, "rounding", self.rounding)
        self.gptq_hessian = _enum(HessianSource, "gptq_hessian", self.gptq_hessian)
        self.gptq_target = _enum(GPTQTarget, "gptq_target", self.gptq_target)
        if (
            self.gptq_target != GPTQTarget.QUANTIZED
            and self.gptq_hessian != HessianSource.QUANTIZED
        ):
            raise ConfigError(
                f"--gptq-target {self.gptq_target} needs --gptq-hessian quantized (it weighs "
                "errors by the inputs each layer really sees)"
            )
        if self.gptq_scale_search is not None:
            self.gptq_scale_search = _enum(ScaleSearch, "gptq_scale_search", self.gptq_scale_search)
        self.dtype = _enum(DType, "dtype", self.dtype)
        rules = FORMATS[self.format].SCALE_RULES
        for name in ("w_scale_rule", "a_scale_rule"):
            value = getattr(self, name)
            if value is None:
                continue
            if value not in rules:
                raise ConfigError(
                    f"{flag_of(name)} {value}: not a {self.format} scale rule; choose one of "
                    f"{', '.join(rules)}"
                )
            setattr(self, name, ScaleRule(value))
        if self.alpha is not None and not (
            isinstance(self.alpha, (int, float))
            and math.isfinite(self.alpha)
            and 0 <= self.alpha <= 1
        ):
            raise ConfigError(f"--alpha {self.alpha}: must be a number in [0, 1]")
        if not (
            isinstance(self.gptq_target_damp, (int, float))
            and math.isfinite(self.gptq_target_damp)
            and self.gptq_target_damp > 0
        ):
            raise ConfigError(
                f"--gptq-target-damp {self.gptq_target_damp}: must be a positive number"
            )
        for name in ("learn_lr", "norm_lr"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            ):
                raise ConfigError(f"{flag_of(name)} {value}: must be a positive number")
        self.zeroshot_source = _enum(ZeroShotSource, "zeroshot_source", self.zeroshot_source)
        check_ranges(self)
        check_device(self.device)

    def method_overrides(self) -> dict:
        """The recipe options these settings override (None: keep the recipe's own value); each
        goes to the stage that owns it (duquant.stages, `OVERRIDES`)."""
        return {name: getattr(self, name) for name in METHOD_OVERRIDES}

    def resolved_rules(self) -> tuple[str, str]:
        """(weight, activation) scale rules after applying the format default."""
        default = DEFAULT_SCALE_RULE[self.format]
        return str(self.w_scale_rule or default), str(self.a_scale_rule or default)

    def to_dict(self) -> dict:
        """Plain-JSON form (enums as their values)."""
        return {k: _plain(v) for k, v in asdict(self).items()}


def _plain(value: Any) -> Any:
    """Enum members as their string values, recursively through lists."""
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass
class RunConfig(QuantSettings):
    """One quantize-and-evaluate run (`duquant run`, the library's `runner.run`)."""

    method: str = opt("rtn", "quantization method (a registered recipe)")
    recipe: str | None = opt(
        None, "a YAML recipe file (its stages and their options) instead of --method"
    )
    weights: WeightQuantizer | None = opt(
        None,
        "weight quantizer: round to nearest, or GPTQ on the same grid (default: the method's, "
        "else rtn)",
    )
    evals: list[str] = opt(
        ["wikitext2"],
        "evaluations: wikitext2, c4, lambada, zeroshot and/or paths of UTF-8 text files",
        flag="--eval",
        nargs="+",
    )
    output: str | None = opt(None, "write the result JSON here")
    save: str | None = opt(None, "export the quantized model to this folder (compressed-tensors)")
    overwrite: bool = opt(False, "let --save replace a non-empty folder")
    stream: bool = opt(
        False,
        "quantize and evaluate one block at a time, reading a safetensors checkpoint folder lazily "
        "(models larger than memory)",
    )
    work_dir: str | None = opt(
        None, "with --stream: folder for the quantized blocks (default: a temporary one, removed)"
    )
    max_activation_mb: int | None = opt(
        None, "with --stream: refuse calibration activations above this many MiB", minimum=1
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weights is not None:
            self.weights = _enum(WeightQuantizer, "weights", self.weights)
        if not self.evals:
            raise ConfigError(
                "--eval: name at least one evaluation ('wikitext2', ... or a text file)"
            )
        if self.output is not None:
            check_output_file(self.output, "--output")
        if not self.stream and (self.work_dir is not None or self.max_activation_mb is not None):
            raise ConfigError("--work-dir and --max-activation-mb apply to --stream runs only")

    def check_stream(self) -> None:
        """A streamed run reads a local safetensors folder (its export, if any: `export.check`);
        called by the orchestration layer after the model source is checked."""
        if self.model is None:
            raise ConfigError(
                "--stream: give --model, a checkpoint folder with safetensors weights (the default "
                "model is a GGUF: convert it first with scripts/gguf_to_hf.py)"
            )
        folder = Path(self.model)
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            raise ConfigError(
                f"--stream: --model {self.model} is not a checkpoint folder with safetensors "
                "weights; convert a GGUF first (scripts/gguf_to_hf.py)"
            )
        if self.work_dir is not None:
            check_output_dir(self.work_dir, "--work-dir")


# ----------------------------------------------------------------------------- command line


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    defaults: dict | None = None,
    skip: tuple = (),
    choices: dict[str, list[str]] | None = None,
) -> None:
    """Add one option per field of config class `cls` (less `skip`), with the field's help;
    `choices` lists the values of fields whose vocabulary lives above this module (methods)."""
    defaults = defaults or {}
    choices_of = choices or {}
    for f in fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        meta = f.metadata
        default = defaults.get(
            f.name, f.default if f.default is not MISSING else f.default_factory()
        )
        kwargs: dict[str, Any] = {"dest": f.name, "default": _plain(default), "help": meta["help"]}
        enum = _enum_type(f)
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif meta.get("csv"):
            kwargs["type"] = csv_list
        else:
            kwargs["type"] = meta.get("type") or _scalar_type(f, default)
            if meta.get("nargs"):
                kwargs["nargs"] = meta["nargs"]
            choices = meta.get("choices") or choices_of.get(f.name)
            if enum is not None:
                choices = [m.value for m in enum]
            if choices is not None:
                kwargs["choices"] = choices
        parser.add_argument(meta.get("flag", flag_of(f.name)), **kwargs)


def _enum_type(f) -> type[StrEnum] | None:
    """The StrEnum a field's annotation names, if any."""
    base = str(f.type).split("|")[0].strip()
    return {
        e.__name__: e
        for e in (
            Format,
            ScaleRule,
            Rounding,
            HessianSource,
            GPTQTarget,
            DType,
            WeightQuantizer,
            ScaleSearch,
            ZeroShotSource,
        )
    }.get(base)


def _scalar_type(f, default: Any) -> Any:
    """The argparse type of a scalar field, from its annotation."""
    ann = str(f.type)
    if ann.startswith("int"):
        return int
    if ann.startswith("float"):
        return float
    return str


def csv_list(value: str) -> list[str]:
    """A comma-separated option as a list."""
    return [v.strip() for v in value.split(",") if v.strip()]


def from_namespace(cls: type, args: argparse.Namespace, **extra: Any):
    """A validated config of class `cls` from parsed arguments (only the fields `cls` has)."""
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    return cls(**values)


@dataclass
class AnalyzeConfig:
    """`duquant analyze`: per-layer MXFP4 error of original vs transformed activations."""

    model: str | None = opt(None, "HF id, local HF dir or .gguf file (default: SmolLM2-135M)")
    methods: list[str] = opt(
        ["random-hadamard", "duquant++"],
        "comma list of methods whose input transforms to compare",
        csv=True,
    )
    scale_rule: ScaleRule = opt(ScaleRule("ocp"), "MXFP4 scale rule of the error measurement")
    nsamples: int = opt(8, "calibration windows", minimum=1)
    calib_seqlen: int = opt(512, "calibration window length in tokens", minimum=2)
    seed: int = opt(0, "seed of calibration sampling and random transforms", minimum=0)
    out: str = opt("results/analyze", "output folder for errors.csv and the PNGs")

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("--methods: name at least one method")
        rules = FORMATS["mxfp4"].SCALE_RULES
        if self.scale_rule not in rules:
            raise ConfigError(f"--scale-rule {self.scale_rule}: choose one of {', '.join(rules)}")
        self.scale_rule = ScaleRule(self.scale_rule)
        check_ranges(self)
        check_output_dir(self.out, "--out")
