"""Running a compare: plan every (job, evaluation) cell against the cache, quantize each job that has
work left (the FP model is loaded once and deep-copied; the last job quantizes it in place), evaluate
and cache every cell the moment it finishes."""

from __future__ import annotations

import copy
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from duquant import api
from duquant import distributed as dist
from duquant._version import __version__
from duquant.compare.cache import (
    cache_path,
    calibration_source,
    key_hash,
    load_cached,
    partial_path,
    result_key,
)
from duquant.compare.jobs import CompareConfig, Job, jobs_of, needs_calibration, resolve
from duquant.compare.report import build_table, write_outputs
from duquant.eval.perplexity import NonFiniteLossError
from duquant.eval.registry import EVALUATIONS, Session
from duquant.jsonio import write_json

log = logging.getLogger(__name__)


def default_out(model_source: str) -> Path:
    """results/<model name>/."""
    name = Path(model_source).stem if model_source.endswith(".gguf") else model_source.rstrip("/")
    return Path("results") / name.split("/")[-1]


def environment() -> dict:
    """Software and machine facts recorded with every result."""
    import transformers

    env = {
        "duquant_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "world_size": dist.world(),
    }
    try:
        import lm_eval

        env["lm_eval_version"] = lm_eval.__version__
    except ImportError:
        pass
    return env


@dataclass
class Cell:
    """One (job, evaluation): its key, hash, cache file and, once known, its record."""

    job: Job
    name: str
    key: dict | None
    path: Path | None
    record: dict | None = None


def plan(cfg: CompareConfig, out: Path, model_source: str) -> list[Cell]:
    """Every (job, evaluation) cell with its cache state (loads no model)."""
    data = {name: EVALUATIONS[name].fingerprint(cfg) for name in cfg.evals}
    calib_source = None
    if any(needs_calibration(*resolve(cfg, j)[:2]) for j in jobs_of(cfg)):
        calib_source = calibration_source()
    cells = []
    for job in jobs_of(cfg):
        for name in cfg.evals:
            if data[name]["status"] == "missing":
                rec = {"status": "missing", "reason": data[name]["reason"], "finished": False}
                cells.append(Cell(job, name, None, None, rec))
                continue
            key = result_key(cfg, job, name, data[name], model_source, calib_source)
            h = key_hash(key)
            path = cache_path(out, job, name, h)
            cells.append(Cell(job, name, key, path, load_cached(path, name)))
    return cells


def _pending(cells: list[Cell], job: Job) -> list[Cell]:
    """The cells of `job` still to compute."""
    return [c for c in cells if c.job == job and c.record is None]


def run_compare(cfg: CompareConfig, loaded=None) -> dict:
    """Run (or resume) the comparison; write the cache, table.md, table.json and table.png; return the table."""
    from duquant.models import default_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_source = loaded.source if loaded is not None else (cfg.model or default_model())
    out = Path(cfg.out) if cfg.out else default_out(model_source)
    jobs = jobs_of(cfg)
    for job in jobs:  # fail on unsupported options before any long work
        resolve(cfg, job)
    cells = plan(cfg, out, model_source)
    if (
        dist.active()
    ):  # what rank 0's cache holds decides for every rank (another node's may differ)
        records = dist.broadcast_object([c.record for c in cells])
        for c, rec in zip(cells, records, strict=True):
            c.record = rec
    todo = [j for j in jobs if _pending(cells, j)]
    cached = sum(1 for c in cells if c.record is not None and c.record.get("finished"))
    if cfg.cached_only:
        log.info(
            "compare: %d cached result(s); --cached-only: %d model(s) left out", cached, len(todo)
        )
        todo = []
    else:
        log.info("compare: %d cached result(s), %d model(s) to quantize", cached, len(todo))
    session = Session(cfg)
    calib = None
    owns_model = loaded is None  # a caller's model is never quantized in place
    for n, job in enumerate(todo):
        if loaded is None:
            loaded = api.load_model(cfg.model, str(cfg.dtype), cfg.device)
        session.tokenizer = loaded.tokenizer
        method, quant, rc = resolve(cfg, job)
        in_place = owns_model and n == len(todo) - 1
        torch.manual_seed(cfg.seed)
        if not method.quantize:
            model = loaded.model
        else:
            model = loaded.model if in_place else copy.deepcopy(loaded.model)
        quant_info: dict = {"quantize_seconds": 0.0, "calibration": None}
        if method.quantize:
            windows = None
            job_plan = api.Plan(rc, method, quant)
            if job_plan.needs_windows:
                if calib is None:  # drawn once, shared by every job (the same settings)
                    calib = api.calibrate(job_plan, loaded.tokenizer)[:2]
                windows, quant_info["calibration"] = calib
            report = api.quantize_loaded(job_plan, model, windows)
            quant_info["quantize_seconds"] = report.seconds
        for cell in _pending(cells, job):
            cell.record = _evaluate(cell, model, session, quant_info)
            api.on_main(lambda cell=cell: _keep(cell))
            log.info("compare: %s %s done in %.1f s", job.label, cell.name, cell.record["seconds"])
        if model is not loaded.model:
            del model
    table = build_table(cfg, cells, model_source)
    api.on_main(lambda: write_outputs(table, out))
    return table


def _keep(cell: Cell) -> None:
    """Write a finished cell to the cache (and drop its per-window progress)."""
    write_json(cell.record, cell.path)
    partial_path(cell.path).unlink(missing_ok=True)


def _evaluate(cell: Cell, model: torch.nn.Module, s: Session, quant_info: dict) -> dict:
    """Run one evaluation and wrap it as a cache record."""
    start = time.perf_counter()
    partial = partial_path(cell.path)
    try:
        result = EVALUATIONS[cell.name].run(model, s, f"{cell.job.label} {cell.name}", partial)
        status = "ok"
    except NonFiniteLossError as exc:  # a broken quantized model is a result, not a crash
        result, status = {"error": str(exc)}, "nonfinite"
    return {
        "status": status,
        "finished": True,
        "hash": key_hash(cell.key),
        "label": cell.job.label,
        "method": cell.job.method,
        "weights": cell.job.weights,
        "eval": cell.name,
        "config": cell.key,
        "quantization": quant_info,
        "result": result,
        "seconds": time.perf_counter() - start,
        "environment": environment(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
