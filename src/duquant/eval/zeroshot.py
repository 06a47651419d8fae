"""Zero-shot accuracy through lm-evaluation-harness, used as a library on the in-memory model.

Wiring: `lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=...)` wraps
the (possibly quantized) model object itself, nothing is reloaded; `lm_eval.simple_evaluate` then runs
each task zero-shot (num_fewshot=0, no chat template) with a `TaskManager` that also indexes the task
configs shipped in `duquant/eval/tasks/`.

Data, per task:
- hub reachable (`duquant.data.hub_reachable()`): lm-eval's standard task (`arc_easy`, ...), unchanged;
- otherwise the local copy in the data directory ($DUQUANT_DATA_DIR, shared/data/MANIFEST.md) through
  our `<task>_local` configs. Their prompts, targets, choices and metrics are copied from lm-eval's own
  YAML files, and the loaders in `tasks/utils.py` give each row the fields the hub data set has, so
  the scores are lm-eval's scores on the same examples. Exception: `hellaswag_local` reads the
  preprocessed llama.cpp copy (context already merged without capitalising `ctx_b`, markup stripped):
  its score is close to, not identical with, lm-eval's `hellaswag`;
- neither: the task is reported with status "missing" (naming the file needed), never dropped.

Metrics (the paper's, as in lm-eval's reporting): acc_norm for ARC-E, ARC-C, HellaSwag, PIQA and
OpenBookQA; acc for WinoGrande and LAMBADA (plus LAMBADA perplexity). The average is the mean of the
headline metrics over the tasks that ran, and says which ones those were. Each task records its data
files' sha256 and its number of examples (evaluated and available).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

import duquant.data as dqdata
from duquant.data import file_sha256

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    """A paper task: its table column, headline metric and lm-eval task names (hub, local)."""

    name: str
    column: str
    metric: str
    hub_task: str
    local_task: str
    note: str = ""


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("arc_easy", "ARC-E", "acc_norm", "arc_easy", "arc_easy_local"),
        TaskSpec("arc_challenge", "ARC-C", "acc_norm", "arc_challenge", "arc_challenge_local"),
        TaskSpec(
            "hellaswag",
            "HS",
            "acc_norm",
            "hellaswag",
            "hellaswag_local",
            note="local copy is llama.cpp's preprocessed HellaSwag: close to, not identical with, "
            "lm-eval's hellaswag",
        ),
        TaskSpec("winogrande", "WG", "acc", "winogrande", "winogrande_local"),
        TaskSpec("lambada_openai", "LAMB", "acc", "lambada_openai", "lambada_openai_local"),
        TaskSpec("piqa", "PIQA", "acc_norm", "piqa", "piqa_local"),
        TaskSpec("openbookqa", "OBQA", "acc_norm", "openbookqa", "openbookqa_local"),
    )
}
PAPER_TASKS: tuple[str, ...] = tuple(TASKS)
SOURCES = ("auto", "hub", "local")


@dataclass(frozen=True)
class ZeroShotConfig:
    """Which tasks, how many examples and how to batch; `source` auto = hub if reachable, else local."""

    tasks: tuple[str, ...] = PAPER_TASKS
    limit: int | None = None
    batch_size: int = 16
    source: str = "auto"
    max_length: int | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown zero-shot task(s) {unknown}; choose from {list(TASKS)}")
        if self.source not in SOURCES:
            raise ValueError(f"unknown zero-shot source {self.source!r}; choose one of {SOURCES}")


@dataclass
class TaskPlan:
    """Where one task's data comes from: mode hub / local / missing, with the files and their sha256."""

    name: str
    mode: str
    lm_eval_task: str | None
    files: list[dict] = field(default_factory=list)
    reason: str | None = None


def _task_utils():
    """The `tasks/utils.py` module (its file table and loaders)."""
    from duquant.eval.tasks import utils

    return utils


def local_plan(name: str) -> TaskPlan:
    """The local plan of a task, or a 'missing' plan naming the files it needs."""
    utils = _task_utils()
    spec = TASKS[name]
    try:
        paths = utils.local_paths(name)
    except FileNotFoundError as exc:
        return TaskPlan(name, "missing", None, reason=str(exc))
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        return TaskPlan(name, "missing", None, reason=f"local data not found: {', '.join(absent)}")
    files = [{"path": str(p), "sha256": _sha256(str(p))} for p in paths]
    return TaskPlan(name, "local", spec.local_task, files)


@functools.cache
def _sha256(path: str) -> str:
    """sha256 of a data file, computed once per process."""
    return file_sha256(Path(path))


def plan_tasks(cfg: ZeroShotConfig) -> list[TaskPlan]:
    """Resolve every task of `cfg` to hub, local or missing (cheap: no model, no lm-eval)."""
    use_hub = cfg.source == "hub" or (cfg.source == "auto" and dqdata.hub_reachable())
    plans = []
    for name in cfg.tasks:
        if use_hub:
            spec = TASKS[name]
            plans.append(TaskPlan(name, "hub", spec.hub_task, [{"origin": f"hub:{spec.hub_task}"}]))
        else:
            plans.append(local_plan(name))
    return plans


@functools.cache
def task_manager(include_defaults: bool):
    """An lm-eval TaskManager that indexes our local task configs (and lm-eval's own if asked)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def make_lm(model: nn.Module, tokenizer, batch_size: int = 16, max_length: int | None = None):
    """An lm-eval HFLM around the in-memory model (no reload, no copy)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _metric(task_results: dict, metric: str) -> float | None:
    """`metric` from lm-eval's per-task results (keys like 'acc,none')."""
    value = task_results.get(f"{metric},none", task_results.get(metric))
    if value is None or isinstance(value, str):
        return None
    return float(value)


def run_task(lm, plan: TaskPlan, limit: int | None, log_samples: bool = False) -> dict:
    """Evaluate one planned task with lm-eval; the raw per-task numbers and, optionally, samples."""
    from lm_eval import simple_evaluate

    tm = task_manager(include_defaults=plan.mode == "hub")
    start = time.perf_counter()
    out = simple_evaluate(
        model=lm,
        tasks=[plan.lm_eval_task],
        num_fewshot=0,
        limit=limit,
        task_manager=tm,
        bootstrap_iters=0,
        log_samples=log_samples,
    )
    res = out["results"][plan.lm_eval_task]
    n = out.get("n-samples", {}).get(plan.lm_eval_task, {})
    spec = TASKS[plan.name]
    row = {
        "status": "ok",
        "task": plan.lm_eval_task,
        "source": plan.mode,
        "metric": spec.metric,
        "score": _metric(res, spec.metric),
        "acc": _metric(res, "acc"),
        "acc_norm": _metric(res, "acc_norm"),
        "n_examples": n.get("effective"),
        "n_available": n.get("original"),
        "limit": limit,
        "files": plan.files,
        "seconds": time.perf_counter() - start,
    }
    if plan.name == "lambada_openai":
        row["perplexity"] = _metric(res, "perplexity")
    if spec.note and plan.mode == "local":
        row["note"] = spec.note
    if log_samples:
        row["samples"] = out["samples"][plan.lm_eval_task]
    return row


def average(tasks: dict[str, dict]) -> dict:
    """Mean headline metric over the tasks that ran, naming them and the ones left out."""
    over = [k for k, v in tasks.items() if v.get("status") == "ok" and v.get("score") is not None]
    missing = [k for k in tasks if k not in over]
    value = sum(tasks[k]["score"] for k in over) / len(over) if over else math.nan
    return {"value": value, "over": over, "missing": missing, "complete": not missing}


def evaluate_zeroshot(
    model: nn.Module, tokenizer, cfg: ZeroShotConfig | None = None, log_samples: bool = False
) -> dict:
    """Zero-shot scores of the in-memory `model` on `cfg.tasks`: per task, the average, provenance."""
    import lm_eval

    cfg = cfg or ZeroShotConfig()
    lm = make_lm(model, tokenizer, cfg.batch_size, cfg.max_length)
    tasks: dict[str, dict] = {}
    for plan in plan_tasks(cfg):
        if plan.mode == "missing":
            log.warning("zero-shot %s: data missing (%s)", plan.name, plan.reason)
            tasks[plan.name] = {"status": "missing", "reason": plan.reason, "score": None}
            continue
        try:
            tasks[plan.name] = run_task(lm, plan, cfg.limit, log_samples)
        except Exception as exc:
            if plan.mode != "hub":
                raise
            log.warning(
                "zero-shot %s from the hub failed (%s): trying the local copy", plan.name, exc
            )
            local = local_plan(plan.name)
            if local.mode == "missing":
                tasks[plan.name] = {
                    "status": "missing",
                    "reason": f"hub: {type(exc).__name__}: {exc}; {local.reason}",
                    "score": None,
                }
                continue
            tasks[plan.name] = run_task(lm, local, cfg.limit, log_samples)
        t = tasks[plan.name]
        log.info(
            "zero-shot %s %s=%.4f (%s examples)",
            plan.name,
            t["metric"],
            t["score"],
            t["n_examples"],
        )
    return {
        "config": asdict(cfg),
        "tasks": tasks,
        "average": average(tasks),
        "lm_eval_version": lm_eval.__version__,
    }
