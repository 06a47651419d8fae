"""Quantize a model by a RunConfig and evaluate it: the library entry point behind `duquant run`."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import duquant
from duquant.config import RunConfig
from duquant.data import calibration_windows, eval_text
from duquant.eval.perplexity import perplexity
from duquant.formats import QuantSpec
from duquant.jsonio import write_json  # noqa: F401  (re-exported: runner.write_json)
from duquant.methods import get_method
from duquant.models import adapter_for, load_model
from duquant.pipeline import GPTQConfig, QuantConfig, online_flops_per_token, quantize_model

log = logging.getLogger(__name__)


def quant_config(cfg: RunConfig) -> QuantConfig:
    """The weight and activation specs of a run, and its weight quantizer with the GPTQ options
    the command line gives, overridden by those the method fixes (MethodConfig.gptq_overrides)."""
    w_rule, a_rule = cfg.resolved_rules()
    fmt, rounding = str(cfg.format), str(cfg.rounding)
    method = get_method(cfg.method)
    gptq = GPTQConfig(
        act_order=cfg.act_order,
        hessian=str(cfg.gptq_hessian),
        target=str(cfg.gptq_target),
        target_damp=cfg.gptq_target_damp,
        scale_search=str(cfg.gptq_scale_search or "none"),
    )
    return QuantConfig(
        QuantSpec(fmt, w_rule, rounding),
        QuantSpec(fmt, a_rule, rounding),
        weights=str(method.weights or cfg.weights),
        gptq=replace(gptq, **method.gptq_overrides()),
    )


def _plan(cfg: RunConfig, source: str) -> tuple:
    """(method, quant config, the result's config record) of a run."""
    method = get_method(cfg.method, **cfg.method_overrides())
    quant = quant_config(cfg)
    config: dict = {
        "run": cfg.to_dict(),
        "model_source": source,
        "method": asdict(method),
        "weights": asdict(quant.weight) if method.quantize else None,
        "activations": asdict(quant.act) if method.quantize else None,
        "weight_quantizer": quant.weights,
        "gptq": asdict(quant.gptq) if quant.weights == "gptq" else None,
        "duquant_version": duquant.__version__,
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }
    return method, quant, config


def eval_tokens(name: str, tokenizer, cfg: RunConfig, vocab_rows: int) -> tuple[torch.Tensor, dict]:
    """The token ids of evaluation `name` and its source, refused unless they make one window."""
    text, src = eval_text(name)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < cfg.seqlen:
        raise ValueError(
            f"--eval {name}: {ids.numel()} tokens, fewer than one window of --seqlen {cfg.seqlen}; "
            "give a longer text or a smaller --seqlen"
        )
    if ids.numel() and int(ids.max()) >= vocab_rows:
        raise ValueError(
            f"--eval {name}: the tokenizer emits id {int(ids.max())} but the model's embedding has "
            f"{vocab_rows} rows; use the tokenizer that belongs to this model"
        )
    return ids, asdict(src)


def run(cfg: RunConfig, loaded=None) -> dict:
    """Load (unless `loaded` is given), quantize and evaluate; return {'config': ..., 'metrics': ...}.

    Every evaluation text is tokenized and checked before calibration starts, so a text too short
    for one window costs seconds, not a quantization. `cfg.stream` runs the same steps one block at
    a time from a safetensors folder (`run_streamed`)."""
    if cfg.stream:
        return run_streamed(cfg)
    torch.manual_seed(cfg.seed)
    loaded = loaded or load_model(cfg.model, cfg.dtype, cfg.device)
    model, tok = loaded.model, loaded.tokenizer
    rows = model.get_input_embeddings().num_embeddings
    texts = {name: eval_tokens(name, tok, cfg, rows) for name in cfg.evals}
    adapter = adapter_for(model)
    method, quant, config = _plan(cfg, loaded.source)
    metrics: dict = {}
    windows = None
    if method.quantize and (method.needs_calibration or cfg.weights == "gptq"):
        t = time.perf_counter()
        windows, calib = calibration_windows(tok, cfg.nsamples, cfg.calib_seqlen, cfg.seed)
        config["calibration"] = asdict(calib)
        metrics["calibration_data_seconds"] = time.perf_counter() - t
    report = quantize_model(model, adapter, method, quant, windows, seed=cfg.seed)
    metrics["quantize_seconds"] = report.seconds
    metrics["quantize_peak_rss_mb"] = report.peak_rss_mb
    metrics["online_flops_per_token"] = online_flops_per_token(model)
    if report.layer_errors:
        metrics["layer_errors"] = report.layer_errors
    for name, (ids, src) in texts.items():
        res = perplexity(model, ids, cfg.seqlen, cfg.max_windows, desc=f"{cfg.method} {name}")
        res["source"] = src
        metrics[Path(name).name if name != "wikitext2" else name] = res
        log.info("%s %s ppl %.3f over %d windows", cfg.method, name, res["ppl"], res["windows"])
    return {"config": config, "metrics": metrics}


def run_streamed(cfg: RunConfig, dest: str | Path | None = None, overwrite: bool = False) -> dict:
    """`run` for models larger than memory: quantize and evaluate block by block from safetensors,
    the quantized blocks kept in `cfg.work_dir` (a temporary folder when None); with `dest`, then
    export it there shard by shard (`export.save_streamed`, checked by `export.check` before)."""
    import math
    import shutil
    import tempfile

    from transformers import AutoConfig, AutoTokenizer

    from duquant.pipeline import peak_rss_mb
    from duquant.stream import quantize_streaming, streamed_nll

    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    rows = AutoConfig.from_pretrained(cfg.model).vocab_size
    texts = {name: eval_tokens(name, tok, cfg, rows) for name in cfg.evals}
    method, quant, config = _plan(cfg, cfg.model)
    metrics: dict = {}
    windows = None
    if method.quantize and (method.needs_calibration or cfg.weights == "gptq"):
        windows, calib = calibration_windows(tok, cfg.nsamples, cfg.calib_seqlen, cfg.seed)
        config["calibration"] = asdict(calib)
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="duquant-stream-"))
    try:
        model, adapter, store, report = quantize_streaming(
            cfg.model, method, quant, windows, work, cfg.device, cfg.seed, cfg.max_activation_mb
        )
        metrics["quantize_seconds"] = report.seconds
        metrics["quantize_peak_rss_mb"] = peak_rss_mb()
        for name, (ids, src) in texts.items():
            start = time.perf_counter()
            n = ids.numel() // cfg.seqlen
            n = min(n, cfg.max_windows) if cfg.max_windows else n
            evals = ids[: n * cfg.seqlen].reshape(n, cfg.seqlen).to(cfg.device)
            nll = streamed_nll(model, adapter, store, evals)
            metrics[Path(name).name if name != "wikitext2" else name] = {
                "ppl": math.exp(nll),
                "nll": nll,
                "windows": n,
                "seqlen": cfg.seqlen,
                "tokens": n * (cfg.seqlen - 1),
                "seconds": time.perf_counter() - start,
                "streamed": True,
                "source": src,
            }
        metrics["peak_rss_mb"] = peak_rss_mb()
        result = {"config": config, "metrics": metrics}
        if dest is not None:
            from duquant.export import save_streamed

            figures = save_streamed(model, adapter, store, tok, dest, result, overwrite)
            result["export"] = {"dir": str(dest), **figures}
            metrics["peak_rss_mb_after_export"] = peak_rss_mb()  # the process high-water mark
            log.info("exported to %s", dest)
    finally:
        if cfg.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return result
