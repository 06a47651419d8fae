"""`duquant compare`: methods x weight quantizers x evaluations in one command, resumable.

For every (method, weights) pair the FP model, loaded once, is deep-copied and quantized (the pair that
runs last quantizes the original in place); calibration windows are drawn once and shared. Every
(method, weights, evaluation) result is cached as `<out>/cache/<label>-<eval>-<hash>.json`, the hash
being of the result's full config (method, formats, scale rules, weight quantizer, seed, calibration,
evaluation settings, data files' sha256, duquant version), written the moment it finishes: a re-run,
or a run after an interruption, recomputes nothing that finished; an interrupted perplexity cell resumes
after its last finished window (`<out>/cache/partial/`). A pair whose results are all cached
is neither copied nor quantized, and the model is not loaded at all when everything is cached.
Evaluations whose data are missing are reported as missing and not cached (they run once the data
appear). Outputs: `table.md` (the paper's Table-1 layout), `table.json`, `table.png`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

import duquant
from duquant.config import RunConfig
from duquant.data import DataNotFoundError, eval_text, wikitext2_rows
from duquant.eval.perplexity import NonFiniteLossError, perplexity
from duquant.formats import DEFAULT_SCALE_RULE
from duquant.methods import METHODS, MethodConfig, get_method
from duquant.pipeline import HESSIAN_SOURCES

log = logging.getLogger(__name__)

EVALS = ("wikitext2", "c4", "zeroshot")
PPL_COLUMNS = {"wikitext2": "W2 PPL", "c4": "C4 PPL"}
GPTQ_MARK = "*"  # `--methods quarot*`: the paper's notation for a method with GPTQ weights
ZS_COLUMNS = ("ARC-E", "ARC-C", "HS", "WG", "LAMB", "PIQA", "OBQA")
COLUMNS = ("method", "W2 PPL", "C4 PPL", *ZS_COLUMNS, "Avg")


@dataclass
class CompareConfig:
    """Everything `duquant compare` needs; serialised (less `out`) into every cached result."""

    model: str | None = None
    methods: list[str] = field(default_factory=lambda: ["fp", "rtn"])
    weights: list[str] = field(default_factory=lambda: ["rtn"])
    evals: list[str] = field(default_factory=lambda: list(EVALS))
    out: str | None = None
    format: str = "mxfp4"
    w_scale_rule: str | None = None
    a_scale_rule: str | None = None
    rounding: str = "even"
    act_order: bool = False
    gptq_hessian: str = "quantized"
    alpha: float | None = None
    block_size: int | None = None
    max_steps: int | None = None
    seqlen: int = 2048
    max_windows: int | None = None
    c4_windows: int = 256
    limit: int | None = None
    tasks: list[str] | None = None  # None: the paper's seven
    batch_size: int = 8
    zeroshot_source: str = "auto"
    nsamples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None  # torch threads (None: torch's default); recorded, not in the hash
    cached_only: bool = False  # build the table from the cache alone; compute nothing

    def __post_init__(self) -> None:
        bad = [e for e in self.evals if e not in EVALS]
        if bad:
            raise ValueError(f"unknown evaluation(s) {bad}; choose from {list(EVALS)}")
        unknown = [m for m in self.methods if m.removesuffix(GPTQ_MARK) not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; registered: {sorted(METHODS)}")
        if not self.methods or not self.evals or not self.weights:
            raise ValueError("--methods, --weights and --evals must each name at least one item")


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


@dataclass
class Session:
    """State shared across jobs of one compare run: the FP model, tokenizer and data caches."""

    cfg: CompareConfig
    tokenizer: Any = None
    cache: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- configuration


def run_config(cfg: CompareConfig, job: Job) -> RunConfig:
    """The RunConfig of a job (only the fields this duquant's RunConfig has)."""
    names = {f.name for f in fields(RunConfig)}
    if job.weights not in (None, "rtn") and "weights" not in names:
        raise ValueError(
            f"--weights {job.weights}: this duquant ({duquant.__version__}) has no weight quantizer "
            "other than rtn (RunConfig has no `weights` field); use --weights rtn"
        )
    values = {k: v for k, v in asdict(cfg).items() if k in names}
    values.update(method=job.method, evals=[])
    if "weights" in names:
        values["weights"] = job.weights or "rtn"
    return RunConfig(**values)


def resolve(cfg: CompareConfig, job: Job) -> tuple[MethodConfig, Any, RunConfig]:
    """(method config, QuantConfig, RunConfig) of a job; raises a clear error when unsupported."""
    from duquant.runner import quant_config

    rc = run_config(cfg, job)
    method = get_method(
        job.method, alpha=cfg.alpha, block_size=cfg.block_size, max_steps=cfg.max_steps
    )
    try:
        quant = quant_config(rc)
    except ValueError as exc:
        raise ValueError(f"--weights {job.weights}: {exc}") from exc
    if getattr(quant, "weights", "rtn") != (job.weights or "rtn"):
        raise ValueError(f"--weights {job.weights} is not supported by duquant.runner.quant_config")
    return method, quant, rc


def jobs_of(cfg: CompareConfig) -> list[Job]:
    """Methods x weight quantizers; an unquantized method (fp) appears once, and a method written
    with the paper's star (`duquant++*`) means that method with GPTQ weights only."""
    jobs: list[Job] = []
    for m in cfg.methods:
        if m.endswith(GPTQ_MARK):
            jobs.append(Job(m.removesuffix(GPTQ_MARK), "gptq"))
        elif not get_method(m).quantize:
            jobs.append(Job(m, None))
        else:
            jobs.extend(Job(m, w) for w in cfg.weights)
    return list(dict.fromkeys(jobs))


def needs_calibration(method: MethodConfig, quant: Any) -> bool:
    """Whether quantizing with `method` / `quant` reads calibration windows."""
    return method.quantize and (
        method.needs_calibration or getattr(quant, "weights", "rtn") != "rtn"
    )


def _calibration_source() -> dict:
    """Which WikiText-2 split and file calibration would read (the same order as data.calibration_windows)."""
    try:
        _, src = wikitext2_rows("train")
    except DataNotFoundError:
        _, src = wikitext2_rows("validation")
    return asdict(src)


def data_fingerprint(name: str, cfg: CompareConfig) -> dict:
    """Where an evaluation's data come from now, with sha256: {'status': 'ok'|'missing', ...}."""
    try:
        if name == "wikitext2":
            _, src = wikitext2_rows("test")
            return {"status": "ok", "source": asdict(src)}
        if name == "c4":
            from duquant.eval.c4 import C4_HUB_FILE, C4_HUB_PATH, c4_mode, local_c4_path

            mode = c4_mode()
            if mode == "missing":
                return {"status": "missing", "reason": _c4_missing_reason()}
            if mode == "hub":
                return {"status": "ok", "source": {"origin": f"hub:{C4_HUB_PATH}/{C4_HUB_FILE}"}}
            path = local_c4_path()
            return {"status": "ok", "source": {"origin": str(path), "sha256": _sha(path)}}
        from duquant.eval.zeroshot import plan_tasks

        plans = plan_tasks(_zs_config(cfg))
        return {"status": "ok", "tasks": {p.name: asdict(p) for p in plans}}
    except DataNotFoundError as exc:
        return {"status": "missing", "reason": str(exc)}


def _c4_missing_reason() -> str:
    """The message c4_documents would raise."""
    from duquant.eval.c4 import c4_documents

    try:
        c4_documents()
    except DataNotFoundError as exc:
        return str(exc)
    return "C4 unavailable"


def _sha(path) -> str:
    """sha256 of a file."""
    from duquant.data import file_sha256

    return file_sha256(Path(path))


def _zs_config(cfg: CompareConfig):
    """The zero-shot config of a compare run."""
    from duquant.eval.zeroshot import PAPER_TASKS, ZeroShotConfig

    return ZeroShotConfig(
        tasks=tuple(cfg.tasks or PAPER_TASKS),
        limit=cfg.limit,
        batch_size=cfg.batch_size,
        source=cfg.zeroshot_source,
    )


def eval_settings(name: str, cfg: CompareConfig) -> dict:
    """The settings that change an evaluation's number."""
    if name == "wikitext2":
        return {"name": name, "seqlen": cfg.seqlen, "max_windows": cfg.max_windows}
    if name == "c4":
        return {
            "name": name,
            "seqlen": cfg.seqlen,
            "nwindows": cfg.c4_windows,
            "max_windows": cfg.max_windows,
            "seed": 0,
        }
    return {"name": name, **asdict(_zs_config(cfg))}


def result_key(
    cfg: CompareConfig,
    job: Job,
    name: str,
    data: dict,
    model_source: str,
    calib_source: dict | None,
) -> dict:
    """The full config of one (method, weights, evaluation) result: what its cache hash covers."""
    method, quant, _ = resolve(cfg, job)
    key: dict = {
        "model": model_source,
        "dtype": cfg.dtype,
        "device": cfg.device,
        # an unquantized method is its name: fields added to MethodConfig later cannot change it
        "method": asdict(method) if method.quantize else {"name": method.name, "quantize": False},
        "weights": job.weights,
        "quant": asdict(quant) if method.quantize else None,
        "seed": cfg.seed,
        "calibration": None,
        "eval": eval_settings(name, cfg),
        "data": data,
        "duquant_version": duquant.__version__,
    }
    if needs_calibration(method, quant):
        key["calibration"] = {
            "nsamples": cfg.nsamples,
            "seqlen": cfg.calib_seqlen,
            "seed": cfg.seed,
            "source": calib_source or _calibration_source(),
        }
    return key


def key_hash(key: dict) -> str:
    """A stable short hash of a config dict."""
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(out: Path, job: Job, name: str, h: str) -> Path:
    """Where one result is cached."""
    return out / "cache" / f"{job.slug}-{name}-{h}.json"


def partial_path(cached: Path) -> Path:
    """Where an unfinished evaluation of `cached` keeps its per-window progress."""
    return cached.parent / "partial" / cached.name


def load_cached(path: Path) -> dict | None:
    """A finished cached result, or None (absent or unreadable: recompute)."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable cache file %s (%s)", path, exc)
        return None
    return rec if rec.get("finished") else None


# ----------------------------------------------------------------------------- evaluations


def eval_wikitext2(model: torch.nn.Module, s: Session, desc: str, partial: Path) -> dict:
    """WikiText-2 test perplexity (text tokenized once per compare run)."""
    if "wikitext2" not in s.cache:
        text, src = eval_text("wikitext2")
        s.cache["wikitext2"] = (s.tokenizer(text, return_tensors="pt").input_ids[0], src)
    ids, src = s.cache["wikitext2"]
    res = perplexity(model, ids, s.cfg.seqlen, s.cfg.max_windows, desc=desc, checkpoint=partial)
    res["source"] = asdict(src)
    return res


def eval_c4(model: torch.nn.Module, s: Session, desc: str, partial: Path) -> dict:
    """C4 perplexity by the peers' random-window protocol (windows drawn once per compare run)."""
    from duquant.eval.c4 import c4_windows

    if "c4" not in s.cache:
        s.cache["c4"] = c4_windows(s.tokenizer, s.cfg.seqlen, s.cfg.c4_windows, seed=0)
    windows, info = s.cache["c4"]
    res = perplexity(
        model, windows.reshape(-1), s.cfg.seqlen, s.cfg.max_windows, desc=desc, checkpoint=partial
    )
    res["source"] = asdict(info.source)
    res["c4"] = {k: v for k, v in asdict(info).items() if k != "source"}
    return res


def eval_zeroshot(model: torch.nn.Module, s: Session, desc: str, partial: Path) -> dict:
    """Zero-shot accuracies through lm-eval on the in-memory model (no per-example checkpoint)."""
    from duquant.eval.zeroshot import evaluate_zeroshot

    return evaluate_zeroshot(model, s.tokenizer, _zs_config(s.cfg))


EVALUATORS = {"wikitext2": eval_wikitext2, "c4": eval_c4, "zeroshot": eval_zeroshot}


# ----------------------------------------------------------------------------- running


def default_out(model_source: str) -> Path:
    """results/<model name>/."""
    name = Path(model_source).stem if model_source.endswith(".gguf") else model_source.rstrip("/")
    return Path("results") / name.split("/")[-1]


def environment() -> dict:
    """Software and machine facts recorded with every result."""
    import transformers

    env = {
        "duquant_version": duquant.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
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
    data = {name: data_fingerprint(name, cfg) for name in cfg.evals}
    calib_source = None
    if any(needs_calibration(*resolve(cfg, j)[:2]) for j in jobs_of(cfg)):
        calib_source = _calibration_source()
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
            cells.append(Cell(job, name, key, path, load_cached(path)))
    return cells


def _pending(cells: list[Cell], job: Job) -> list[Cell]:
    """The cells of `job` still to compute."""
    return [c for c in cells if c.job == job and c.record is None]


def run_compare(cfg: CompareConfig, loaded=None) -> dict:
    """Run (or resume) the comparison; write the cache, table.md, table.json and table.png; return the table."""
    from duquant.models import adapter_for, default_model, load_model
    from duquant.pipeline import quantize_model
    from duquant.runner import write_json

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_source = loaded.source if loaded is not None else (cfg.model or default_model())
    out = Path(cfg.out) if cfg.out else default_out(model_source)
    jobs = jobs_of(cfg)
    for job in jobs:  # fail on unsupported options before any long work
        resolve(cfg, job)
    cells = plan(cfg, out, model_source)
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
            loaded = load_model(cfg.model, cfg.dtype, cfg.device)
        session.tokenizer = loaded.tokenizer
        method, quant, _ = resolve(cfg, job)
        in_place = owns_model and n == len(todo) - 1
        torch.manual_seed(cfg.seed)
        if not method.quantize:
            model = loaded.model
        else:
            model = loaded.model if in_place else copy.deepcopy(loaded.model)
        quant_info: dict = {"quantize_seconds": 0.0, "calibration": None}
        if method.quantize:
            windows = None
            if needs_calibration(method, quant):
                if calib is None:
                    from duquant.data import calibration_windows

                    calib = calibration_windows(
                        loaded.tokenizer, cfg.nsamples, cfg.calib_seqlen, cfg.seed
                    )
                windows, info = calib
                quant_info["calibration"] = asdict(info)
            report = quantize_model(
                model, adapter_for(model), method, quant, windows, seed=cfg.seed
            )
            quant_info["quantize_seconds"] = report.seconds
        for cell in _pending(cells, job):
            cell.record = _evaluate(cell, model, session, quant_info)
            write_json(cell.record, cell.path)
            partial_path(cell.path).unlink(missing_ok=True)
            log.info("compare: %s %s done in %.1f s", job.label, cell.name, cell.record["seconds"])
        if model is not loaded.model:
            del model
    table = build_table(cfg, cells, model_source)
    write_outputs(table, out)
    return table


def _evaluate(cell: Cell, model: torch.nn.Module, s: Session, quant_info: dict) -> dict:
    """Run one evaluation and wrap it as a cache record."""
    start = time.perf_counter()
    partial = partial_path(cell.path)
    try:
        result = EVALUATORS[cell.name](model, s, f"{cell.job.label} {cell.name}", partial)
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


# ----------------------------------------------------------------------------- table


def _row(cells: list[Cell]) -> dict:
    """The table row of one job from its cells: column -> number, 'missing', 'nonfinite' or None."""
    row: dict[str, Any] = {c: None for c in COLUMNS[1:]}
    notes: list[str] = []
    for cell in cells:
        rec = cell.record or {}
        if cell.name in PPL_COLUMNS:
            col = PPL_COLUMNS[cell.name]
            row[col] = rec["result"]["ppl"] if rec.get("status") == "ok" else rec.get("status")
            if rec.get("status") == "ok":
                row[f"{col} windows"] = rec["result"].get("windows")
            continue
        if rec.get("status") != "ok":
            for col in (*ZS_COLUMNS, "Avg"):
                row[col] = rec.get("status")
            continue
        from duquant.eval.zeroshot import TASKS

        res = rec["result"]
        for name, t in res["tasks"].items():
            col = TASKS[name].column
            ok = t.get("status") == "ok" and t.get("score") is not None
            row[col] = 100 * t["score"] if ok else t.get("status", "missing")
            if t.get("note"):
                notes.append(f"{col}: {t['note']}")
            if ok:
                row.setdefault("examples", {})[col] = (
                    f"{t.get('n_examples')}/{t.get('n_available')}"
                )
            if ok and t.get("perplexity") is not None:
                row["LAMB PPL"] = t["perplexity"]
        avg = res["average"]
        row["Avg"] = 100 * avg["value"] if avg["over"] else "missing"
        row["Avg over"] = [TASKS[t].column for t in avg["over"]]
    row["notes"] = notes
    return row


def progress(cell: Cell) -> str:
    """What an unfinished cell has saved so far: its perplexity windows, or 'no saved progress'."""
    part = partial_path(cell.path) if cell.path is not None else None
    if part is not None and part.is_file():
        try:
            return f"{len(json.loads(part.read_text())['window_nll'])} windows done"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return "no saved progress"


def build_table(cfg: CompareConfig, cells: list[Cell], model_source: str) -> dict:
    """table.json content: config, columns, one row per job, and every result record."""
    rows = []
    for job in jobs_of(cfg):
        mine = [c for c in cells if c.job == job]
        rows.append(
            {
                "label": job.label,
                "method": job.method,
                "weights": job.weights,
                "values": _row(mine),
                "results": {c.name: c.record for c in mine},
                "pending": {c.name: progress(c) for c in mine if c.record is None},
            }
        )
    return {
        "model": model_source,
        "config": asdict(cfg),
        "columns": list(COLUMNS),
        "rows": rows,
        "duquant_version": duquant.__version__,
    }


def _fmt(value: Any, ppl: bool) -> str:
    """A table cell: numbers to 2 (PPL) or 1 (accuracy, %) decimals, '–' when not evaluated."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return f"{value:.2f}" if ppl else f"{value:.1f}"


def table_markdown(table: dict) -> str:
    """The paper's Table-1 layout as Markdown, with the settings and footnotes."""
    cfg = table["config"]
    default = DEFAULT_SCALE_RULE.get(cfg["format"], "default")
    lines = [
        f"# duquant compare: {table['model']}",
        "",
        f"Format {cfg['format']} W4A4, weight/act scale rules "
        f"{cfg['w_scale_rule'] or default}/{cfg['a_scale_rule'] or default}, rounding {cfg['rounding']}; "
        f"PPL seqlen {cfg['seqlen']}, max windows {cfg['max_windows'] or 'all'}; zero-shot limit "
        f"{cfg['limit'] or 'none'} per task (accuracies in %); seed {cfg['seed']}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]
    notes: list[str] = []
    for row in table["rows"]:
        v = row["values"]
        cells = [row["label"]] + [_fmt(v[c], c.endswith("PPL")) for c in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
        notes.extend(n for n in v.get("notes", []) if n not in notes)
        over = v.get("Avg over")
        if over is not None and len(over) < len(ZS_COLUMNS):
            notes.append(f"{row['label']}: Avg over {', '.join(over) or 'no task'} only")
    for row in table["rows"]:
        for name, rec in row["results"].items():
            if rec and rec.get("status") == "missing":
                note = f"{name} missing: {rec.get('reason')}"
                if note not in notes:
                    notes.append(note)
            elif rec and name == "zeroshot" and rec.get("status") == "ok":
                for t, r in rec["result"]["tasks"].items():
                    if r.get("status") == "missing":
                        note = f"{t} missing: {r.get('reason')}"
                        if note not in notes:
                            notes.append(note)
    pending = [
        f"{row['label']} {name} ({state})"
        for row in table["rows"]
        for name, state in row.get("pending", {}).items()
    ]
    if pending:
        notes.append("not computed yet (`–`): " + ", ".join(pending))
    notes.extend(_detail_notes(table["rows"]))
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _detail_notes(rows: list[dict]) -> list[str]:
    """Footnotes with windows, examples per task and LAMBADA perplexity."""
    notes = []
    for col in PPL_COLUMNS.values():
        wins = {r["label"]: r["values"].get(f"{col} windows") for r in rows}
        if any(w is not None for w in wins.values()):
            notes.append(
                f"{col} windows: " + ", ".join(f"{k} {w}" for k, w in wins.items() if w is not None)
            )
    examples = next((r["values"]["examples"] for r in rows if r["values"].get("examples")), None)
    if examples:
        notes.append(
            "zero-shot examples evaluated/available: "
            + ", ".join(f"{k} {v}" for k, v in examples.items())
        )
    lamb = {r["label"]: r["values"].get("LAMB PPL") for r in rows}
    if any(v is not None for v in lamb.values()):
        notes.append(
            "LAMBADA perplexity: "
            + ", ".join(f"{k} {_fmt(v, True)}" for k, v in lamb.items() if v is not None)
        )
    return notes


def plot_table(table: dict, path: Path) -> Path | None:
    """A PNG bar chart: perplexities and zero-shot accuracies per method (None if nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    panels = []
    ppl_cols = [c for c in ("W2 PPL", "C4 PPL") if any(_num(r["values"][c]) for r in rows)]
    acc_cols = [c for c in (*ZS_COLUMNS, "Avg") if any(_num(r["values"][c]) for r in rows)]
    if ppl_cols:
        panels.append(("perplexity (lower is better)", ppl_cols))
    if acc_cols:
        panels.append(("zero-shot accuracy % (higher is better)", acc_cols))
    if not panels:
        return None
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4 + 1.2 * sum(len(c) for _, c in panels), 4), squeeze=False
    )
    width = 0.8 / max(len(rows), 1)
    colors = plt.get_cmap("tab20").colors  # distinct for up to 20 rows (tab10 repeats after 10)
    for ax, (title, cols) in zip(axes[0], panels, strict=True):
        for k, row in enumerate(rows):
            ys = [row["values"][c] if _num(row["values"][c]) else 0.0 for c in cols]
            xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(cols))]
            bars = ax.bar(xs, ys, width, label=row["label"], color=colors[k % len(colors)])
            if len(rows) <= 6:  # more labels than that overlap into noise
                ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(cols)), cols, rotation=30)
        ax.set_title(title)
        if title.startswith("perplexity"):
            ax.set_yscale("log")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize="small")
    fig.suptitle(Path(str(table["model"])).name, fontsize="small")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _num(v: Any) -> bool:
    """Whether a table value is a finite number."""
    return isinstance(v, (int, float)) and math.isfinite(v)


def write_outputs(table: dict, out: Path) -> None:
    """table.md, table.json and table.png in `out`."""
    from duquant.runner import write_json

    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table_markdown(table))
    write_json(table, out / "table.json")
    plot_table(table, out / "table.png")


# ----------------------------------------------------------------------------- command line


def _csv(value: str) -> list[str]:
    """A comma-separated option as a list."""
    return [v.strip() for v in value.split(",") if v.strip()]


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Register `duquant compare` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "compare", help="methods x evaluations in one resumable command, with a Table-1 summary"
    )
    p.add_argument("--model", default=None, help="HF id, local HF dir or .gguf (default: SmolLM2)")
    p.add_argument(
        "--methods",
        type=_csv,
        default=["fp", "rtn"],
        help="e.g. fp,rtn,duquant++,duquant++* (a trailing * = that method with GPTQ weights)",
    )
    p.add_argument("--weights", type=_csv, default=["rtn"], help="weight quantizers, e.g. rtn,gptq")
    p.add_argument("--evals", type=_csv, default=list(EVALS), help="wikitext2,c4,zeroshot")
    p.add_argument("--out", default=None, help="output folder (default results/<model>/)")
    p.add_argument("--limit", type=int, default=None, help="zero-shot examples per task")
    p.add_argument("--tasks", type=_csv, default=None, help="zero-shot tasks (default: all seven)")
    p.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size")
    p.add_argument("--zeroshot-source", default="auto", choices=["auto", "hub", "local"])
    p.add_argument("--max-windows", type=int, default=None, help="PPL: only the first N windows")
    p.add_argument("--c4-windows", type=int, default=256, help="C4 windows drawn (protocol: 256)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--format", default="mxfp4")
    p.add_argument("--w-scale-rule", default=None)
    p.add_argument("--a-scale-rule", default=None)
    p.add_argument("--rounding", default="even", choices=["even", "away"])
    p.add_argument("--act-order", action="store_true", help="GPTQ activation order")
    p.add_argument(
        "--gptq-hessian",
        default="quantized",
        choices=HESSIAN_SOURCES,
        help="GPTQ Hessians: as each group sees its inputs (quantized) or from FP inputs (faster)",
    )
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="only assemble the table from cached results (compute nothing; shows what is pending)",
    )
    p.set_defaults(func=compare_main)
    return p


def compare_main(args: argparse.Namespace) -> int:
    """`duquant compare`: run, print the table, say where the outputs are."""
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    names = {f.name for f in fields(CompareConfig)}
    try:
        cfg = CompareConfig(**{k: v for k, v in vars(args).items() if k in names})
        table = run_compare(cfg)
    except (ValueError, FileNotFoundError, OSError, RuntimeError, ImportError) as exc:
        print(f"duquant compare: error: {exc}", file=sys.stderr)
        return 2
    print(table_markdown(table))
    out = Path(cfg.out) if cfg.out else default_out(table["model"])
    print(f"wrote {out / 'table.md'}, {out / 'table.json'}, {out / 'table.png'}")
    return 0
