"""Compare's configuration and its jobs: every (method, weight quantizer) pair is a `RunConfig` made
from the same validated settings as `duquant run`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from duquant.compare.evals import EVALS
from duquant.config import (
    ConfigError,
    QuantSettings,
    RunConfig,
    WeightQuantizer,
    check_block_size,
    check_output_dir,
    opt,
)
from duquant.methods import METHODS, MethodConfig, get_method

GPTQ_MARK = "*"  # `--methods quarot*`: the paper's notation for a method with GPTQ weights


@dataclass
class CompareConfig(QuantSettings):
    """Everything `duquant compare` needs; serialised (less `out`) into every cached result."""

    methods: list[str] = opt(
        ["fp", "rtn"],
        "e.g. fp,rtn,duquant++,duquant++* (a trailing * = that method with GPTQ weights)",
        csv=True,
    )
    weights: list[str] = opt(["rtn"], "weight quantizers, e.g. rtn,gptq", csv=True)
    evals: list[str] = opt(list(EVALS), ",".join(EVALS), csv=True)
    out: str | None = opt(None, "output folder (default results/<model>/)")
    c4_windows: int = opt(256, "C4 windows drawn (protocol: 256)", minimum=1)
    limit: int | None = opt(None, "zero-shot examples per task", minimum=1)
    tasks: list[str] | None = opt(None, "zero-shot tasks (default: all seven)", csv=True)
    batch_size: int = opt(8, "zero-shot batch size", minimum=1)
    zeroshot_source: str = opt("auto", "zero-shot data source", choices=["auto", "hub", "local"])
    threads: int | None = opt(
        None, "torch CPU threads (default: torch's); recorded, not hashed", minimum=1
    )
    cached_only: bool = opt(
        False,
        "only assemble the table from cached results (compute nothing; shows what is pending)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.methods or not self.evals or not self.weights:
            raise ConfigError("--methods, --weights and --evals must each name at least one item")
        bad = [e for e in self.evals if e not in EVALS]
        if bad:
            raise ConfigError(f"--evals {','.join(bad)}: unknown; choose from {', '.join(EVALS)}")
        unknown = [m for m in self.methods if m.removesuffix(GPTQ_MARK) not in METHODS]
        if unknown:
            raise ConfigError(
                f"--methods {','.join(unknown)}: unknown method(s); registered: "
                f"{', '.join(sorted(METHODS))}"
            )
        choices = [w.value for w in WeightQuantizer]
        for w in self.weights:
            if w not in choices:
                raise ConfigError(f"--weights {w}: choose from {', '.join(choices)}")
        self.weights = [WeightQuantizer(w).value for w in self.weights]
        for m in self.methods:
            check_block_size(get_method(m.removesuffix(GPTQ_MARK)), self.block_size)
        if self.tasks is not None:
            from duquant.eval.zeroshot import TASKS

            bad = [t for t in self.tasks if t not in TASKS]
            if bad or not self.tasks:
                raise ConfigError(
                    f"--tasks {','.join(bad)}: unknown; choose from {', '.join(TASKS)}"
                )
        if self.zeroshot_source not in ("auto", "hub", "local"):
            raise ConfigError(
                f"--zeroshot-source {self.zeroshot_source}: choose auto, hub or local"
            )
        if self.out is not None and not self.cached_only:
            check_output_dir(self.out, "--out")


@dataclass(frozen=True)
class Job:
    """One quantized model: a method with a weight quantizer (None for unquantized methods)."""

    method: str
    weights: str | None

    @property
    def label(self) -> str:
        """The row label: the method, with the weight quantizer when it is not RTN."""
        return self.method if self.weights in (None, "rtn") else f"{self.method} ({self.weights})"

    @property
    def slug(self) -> str:
        """A file-name-safe label."""
        name = self.method if self.weights is None else f"{self.method}-w{self.weights}"
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def run_config(cfg: CompareConfig, job: Job) -> RunConfig:
    """The RunConfig of a job: the shared settings, the job's method and weight quantizer."""
    shared = {f.name for f in fields(QuantSettings)}
    values = {k: getattr(cfg, k) for k in shared}
    return RunConfig(**values, method=job.method, weights=job.weights or "rtn")


def resolve(cfg: CompareConfig, job: Job) -> tuple[MethodConfig, Any, RunConfig]:
    """(method config, QuantConfig, RunConfig) of a job."""
    from duquant.runner import quant_config

    rc = run_config(cfg, job)
    method = get_method(job.method, **cfg.method_overrides())
    return method, quant_config(rc), rc


def jobs_of(cfg: CompareConfig) -> list[Job]:
    """Methods x weight quantizers; an unquantized method (fp) appears once, and a method written
    with the paper's star (`duquant++*`) means that method with GPTQ weights only."""
    jobs: list[Job] = []
    for m in cfg.methods:
        if m.endswith(GPTQ_MARK):
            jobs.append(Job(m.removesuffix(GPTQ_MARK), "gptq"))
        elif not get_method(m).quantize:
            jobs.append(Job(m, None))
        elif get_method(m).weights is not None:  # the method fixes its weight quantizer
            jobs.append(Job(m, get_method(m).weights))
        else:
            jobs.extend(Job(m, w) for w in cfg.weights)
    return list(dict.fromkeys(jobs))


def needs_calibration(method: MethodConfig, quant: Any) -> bool:
    """Whether quantizing with `method` / `quant` reads calibration windows."""
    return method.quantize and (method.needs_calibration or quant.weights != "rtn")
