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

Modules: `jobs` (the config and its method x weights jobs), `cache` (result keys and files), `report`
(the table), `run` (the loop); the evaluations, one entry each, are `duquant.eval.registry`'s, shared
with `duquant run`.
"""

from __future__ import annotations

from duquant.compare.cache import (
    cache_path,
    calibration_source,
    key_hash,
    load_cached,
    partial_path,
    progress,
    result_key,
)
from duquant.compare.jobs import (
    GPTQ_MARK,
    CompareConfig,
    Job,
    check_compare,
    jobs_of,
    needs_calibration,
    resolve,
    run_config,
)
from duquant.compare.report import build_table, plot_table, table_markdown, write_outputs
from duquant.compare.run import Cell, default_out, environment, plan, run_compare
from duquant.eval.registry import COLUMNS, EVALS, EVALUATIONS, ZS_COLUMNS, Evaluation, Session

__all__ = [
    "COLUMNS",
    "EVALS",
    "EVALUATIONS",
    "GPTQ_MARK",
    "ZS_COLUMNS",
    "Cell",
    "CompareConfig",
    "Evaluation",
    "Job",
    "Session",
    "build_table",
    "cache_path",
    "calibration_source",
    "check_compare",
    "default_out",
    "environment",
    "jobs_of",
    "key_hash",
    "load_cached",
    "needs_calibration",
    "partial_path",
    "plan",
    "plot_table",
    "progress",
    "resolve",
    "result_key",
    "run_compare",
    "run_config",
    "table_markdown",
    "write_outputs",
]
