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

Modules: `jobs` (the config and its method x weights jobs), `evals` (one entry per evaluation),
`cache` (result keys and files), `report` (the table), `run` (the loop).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from duquant.compare.cache import (
    cache_path,
    calibration_source,
    key_hash,
    load_cached,
    partial_path,
    progress,
    result_key,
)
from duquant.compare.evals import COLUMNS, EVALS, EVALUATIONS, ZS_COLUMNS, Evaluation, Session
from duquant.compare.jobs import (
    GPTQ_MARK,
    CompareConfig,
    Job,
    jobs_of,
    needs_calibration,
    resolve,
    run_config,
)
from duquant.compare.report import build_table, plot_table, table_markdown, write_outputs
from duquant.compare.run import Cell, default_out, environment, plan, run_compare
from duquant.config import ConfigError, add_arguments, from_namespace


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Register `duquant compare` on the CLI's subparsers (options generated from CompareConfig)."""
    p = subparsers.add_parser(
        "compare", help="methods x evaluations in one resumable command, with a Table-1 summary"
    )
    add_arguments(p, CompareConfig)
    p.set_defaults(func=compare_main)
    return p


def compare_main(args: argparse.Namespace) -> int:
    """`duquant compare`: run, print the table, say where the outputs are."""
    from duquant.cli import INTERRUPTED, fail

    prog = "duquant compare"
    try:
        cfg = from_namespace(CompareConfig, args)
    except (ConfigError, ValueError, OSError) as exc:
        return fail(prog, exc)
    try:
        table = run_compare(cfg)
    except KeyboardInterrupt:
        out = Path(cfg.out) if cfg.out else Path("results/<model>")
        print(
            f"{prog}: interrupted; finished results are kept in {out / 'cache'} (an unfinished "
            "perplexity cell's windows in cache/partial): run the same command to resume",
            file=sys.stderr,
        )
        return INTERRUPTED
    except (ValueError, FileNotFoundError, OSError, RuntimeError, ImportError) as exc:
        return fail(prog, exc)
    print(table_markdown(table))
    out = Path(cfg.out) if cfg.out else default_out(table["model"])
    print(f"wrote {out / 'table.md'}, {out / 'table.json'}, {out / 'table.png'}")
    return 0


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
    "add_compare_parser",
    "build_table",
    "cache_path",
    "calibration_source",
    "compare_main",
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
