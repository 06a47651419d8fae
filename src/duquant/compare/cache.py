"""Compare's result cache: what a result's hash covers, where it lives, and reading it back."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from duquant._version import __version__
from duquant.compare.jobs import CompareConfig, Job, needs_calibration, resolve
from duquant.data import DataNotFoundError, wikitext2_rows
from duquant.eval.registry import evaluation_for, metrics_key
from duquant.jsonio import read_json_object

log = logging.getLogger(__name__)


def calibration_source() -> dict:
    """Which WikiText-2 split and file calibration would read (the order of data.calibration_windows)."""
    try:
        _, src = wikitext2_rows("train")
    except DataNotFoundError:
        _, src = wikitext2_rows("validation")
    return asdict(src)


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
        "dtype": str(cfg.dtype),
        "device": cfg.device,
        # an unquantized method is its name: options added to stages later cannot change it
        "method": _method_key(method)
        if method.quantize
        else {"name": method.name, "quantize": False},
        "weights": job.weights,
        "quant": _quant_key(quant) if method.quantize else None,
        "seed": cfg.seed,
        "calibration": None,
        "eval": evaluation_for(name).settings(cfg),
        "data": data,
        "duquant_version": __version__,
    }
    if needs_calibration(method, quant):
        key["calibration"] = {
            "nsamples": cfg.nsamples,
            "seqlen": cfg.calib_seqlen,
            "seed": cfg.seed,
            "source": calib_source or calibration_source(),
        }
    return key


# GPTQ options added after results were cached, at the values those results were computed with:
# left out of the key at these values so that adding them kept every cached hash
_LATE_GPTQ_DEFAULTS = {"act_order_scope": "group", "scale_search": "none"}


def _method_key(method) -> dict:
    """A recipe for the key: its stages and their options (the GPTQ options the command line
    gives are in the quant config)."""
    return {k: v for k, v in method.to_dict().items() if k != "source"}


def _quant_key(quant) -> dict:
    """The quant config for the key, less GPTQ options at their late-added defaults."""
    d = asdict(quant)
    d["gptq"] = {k: v for k, v in d["gptq"].items() if _LATE_GPTQ_DEFAULTS.get(k, object()) != v}
    return d


def key_hash(key: dict) -> str:
    """A stable short hash of a config dict."""
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(out: Path, job: Job, name: str, h: str) -> Path:
    """Where one result is cached (a text file's evaluation by the file's name)."""
    return out / "cache" / f"{job.slug}-{metrics_key(name)}-{h}.json"


def partial_path(cached: Path) -> Path:
    """Where an unfinished evaluation of `cached` keeps its per-window progress."""
    return cached.parent / "partial" / cached.name


def load_cached(path: Path, name: str | None = None) -> dict | None:
    """A finished cached result of evaluation `name`, or None (absent: compute it).

    Nothing on disk is trusted: a file that is not UTF-8 JSON, not a finished record of this cell
    (its hash, that of its own config, and the file name's must agree), or whose numbers are not
    finite numbers of the expected kind is one warning and treated as absent: the cell is
    recomputed and its file rewritten (it is this cell's own file), never printed and never
    deleted."""
    if not path.is_file():
        return None
    try:
        # NaN / Infinity read as floats: the checks refuse them where a number must be finite
        # (a zero-shot average over no task is legitimately NaN)
        rec = read_json_object(path, MAX_CACHE_BYTES, constants=True)
        problem = record_problem(rec, path, name)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; the rest guard the checks themselves
    except (OSError, ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
        problem = " ".join(str(exc).split()) or type(exc).__name__
    if problem is not None:
        log.warning("ignoring cache file %s (%s): computing the result again", path, problem)
        return None
    return rec


# a cache record is a few kB (a zero-shot one with sample logs far less than this)
MAX_CACHE_BYTES = 64 << 20
STATUSES = ("ok", "nonfinite")
MAX_COUNT = 10**12  # more windows, tokens or examples than any evaluation has


def _finite(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    """Whether `value` is a real number (not a bool) finite and within [low, high]."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value) if abs(value) < 1e300 else math.inf)
        and low <= value <= high
    )


def _count(value: Any, low: int = 0) -> bool:
    """Whether `value` is an integer (not a bool) in [low, MAX_COUNT]."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_COUNT


def record_problem(rec: Any, path: Path, name: str | None = None) -> str | None:
    """What is wrong with cache record `rec` read from `path` (None: nothing), naming the key."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if rec.get("finished") is not True:
        return "key 'finished' is not true"
    if rec.get("status") not in STATUSES:
        return f"key 'status' is not one of {', '.join(STATUSES)}"
    h = path.stem.rsplit("-", 1)[-1]
    if rec.get("hash") != h:
        return "key 'hash' does not match the file name"
    if not isinstance(rec.get("config"), dict) or key_hash(rec["config"]) != h:
        return "key 'config' does not hash to the file name's hash"
    if name is not None and rec.get("eval") != name:
        return f"key 'eval' is not {name!r}"
    if not _finite(rec.get("seconds"), 0):
        return "key 'seconds' is not a finite number >= 0"
    result = rec.get("result")
    if not isinstance(result, dict):
        return "key 'result' is not an object"
    if rec["status"] == "nonfinite":
        return None if isinstance(result.get("error"), str) else "key 'result.error' is not text"
    if "tasks" in result:
        return _tasks_problem(result)
    return _perplexity_problem(result)


def _perplexity_problem(result: dict) -> str | None:
    """What is wrong with a perplexity result (None: nothing); `nll` and `seqlen`, where
    present, must agree with it."""
    ppl, nll = result.get("ppl"), result.get("nll")
    if not _finite(ppl, 1.0):
        return "key 'result.ppl' is not a finite number >= 1"
    if nll is not None and (
        not _finite(nll, 0.0) or not math.isclose(math.log(ppl), nll, rel_tol=1e-9, abs_tol=1e-12)
    ):
        return "key 'result.nll' is not a finite number equal to log(ppl)"
    windows = result.get("windows")
    if not _count(windows, 1):
        return "key 'result.windows' is not a count >= 1"
    for k in ("seqlen", "total_windows", "tokens"):
        if result.get(k) is not None and not _count(result[k], 1):
            return f"key 'result.{k}' is not a count"
    if windows > (result.get("total_windows") or MAX_COUNT):
        return "key 'result.windows' is more than 'result.total_windows'"
    seqlen, tokens = result.get("seqlen"), result.get("tokens")
    if seqlen is not None and tokens is not None and tokens != windows * (seqlen - 1):
        return "key 'result.tokens' is not windows x (seqlen - 1)"
    return None


def _tasks_problem(result: dict) -> str | None:
    """What is wrong with an lm-eval result (None: nothing)."""
    tasks = result["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        return "key 'result.tasks' is not a non-empty object"
    from duquant.eval.zeroshot import TASKS

    for task, t in tasks.items():
        where = f"result.tasks.{task}"
        if task not in TASKS:
            return f"key '{where}' is not a known task"
        if not isinstance(t, dict) or not isinstance(t.get("status"), str):
            return f"key '{where}.status' is missing"
        if t["status"] != "ok":
            continue
        if t.get("score") is not None and not _finite(t["score"], 0.0, 1.0):
            return f"key '{where}.score' is not a number in [0, 1]"
        if t.get("perplexity") is not None and not _finite(t["perplexity"], 1.0):
            return f"key '{where}.perplexity' is not a finite number >= 1"
        for k in ("n_examples", "n_available"):
            if t.get(k) is not None and not _count(t[k]):
                return f"key '{where}.{k}' is not a count"
        n, available = t.get("n_examples"), t.get("n_available")
        if n is not None and available is not None and n > available:
            return f"key '{where}.n_examples' is more than its n_available"
        if t.get("note") is not None and not isinstance(t["note"], str):
            return f"key '{where}.note' is not text"
    avg = result.get("average")
    if not isinstance(avg, dict) or not isinstance(avg.get("over"), list):
        return "key 'result.average.over' is not a list"
    ran = [k for k, t in tasks.items() if t["status"] == "ok" and t.get("score") is not None]
    if avg["over"] != ran:
        return "key 'result.average.over' does not list the tasks that ran"
    if ran and not _finite(avg.get("value"), 0.0, 1.0):
        return "key 'result.average.value' is not a number in [0, 1]"
    if ran and not math.isclose(avg["value"], math.fsum(tasks[k]["score"] for k in ran) / len(ran)):
        return "key 'result.average.value' is not the mean of the tasks' scores"
    return None


def progress(path: Path | None) -> str:
    """What an unfinished cell has saved so far: its perplexity windows, or 'no saved progress'."""
    part = partial_path(path) if path is not None else None
    if part is not None and part.is_file():
        from duquant.eval.perplexity import read_checkpoint

        saved = read_checkpoint(part)
        if saved is not None:
            return f"{len(saved['window_nll'])} windows done"
    return "no saved progress"
