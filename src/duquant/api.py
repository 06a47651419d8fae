"""The orchestration layer: the one path from a request to a result, which every command takes.

    resolve the request -> check everything before work -> load (in memory or streamed)
    -> calibrate -> quantize (the recipe's stages) -> evaluate (the registry) -> export

`duquant run`, `duquant demo`, `duquant compare`, `--stream` and `--save` all go through the
functions below; the command line and compare are thin callers. The one-call library face is
`quantize(...)`, in the spirit of llm-compressor's `oneshot`:

    import duquant
    model, report = duquant.quantize(recipe="best", nsamples=16, calib_seqlen=1024, save="out/")
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from duquant import distributed as dist
from duquant import export
from duquant._version import __version__
from duquant.config import ConfigError, QuantSettings, RunConfig, WeightQuantizer
from duquant.data import DataNotFoundError, calibration_windows, eval_text, wikitext2_rows
from duquant.eval.registry import (
    EVALUATIONS,
    Session,
    evaluation_for,
    is_perplexity,
    metrics_key,
    provenance,
)
from duquant.formats import QuantSpec
from duquant.gptq import check_gptq_options
from duquant.methods import Recipe, RecipeError, get_method, load_recipe, method_names
from duquant.models import LoadedModel, adapter_for
from duquant.models import load_model as load_plain_model
from duquant.models.loading import check_model_source, refuse_method
from duquant.pipeline import QuantConfig, QuantizeReport, online_flops_per_token, peak_rss_mb
from duquant.pipeline import quantize_model as run_stages
from duquant.stages import GPTQ, NormTweak, StageError

log = logging.getLogger(__name__)

# environment switches that change numerics: recorded with every result
NUMERIC_SWITCHES = ("DUQUANT_TRITON", "DUQUANT_COMPILE_CODEC")


@dataclass
class Plan:
    """A checked request: the run's settings, its recipe and its formats / weight quantizer."""

    cfg: RunConfig
    recipe: Recipe
    quant: QuantConfig

    @property
    def needs_windows(self) -> bool:
        """Whether quantizing reads calibration windows."""
        return needs_windows(self.recipe, self.quant)


# ----------------------------------------------------------------------------- resolve and check


def resolve_recipe(cfg: RunConfig) -> Recipe:
    """The run's recipe (`--recipe FILE` or the registered `--method`) with its overrides."""
    try:
        if cfg.recipe is not None:
            if cfg.method != "rtn":
                raise ConfigError("--recipe and --method name the method twice; give one of them")
            recipe = load_recipe(cfg.recipe)
        else:
            recipe = get_method(cfg.method)
        return recipe.overridden(**cfg.method_overrides())
    except (RecipeError, StageError) as exc:
        raise ConfigError(str(exc)) from None


def resolve_weights(cfg: QuantSettings, given: str | None, recipe: Recipe) -> str:
    """The weight quantizer: the recipe's GPTQ stage, else the command line's, else RTN; a
    conflict, or GPTQ options that have no meaning, are one line."""
    fixed = recipe.gptq
    if fixed is not None and given not in (None, WeightQuantizer.GPTQ):
        raise ConfigError(
            f"--weights {given}: method {recipe.name} quantizes weights with gptq; "
            "drop --weights or choose another method"
        )
    weights = WeightQuantizer.GPTQ if fixed is not None else WeightQuantizer(given or "rtn")
    command_line = _gptq_command_line(cfg)
    for name, value in (fixed.fixed() if fixed else {}).items():
        flag, given_value = command_line.get(name, (None, None))
        if given_value is not None and given_value != value:
            raise ConfigError(
                f"{flag} {given_value}: method {recipe.name} uses {value}; "
                "drop the option or choose another method"
            )
    if weights == WeightQuantizer.GPTQ:
        g = gptq_stage(cfg, recipe)
        spec = QuantSpec(str(cfg.format), cfg.resolved_rules()[0], str(cfg.rounding))
        try:
            check_gptq_options(
                spec, g.act_order, g.act_order_scope, g.static_groups, g.scale_search
            )
        except ValueError as exc:
            raise ConfigError(f"--method {recipe.name}: {exc}") from None
    return str(weights)


def _gptq_command_line(cfg: QuantSettings) -> dict[str, tuple[str, Any]]:
    """GPTQ option -> (its flag, the value the command line gives, None when left at default)."""
    base = GPTQ()
    given = {
        "act_order": ("--act-order", cfg.act_order or None),
        "hessian": ("--gptq-hessian", str(cfg.gptq_hessian)),
        "target": ("--gptq-target", str(cfg.gptq_target)),
        "target_damp": ("--gptq-target-damp", cfg.gptq_target_damp),
        "scale_search": (
            "--gptq-scale-search",
            cfg.gptq_scale_search and str(cfg.gptq_scale_search),
        ),
    }
    return {k: (flag, None if v == getattr(base, k) else v) for k, (flag, v) in given.items()}


def gptq_stage(cfg: QuantSettings, recipe: Recipe) -> GPTQ:
    """The GPTQ options of a run: the command line's, overridden by those the recipe fixes."""
    g = GPTQ(
        act_order=cfg.act_order,
        hessian=str(cfg.gptq_hessian),
        target=str(cfg.gptq_target),
        target_damp=cfg.gptq_target_damp,
        scale_search=str(cfg.gptq_scale_search or "none"),
    )
    return replace(g, **recipe.gptq.fixed()) if recipe.gptq else g


def quant_config(cfg: QuantSettings, recipe: Recipe, weights: str) -> QuantConfig:
    """The weight and activation specs of a run and its weight quantizer."""
    w_rule, a_rule = cfg.resolved_rules()
    fmt, rounding = str(cfg.format), str(cfg.rounding)
    return QuantConfig(
        QuantSpec(fmt, w_rule, rounding),
        QuantSpec(fmt, a_rule, rounding),
        weights=weights,
        gptq=gptq_stage(cfg, recipe),
    )


def check_eval_file(name: str, seqlen: int) -> None:
    """An evaluation text named by path: an existing UTF-8 file long enough for one window of
    `seqlen` tokens (a token covers at least one byte; 2 spare for BOS and a word-start marker)."""
    try:
        text, _ = eval_text(name)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--eval {name}: {exc}; give a UTF-8 text file") from None
    if not text.strip():
        raise ConfigError(f"--eval {name}: the file is empty; give a text with at least one window")
    size = len(text.encode("utf-8"))
    if size + 2 < seqlen:
        raise ConfigError(
            f"--eval {name}: {size} bytes make fewer than one window of --seqlen {seqlen} tokens; "
            "give a longer text or a smaller --seqlen"
        )


def check_evals(names: list[str], cfg: QuantSettings, streamed: bool = False) -> None:
    """Every evaluation is known (a registry name or a text file) and its settings valid."""
    for name in names:
        try:
            ev = evaluation_for(name)
        except ValueError as exc:
            raise ConfigError(f"--eval {name}: {exc}") from None
        if name not in EVALUATIONS:  # a text file
            check_eval_file(name, cfg.seqlen)
        if streamed and not is_perplexity(ev):
            raise ConfigError(
                f"--eval {name}: a --stream run evaluates perplexity only (wikitext2, c4 or a text "
                "file); drop --stream for it"
            )
    if cfg.tasks is not None:
        from duquant.eval.zeroshot import TASKS

        bad = [t for t in cfg.tasks if t not in TASKS]
        if bad or not cfg.tasks:
            raise ConfigError(f"--tasks {','.join(bad)}: unknown; choose from {', '.join(TASKS)}")


def check_settings(cfg: QuantSettings, recipe: Recipe) -> None:
    """What the model source and the recipe's stages say about the shared settings."""
    if cfg.model is not None:
        check_model_source(cfg.model)
        refuse_method(cfg.model, recipe)  # e.g. QuaRot on Gemma 3, before anything loads
    quant = quant_config(cfg, recipe, "rtn")
    for stage in recipe.stages:
        try:
            stage.check_quant(quant)
        except ValueError as exc:
            raise ConfigError(f"--method {recipe.name}: {exc}") from None


def check(cfg: RunConfig) -> Plan:
    """Everything about a run that can be refused before any model is loaded: the recipe and its
    options, the weight quantizer, the model source, the evaluations, streaming and the export.
    Raises ConfigError (one line); returns the checked plan."""
    check_paths(cfg)
    if cfg.model is not None:
        check_model_source(cfg.model)  # config.json read and validated before anything else
    recipe = resolve_recipe(cfg)
    cfg.weights = WeightQuantizer(resolve_weights(cfg, cfg.weights, recipe))
    quant = quant_config(cfg, recipe, str(cfg.weights))
    check_settings(cfg, recipe)
    if cfg.stream:
        cfg.check_stream()
    check_evals(cfg.evals, cfg, streamed=cfg.stream)
    check_data(cfg, needs_windows(recipe, quant))
    check_distributed(cfg, needs_windows(recipe, quant))
    check_norm_batch(cfg, recipe)
    if recipe.conflict:
        raise ConfigError(recipe.conflict)
    if cfg.stream and recipe.whole_model_step:
        raise ConfigError(
            f"--stream: method {recipe.name} {recipe.whole_model_step}; drop --stream to "
            "load the model in memory"
        )
    # an export is evaluated as it is (method fp), not quantized again
    if cfg.model and recipe.quantize and export.find_loader(cfg.model) is not None:
        raise ConfigError(
            f"{cfg.model} is an exported (already quantized) checkpoint; evaluate it with "
            "--method fp, or quantize the original model"
        )
    if cfg.save is not None:
        try:
            export.check(recipe, quant, cfg.save, cfg.overwrite, streamed=cfg.stream)
        except export.ExportError as exc:
            raise ConfigError(str(exc)) from None
    return Plan(cfg, recipe, quant)


def check_distributed(cfg: QuantSettings, calibrates: bool) -> None:
    """Under torchrun: a valid launch, a device this rank has, and calibration windows the world
    shares evenly (each rank must carry the same number through the blocks)."""
    if not dist.launched():
        return
    try:
        _, world, _ = dist.env_world()
        dist.check_device(cfg.device)
        if calibrates:
            dist.check_divides(cfg.nsamples, "calibration windows (--nsamples)", world)
    except dist.DistributedError as exc:
        raise ConfigError(str(exc)) from None


def check_norm_batch(cfg: QuantSettings, recipe: Recipe) -> None:
    """Norm tweaking's batch within the calibration windows."""
    stage = recipe.get(NormTweak)
    if stage is None or stage.epochs == 0:
        return
    from duquant.learn.norms import check_batch

    try:
        check_batch(stage.batch, cfg.nsamples)
    except ValueError as exc:
        raise ConfigError(f"--method {recipe.name}: {exc}") from None


def check_data(cfg: RunConfig, calibrates: bool) -> None:
    """The data a run reads that can be checked without the model, refused before it loads: every
    registered evaluation's data present and readable (WikiText-2 and a local C4 shard read and
    decoded; lm-eval installed and LAMBADA's data there), and, when the run calibrates, the
    calibration text (a text file's evaluation is read by check_eval_file)."""
    # WikiText-2 can be missing or malformed only in a data folder the user gave (the package
    # ships its test and validation splits; the hub's copy is read through `datasets`)
    local = bool(os.environ.get("DUQUANT_DATA_DIR"))
    for name in cfg.evals:
        if name not in EVALUATIONS or (name == "wikitext2" and not local):
            continue
        ev = EVALUATIONS[name]
        try:
            if not is_perplexity(ev):
                ev.prepare(Session(cfg), 0)  # lm-eval's: reads settings only, no tokenizer
                continue
            state = ev.fingerprint(cfg)  # WikiText-2 read and decoded; C4 located
            if state["status"] == "missing":
                raise DataNotFoundError(f"data missing: {state['reason']}")
            origin = state["source"].get("origin", "")
            if name == "c4" and not origin.startswith("hub:"):
                _check_c4_file(Path(origin))
        except (ValueError, OSError) as exc:  # DataNotFoundError is an OSError
            message = str(exc).removeprefix(f"--eval {name}: ")
            raise ConfigError(f"--eval {name}: {message}") from None
    if calibrates and local:
        try:
            try:
                wikitext2_rows("train")
            except DataNotFoundError:
                wikitext2_rows("validation")
        except (ValueError, OSError) as exc:
            raise ConfigError(f"calibration data: {exc}") from None


def _check_c4_file(path: Path) -> None:
    """A local C4 shard: gzip JSON lines, each an object with a text `text` (ValueError naming it)."""
    import gzip
    import json
    import zlib

    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    doc = json.loads(line)
                    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                        raise ValueError(f"line {n} is not an object with a text 'text'")
    # BadGzipFile, damaged deflate data, truncated, not JSON, not UTF-8
    except (OSError, EOFError, zlib.error, ValueError, RecursionError) as exc:
        raise ValueError(f"{path} is not a C4 shard (gzip JSON lines): {exc}") from None


def path_overlap(a: str | Path, b: str | Path) -> str | None:
    """How path `a` overlaps path `b` ('is the same path as', 'is inside', 'contains'), or None:
    real paths compared (symlinks resolved, `~` expanded; a hard link is the same file)."""
    ra = Path(os.path.realpath(Path(a).expanduser()))
    rb = Path(os.path.realpath(Path(b).expanduser()))
    if ra == rb or (ra.exists() and rb.exists() and os.path.samefile(ra, rb)):
        return "is the same path as"
    if rb in ra.parents:
        return "is inside"
    if ra in rb.parents:
        return "contains"
    return None


def check_paths(cfg: RunConfig) -> None:
    """Refuse, before anything is read or loaded, an output (--output, --save, --work-dir) that is,
    is inside or contains an input (the model, a --recipe or --eval file) or another output: a
    run must never write over, into or around what it reads. One exception: a result file
    (--output) that does not exist yet may go inside an input folder (it changes no file there),
    but not inside --save (the export replaces that folder)."""
    from duquant.models import default_model

    model = cfg.model
    if model is None:
        try:
            model = default_model()
        except FileNotFoundError:
            model = None
    inputs = [("--model", model), ("--recipe", cfg.recipe)]
    inputs += [("--eval", name) for name in cfg.evals if name not in EVALUATIONS]
    inputs = [(flag, p) for flag, p in inputs if p is not None and Path(p).expanduser().exists()]
    outputs = [("--output", cfg.output), ("--save", cfg.save), ("--work-dir", cfg.work_dir)]
    outputs = [(flag, p) for flag, p in outputs if p is not None]
    for i, (flag, path) in enumerate(outputs):
        for other_flag, other in inputs + outputs[i + 1 :]:
            how = path_overlap(path, other)
            # a new result file inside an input folder adds a file and changes none: allowed
            new_file = flag == "--output" and not Path(path).exists()
            if how is not None and not (how == "is inside" and new_file and other_flag != "--save"):
                raise ConfigError(
                    f"{flag} {path}: {how} {other_flag} {other}; write the output apart from "
                    "the inputs and the other outputs"
                )


def needs_windows(recipe: Recipe, quant: QuantConfig) -> bool:
    """Whether quantizing with `recipe` / `quant` reads calibration windows."""
    return recipe.quantize and (recipe.needs_windows or quant.weights == "gptq")


# ----------------------------------------------------------------------------- load and quantize


def load_model(
    source: str | None = None, dtype: str = "float32", device: str = "cpu"
) -> LoadedModel:
    """Load any model source: an export (through its exporter's loader, online transforms
    applied), a Hugging Face folder or id, or a GGUF file (None: the default model)."""
    if source is not None:
        check_model_source(source)
        mod = export.find_loader(Path(source).expanduser())
        if mod is not None:
            from duquant.models.loading import DTYPES

            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; choose one of {tuple(DTYPES)}")
            model, tokenizer = mod.load(Path(source).expanduser(), DTYPES[dtype], device)
            return LoadedModel(model, tokenizer, source)
    return load_plain_model(source, dtype, device)


def calibrate(plan: Plan, tokenizer) -> tuple[torch.Tensor | None, dict | None, float]:
    """The calibration windows the plan needs (None when it needs none), their record, seconds."""
    if not plan.needs_windows:
        return None, None, 0.0
    t = time.perf_counter()
    cfg = plan.cfg
    windows, info = calibration_windows(tokenizer, cfg.nsamples, cfg.calib_seqlen, cfg.seed)
    return windows, asdict(info), time.perf_counter() - t


def quantize_loaded(plan: Plan, model: torch.nn.Module, windows, store=None) -> QuantizeReport:
    """Run the plan's recipe on `model` in place (block by block from `store` when streamed)."""
    adapter = adapter_for(model)
    return run_stages(
        model, adapter, plan.recipe, plan.quant, windows, seed=plan.cfg.seed, store=store
    )


def record(plan: Plan, source: str) -> dict:
    """The result's config record: everything needed to reproduce the run."""
    recipe, quant = plan.recipe, plan.quant
    return {
        "run": plan.cfg.to_dict(),
        "model_source": source,
        "method": recipe.to_dict(),
        "weights": asdict(quant.weight) if recipe.quantize else None,
        "activations": asdict(quant.act) if recipe.quantize else None,
        "weight_quantizer": quant.weights,
        "gptq": asdict(quant.gptq) if quant.weights == "gptq" else None,
        "duquant_version": __version__,
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "switches": {k: os.environ.get(k) for k in NUMERIC_SWITCHES},
    }


# ----------------------------------------------------------------------------- evaluate


def prepare_evals(cfg: QuantSettings, names: list[str], tokenizer, vocab_rows: int) -> Session:
    """The evaluation session with every evaluation's data loaded and checked (before quantizing)."""
    session = Session(cfg, tokenizer)
    for name in names:
        evaluation_for(name).prepare(session, vocab_rows)
    return session


def evaluate(model, session: Session, names: list[str], label: str) -> dict:
    """Every named evaluation of `model`: {metrics key: result}."""
    out = {}
    for name in names:
        res = evaluation_for(name).run(model, session, f"{label} {name}", None)
        out[metrics_key(name)] = res
        if "ppl" in res:
            log.info("%s %s ppl %.3f over %d windows", label, name, res["ppl"], res["windows"])
    return out


# ----------------------------------------------------------------------------- run


def run(cfg: RunConfig, loaded: LoadedModel | None = None, plan: Plan | None = None) -> dict:
    """Check, load (unless `loaded`), quantize, evaluate and (with cfg.save) export one run;
    return {'config': ..., 'metrics': ...[, 'export': ...]}."""
    plan = plan or check(cfg)
    dist.init(cfg.device, cfg.dist_timeout)
    if cfg.stream:
        return run_streamed(plan)
    torch.manual_seed(cfg.seed)
    loaded = loaded or load_model(cfg.model, str(cfg.dtype), cfg.device)
    model, tok = loaded.model, loaded.tokenizer
    session = prepare_evals(cfg, cfg.evals, tok, _vocab_rows(model))
    config = record(plan, loaded.source)
    metrics: dict = {}
    windows, calib, seconds = calibrate(plan, tok) if plan.recipe.quantize else (None, None, 0.0)
    if calib is not None:
        config["calibration"] = calib
        metrics["calibration_data_seconds"] = seconds
    report = quantize_loaded(plan, model, windows)
    metrics["quantize_seconds"] = report.seconds
    metrics["quantize_peak_rss_mb"] = report.peak_rss_mb
    metrics["online_flops_per_token"] = online_flops_per_token(model)
    if report.layer_errors:
        metrics["layer_errors"] = report.layer_errors
    if report.norm_tuning:  # norm tweaking's KL per epoch, steps, whether steps split by tokens
        metrics["norm_tuning"] = report.norm_tuning
    metrics.update(evaluate(model, session, cfg.evals, plan.recipe.name))
    _ranks(metrics, report.peak_rss_mb)
    result = {"config": config, "metrics": metrics}
    if cfg.save is not None:
        on_main(lambda: export_model(plan, loaded, result))
    return result


def _ranks(metrics: dict, quantize_peak_mb: float) -> None:
    """The world size and every rank's peak memory (quantization, whole run) in `metrics`."""
    metrics["world_size"] = dist.world()
    metrics["quantize_peak_rss_mb_per_rank"] = dist.gather_list([quantize_peak_mb])
    metrics["peak_rss_mb_per_rank"] = dist.gather_list([peak_rss_mb()])


def on_main(fn) -> None:
    """Run `fn` (a write: export, results) on rank 0 only; every rank learns whether it worked,
    so a failed write ends them all instead of leaving them waiting."""
    if not dist.active():
        fn()
        return
    error = None
    if dist.is_main():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are told
            error = exc
    if not dist.agree(error is None):
        if error is not None:
            raise error
        raise dist.PeerFailed("rank 0 could not write the results (its message says why)")


def export_model(plan: Plan, loaded: LoadedModel, result: dict) -> None:
    """Export the quantized in-memory model to cfg.save (atomic), recording it in `result`."""
    cfg = plan.cfg
    calib = None
    act = plan.quant.act
    if act is not None and export.exporter().needs_activation_calibration(act):
        calib, _ = calibration_windows(loaded.tokenizer, cfg.nsamples, cfg.calib_seqlen, cfg.seed)
    figures = export.save(
        loaded.model, loaded.tokenizer, cfg.save, result, cfg.overwrite, calib=calib
    )
    result["export"] = {"dir": str(cfg.save), **figures}
    log.info("exported to %s", cfg.save)


def run_streamed(plan: Plan) -> dict:
    """`run` for models larger than memory: quantize and evaluate block by block from safetensors,
    the quantized blocks kept in cfg.work_dir (a temporary folder when None); with cfg.save, then
    export shard by shard."""
    from transformers import AutoConfig, AutoTokenizer

    from duquant.stream import open_for_quantization, streamed_nll

    cfg = plan.cfg
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    work_root = cfg.work_dir
    session = prepare_evals(cfg, cfg.evals, tok, AutoConfig.from_pretrained(cfg.model).vocab_size)
    config = record(plan, cfg.model)
    windows, calib, _ = calibrate(plan, tok)
    if calib is not None:
        config["calibration"] = calib
    work = Path(work_root) if work_root else Path(tempfile.mkdtemp(prefix="duquant-stream-"))
    if work_root and dist.active():  # each rank keeps its own quantized blocks
        work = work / f"rank-{dist.rank()}-of-{dist.world()}"
    try:
        from duquant.models.streaming import work_fingerprint

        model, adapter, store = open_for_quantization(
            cfg.model, windows, work, cfg.device, cfg.max_activation_mb,
            fingerprint=work_fingerprint(cfg.model, config),
        )  # fmt: skip
        report = run_stages(
            model, adapter, plan.recipe, plan.quant, windows, seed=cfg.seed, store=store
        )
        metrics: dict = {"quantize_seconds": report.seconds, "quantize_peak_rss_mb": peak_rss_mb()}
        if report.norm_tuning:
            metrics["norm_tuning"] = report.norm_tuning
        for name in cfg.evals:
            start = time.perf_counter()
            ids = evaluation_for(name).token_ids(session)
            n = ids.numel() // cfg.seqlen
            n = min(n, cfg.max_windows) if cfg.max_windows else n
            evals = ids[: n * cfg.seqlen].reshape(n, cfg.seqlen).to(cfg.device)
            nll = streamed_nll(model, adapter, store, evals)
            metrics[metrics_key(name)] = {
                "ppl": math.exp(nll),
                "nll": nll,
                "windows": n,
                "seqlen": cfg.seqlen,
                "tokens": n * (cfg.seqlen - 1),
                "seconds": time.perf_counter() - start,
                "streamed": True,
                **provenance(session, name),
            }
        metrics["peak_rss_mb"] = peak_rss_mb()
        _ranks(metrics, report.peak_rss_mb)
        result = {"config": config, "metrics": metrics}
        if cfg.save is not None:

            def save() -> None:
                figures = export.save_streamed(
                    model, adapter, store, tok, cfg.save, result, cfg.overwrite
                )
                result["export"] = {"dir": str(cfg.save), **figures}
                metrics["peak_rss_mb_after_export"] = peak_rss_mb()  # the process high-water mark
                log.info("exported to %s", cfg.save)

            on_main(save)
    finally:
        if cfg.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return result


def check_demo(cfg: RunConfig) -> list[Plan]:
    """The demo's two runs, FP then RTN, both checked before the model loads."""
    return [check(replace(cfg, method="fp")), check(replace(cfg, method="rtn"))]


def demo(plans: list[Plan]) -> list[dict]:
    """Run the checked plans on one loaded model (rtn replaces layers in place: last)."""
    cfg = plans[0].cfg
    loaded = load_model(cfg.model, str(cfg.dtype), cfg.device)
    return [run(p.cfg, loaded, p) for p in plans]


def check_analyze(cfg) -> None:
    """`duquant analyze`'s methods are registered recipes and its model can load."""
    unknown = [m for m in cfg.methods if m not in method_names()]
    if unknown:
        raise ConfigError(
            f"--methods {','.join(cfg.methods)}: unknown; choose from {', '.join(method_names())}"
        )
    if cfg.model is not None:
        check_model_source(cfg.model)


def analyze(cfg) -> list[Path]:
    """`duquant analyze`: CSV and PNGs of per-layer errors and outlier profiles; the paths."""
    from duquant.analyze import analyze as measure
    from duquant.analyze import plot, write_csv

    loaded = load_model(cfg.model)
    windows, _ = calibration_windows(loaded.tokenizer, cfg.nsamples, cfg.calib_seqlen, cfg.seed)
    spec = QuantSpec("mxfp4", str(cfg.scale_rule))
    rows = measure(loaded.model, adapter_for(loaded.model), windows, cfg.methods, spec, cfg.seed)
    out = Path(cfg.out)
    write_csv(rows, out / "errors.csv")
    return [*plot(rows, out, Path(loaded.source).stem), out / "errors.csv"]


def quantize(
    model: str | None = None,
    recipe: str | Recipe = "best",
    calibration: torch.Tensor | None = None,
    save: str | None = None,
    evals: list[str] | None = None,
    **settings: Any,
) -> tuple[torch.nn.Module, dict]:
    """Quantize `model` (a path, id or GGUF; None: the default model) with `recipe` (a registered
    name, a YAML file or a Recipe) in one call; optionally evaluate (`evals`) and export (`save`).
    `calibration`: your own token windows (n x seqlen ids) instead of WikiText-2's. `settings` are
    RunConfig's (nsamples, calib_seqlen, seed, format, ...). Returns the quantized model and its
    result record; bad settings raise ConfigError before anything loads."""
    plan = _library_plan(model, recipe, save, evals, settings)
    cfg = plan.cfg
    windows = None if calibration is None else check_calibration(calibration)
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, str(cfg.dtype), cfg.device)
    if evals and windows is None:  # exactly `duquant run`
        return loaded.model, run(cfg, loaded, plan)
    session = prepare_evals(cfg, evals or [], loaded.tokenizer, _vocab_rows(loaded.model))
    if windows is None:
        windows, calib, _ = calibrate(plan, loaded.tokenizer)
    else:
        calib = user_calibration_record(windows)
    report = quantize_loaded(plan, loaded.model, windows)
    metrics = {"quantize_seconds": report.seconds, "quantize_peak_rss_mb": report.peak_rss_mb}
    metrics.update(evaluate(loaded.model, session, evals or [], plan.recipe.name))
    result = {"config": {**record(plan, loaded.source), "calibration": calib}, "metrics": metrics}
    if save is not None:
        export_model(plan, loaded, result)
    return loaded.model, result


def _library_plan(model, recipe, save, evals, settings: dict) -> Plan:
    """The checked plan of a `quantize` call (a Recipe object checked like a recipe file)."""
    names = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ConfigError(f"duquant.quantize: unknown setting(s) {', '.join(unknown)}")
    by_file = isinstance(recipe, str) and recipe.endswith((".yaml", ".yml"))
    cfg = RunConfig(
        model=model,
        method=recipe if isinstance(recipe, str) and not by_file else "rtn",
        recipe=recipe if by_file else None,
        save=save,
        evals=evals or ["wikitext2"],
        **settings,
    )
    plan = check(cfg)
    if isinstance(recipe, Recipe):
        custom = recipe.overridden(**cfg.method_overrides())
        weights = resolve_weights(cfg, None, custom)
        plan = Plan(cfg, custom, quant_config(cfg, custom, weights))
        check_settings(cfg, custom)
        if save is not None:
            try:
                export.check(custom, plan.quant, save, cfg.overwrite)
            except export.ExportError as exc:
                raise ConfigError(str(exc)) from None
    return plan


def _vocab_rows(model: torch.nn.Module) -> int:
    """Rows of the model's input embedding (token ids must stay below)."""
    return model.get_input_embeddings().num_embeddings


def check_calibration(windows: Any) -> torch.Tensor:
    """User calibration windows: a 2-D integer tensor of token ids (n windows x seqlen)."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point():
        raise ConfigError(
            "calibration: give a 2-D integer tensor of token ids (windows x tokens), e.g. "
            "tokenizer(texts, return_tensors='pt').input_ids"
        )
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ConfigError(
            f"calibration: {tuple(windows.shape)} is empty; give >= 1 window of >= 2 tokens"
        )
    return windows.long()


def user_calibration_record(windows: torch.Tensor) -> dict:
    """What a result records of user calibration windows: their shape and the sha256 of the ids."""
    import hashlib

    digest = hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()
    return {
        "source": "user",
        "nsamples": windows.shape[0],
        "seqlen": windows.shape[1],
        "sha256": digest,
    }
