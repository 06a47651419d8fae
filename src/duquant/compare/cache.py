"""Compare's result cache: what a result's hash covers, where it lives, and reading it back."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import duquant
from duquant.compare.evals import EVALUATIONS
from duquant.compare.jobs import CompareConfig, Job, needs_calibration, resolve
from duquant.data import DataNotFoundError, wikitext2_rows

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
        # an unquantized method is its name: fields added to MethodConfig later cannot change it
        "method": asdict(method) if method.quantize else {"name": method.name, "quantize": False},
        "weights": job.weights,
        "quant": asdict(quant) if method.quantize else None,
        "seed": cfg.seed,
        "calibration": None,
        "eval": EVALUATIONS[name].settings(cfg),
        "data": data,
        "duquant_version": duquant.__version__,
    }
    if needs_calibration(method, quant):
        key["calibration"] = {
            "nsamples": cfg.nsamples,
            "seqlen": cfg.calib_seqlen,
            "seed": cfg.seed,
            "source": calib_source or calibration_source(),
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


def progress(path: Path | None) -> str:
    """What an unfinished cell has saved so far: its perplexity windows, or 'no saved progress'."""
    part = partial_path(path) if path is not None else None
    if part is not None and part.is_file():
        try:
            return f"{len(json.loads(part.read_text())['window_nll'])} windows done"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return "no saved progress"
