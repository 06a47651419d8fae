"""Compare's result cache: what a result's hash covers, where it lives, and reading it back."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from duquant._version import __version__
from duquant.compare.jobs import CompareConfig, Job, needs_calibration, resolve
from duquant.data import DataNotFoundError, wikitext2_rows
from duquant.eval.registry import evaluation_for, metrics_key

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
