"""Compare's configuration and its jobs: every (method, weight quantizer) pair is a `RunConfig` made
from the same validated settings as `duquant run`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from duquant import api
from duquant.config import (
    ConfigError,
    QuantSettings,
    RunConfig,
    WeightQuantizer,
    check_output_dir,
    opt,
)
from duquant.eval.registry import EVALS, PAPER_EVALS
from duquant.methods import Recipe, get_method, method_names

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
    evals: list[str] = opt(
        list(PAPER_EVALS), f"evaluations, any of {','.join(EVALS)} (default: Table 1's)", csv=True
    )
    out: str | None = opt(None, "output folder (default results/<model>/)")
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
        unknown = [m for m in self.methods if m.removesuffix(GPTQ_MARK) not in method_names()]
        if unknown:
            raise ConfigError(
                f"--methods {','.join(unknown)}: unknown method(s); registered: "
                f"{', '.join(method_names())}"
            )
        choices = [w.value for w in WeightQuantizer]
        for w in self.weights:
            if w not in choices:
                raise ConfigError(f"--weights {w}: choose from {', '.join(choices)}")
        self.weights = [WeightQuantizer(w).value for w in self.weights]
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


def resolve(cfg: CompareConfig, job: Job) -> tuple[Recipe, Any, RunConfig]:
    """(recipe, QuantConfig, RunConfig) of a job, checked by the orchestration layer."""
    plan = api.check(run_config(cfg, job))
    return plan.recipe, plan.quant, plan.cfg


def check_compare(cfg: CompareConfig) -> None:
    """Everything a compare can refuse before loading: every job's recipe and options, the
    evaluations' settings, an --out folder overlapping the model (ConfigError, one line)."""
    api.check_evals(cfg.evals, cfg)
    for job in jobs_of(cfg):
        resolve(cfg, job)
    api.check_distributed(cfg, any(needs_calibration(*resolve(cfg, j)[:2]) for j in jobs_of(cfg)))
    if cfg.out is not None and cfg.model is not None and Path(cfg.model).expanduser().exists():
        how = api.path_overlap(cfg.out, cfg.model)
        if how is not None:
            raise ConfigError(
                f"--out {cfg.out}: {how} --model {cfg.model}; write the output apart from the "
                "inputs"
            )


def jobs_of(cfg: CompareConfig) -> list[Job]:
    """Methods x weight quantizers; an unquantized method (fp) appears once, and a method written
    with the paper's star (`duquant++*`) means that method with GPTQ weights only."""
    jobs: list[Job] = []
    for m in cfg.methods:
        recipe = get_method(m.removesuffix(GPTQ_MARK))
        if m.endswith(GPTQ_MARK):
            jobs.append(Job(m.removesuffix(GPTQ_MARK), "gptq"))
        elif not recipe.quantize:
            jobs.append(Job(m, None))
        elif recipe.gptq is not None:  # the recipe fixes its weight quantizer
            jobs.append(Job(m, "gptq"))
        else:
            jobs.extend(Job(m, w) for w in cfg.weights)
    return list(dict.fromkeys(jobs))


def needs_calibration(method: Recipe, quant: Any) -> bool:
    """Whether quantizing with `method` / `quant` reads calibration windows."""
    return api.needs_windows(method, quant)
