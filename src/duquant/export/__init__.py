"""Exporters: a quantized model out of the process, into a format an inference engine loads.

A small registry: each exporter is one module with `check_request(method, quant)` (refuse what it
cannot express, before any model is loaded), `write(model, tokenizer, dir, info)`, optionally
`write_streamed(model, adapter, store, tokenizer, dir, info)` (a model quantized block by block,
written shard by shard) and, when it can be read back, `is_checkpoint(path)` / `load(path, dtype, device)`. `save` and `check` are the two
calls the command line makes; writes are atomic (see `atomic`).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType

from duquant.export.atomic import ExportError, check_destination, staged_directory

log = logging.getLogger(__name__)

EXPORTERS = {"compressed-tensors": "duquant.export.ct"}
DEFAULT_TARGET = "compressed-tensors"


def exporter(target: str = DEFAULT_TARGET) -> ModuleType:
    """The exporter module of `target`, or a clear error listing the known ones."""
    if target not in EXPORTERS:
        raise ExportError(f"unknown export target {target!r}; choose one of {sorted(EXPORTERS)}")
    return importlib.import_module(EXPORTERS[target])


def check(
    recipe,
    quant,
    dest: str | Path,
    overwrite: bool = False,
    streamed: bool = False,
    target: str = DEFAULT_TARGET,
) -> None:
    """Everything about an export request that can be refused before the model loads: the
    destination, the recipe's stages, the formats."""
    check_destination(dest, overwrite)
    mod = exporter(target)
    mod.check_request(recipe, quant)
    if streamed and mod.needs_activation_calibration(quant.act):
        raise ExportError(
            f"--save with --stream: a {quant.act.format} export calibrates a static activation "
            "scale over the whole model, which a streamed run does not do; export mxfp4, or drop "
            "--stream"
        )


def export_info(result: dict) -> dict:
    """What the sidecar records of a run: its configuration, calibration data and perplexities."""
    config = result.get("config", {})
    metrics = result.get("metrics", {})
    ppl = {k: v for k, v in metrics.items() if isinstance(v, dict) and "ppl" in v}
    calib = config.get("calibration") or {}
    return {
        "run": config.get("run", {}),
        "model_source": config.get("model_source"),
        "calibration_sha256": calib.get("sha256"),
        "perplexity": {
            k: {"ppl": v["ppl"], "windows": v["windows"], "seqlen": v.get("seqlen")}
            for k, v in ppl.items()
        },
        "config": config,
        "quantize_seconds": metrics.get("quantize_seconds"),
    }


def save(
    model,
    tokenizer,
    dest: str | Path,
    result: dict | None = None,
    overwrite: bool = False,
    target: str = DEFAULT_TARGET,
    calib=None,
) -> dict:
    """Write `model` (quantized in process) to `dest` atomically; return the exporter's figures.

    `calib`: calibration windows, for formats whose export calibrates a static activation scale."""
    mod = exporter(target)
    with staged_directory(dest, overwrite) as tmp:
        figures = mod.write(model, tokenizer, tmp, export_info(result or {}), calib)
    return figures


def save_streamed(
    model,
    adapter,
    store,
    tokenizer,
    dest: str | Path,
    result: dict | None = None,
    overwrite: bool = False,
    target: str = DEFAULT_TARGET,
) -> dict:
    """Write a model quantized block by block (its blocks in `store`) to `dest` atomically, shard by
    shard; return the exporter's figures."""
    mod = exporter(target)
    with staged_directory(dest, overwrite) as tmp:
        figures = mod.write_streamed(
            model, adapter, store, tokenizer, tmp, export_info(result or {})
        )
    return figures


def find_loader(path: str | Path) -> ModuleType | None:
    """The exporter that recognises `path` as its checkpoint, or None (an ExportError when its
    config.json is not a JSON object: nothing could load it)."""
    if not Path(path).is_dir():
        return None
    for target in EXPORTERS:
        mod = exporter(target)
        if hasattr(mod, "is_checkpoint") and mod.is_checkpoint(path):
            return mod
    return None


__all__ = ["EXPORTERS", "ExportError", "check", "exporter", "find_loader", "save"]
