"""Command line: `duquant run`, `duquant demo`, `duquant analyze`, `duquant compare`.

Every option is generated from the config classes in `duquant.config`; arguments become a validated
config before any model is loaded, and every failure the user can fix is one line on stderr with exit
status 2 (Ctrl-C: one line saying what was kept, exit status 130).
"""

from __future__ import annotations

import argparse
import logging
import sys

from duquant.config import (
    AnalyzeConfig,
    ConfigError,
    RunConfig,
    add_arguments,
    from_namespace,
)

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


class _Help(argparse.HelpFormatter):
    """Help that shows an option's default where it has a meaningful one and the text names none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'duquant run: error: ... (see duquant run --help)', exit 2,
    and every option's default in its help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """Print one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(prog: str, exc: BaseException) -> int:
    """Report a user-fixable error in one line; exit status 2."""
    message = " ".join(str(exc).split("\n")[0].split())
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _table(results: list[dict]) -> str:
    """A short human table of methods x evaluations."""
    lines = [
        f"{'method':<14} {'format':<7} {'w/a rule':<22} {'eval':<12} {'ppl':>10} {'windows':>8} {'seconds':>8}"
    ]
    for r in results:
        run = r["config"]["run"]
        w = r["config"]["weights"] or {}
        a = r["config"]["activations"] or {}
        rules = f"{w.get('scale_rule', '-')}/{a.get('scale_rule', '-')}"
        for name, m in r["metrics"].items():
            if isinstance(m, dict) and "ppl" in m:
                lines.append(
                    f"{run['method']:<14} {run['format']:<7} {rules:<22} {name:<12} "
                    f"{m['ppl']:>10.3f} {m['windows']:>8} {m['seconds']:>8.1f}"
                )
    return "\n".join(lines)


def _analyze(cfg: AnalyzeConfig) -> int:
    """`duquant analyze`: CSV and PNGs of per-layer errors and outlier profiles."""
    from pathlib import Path

    from duquant.analyze import analyze, plot, write_csv
    from duquant.data import calibration_windows
    from duquant.formats import QuantSpec
    from duquant.models import adapter_for, load_model

    loaded = load_model(cfg.model)
    windows, _ = calibration_windows(loaded.tokenizer, cfg.nsamples, cfg.calib_seqlen, cfg.seed)
    rows = analyze(
        loaded.model,
        adapter_for(loaded.model),
        windows,
        cfg.methods,
        QuantSpec("mxfp4", str(cfg.scale_rule)),
        cfg.seed,
    )
    out = Path(cfg.out)
    write_csv(rows, out / "errors.csv")
    for p in plot(rows, out, Path(loaded.source).stem):
        print(f"wrote {p}")
    print(f"wrote {out / 'errors.csv'}")
    return 0


def _run(cfg: RunConfig, demo: bool) -> list[dict]:
    """`duquant run` (one method) or `duquant demo` (FP then RTN on one loaded model)."""
    if not demo:
        from duquant.export import run_and_save

        return [run_and_save(cfg)]
    from dataclasses import replace

    from duquant.models import load_model
    from duquant.runner import run

    loaded = load_model(cfg.model, str(cfg.dtype), cfg.device)
    results = [run(replace(cfg, method="fp"), loaded)]
    results.append(run(replace(cfg, method="rtn"), loaded))  # rtn replaces layers in place: last
    return results


def build_parser() -> argparse.ArgumentParser:
    """The `duquant` parser with every sub-command."""
    parser = Parser(prog="duquant", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p_run = sub.add_parser("run", help="quantize one model with one method and evaluate it")
    add_arguments(p_run, RunConfig)
    p_demo = sub.add_parser(
        "demo", help="FP vs RTN MXFP4 W4A4 perplexity on the default model, a few windows"
    )
    add_arguments(
        p_demo,
        RunConfig,
        defaults={"max_windows": 4, "seqlen": 1024, "output": "results/demo.json"},
        skip=("method", "weights", "save", "overwrite"),
    )
    p_an = sub.add_parser(
        "analyze", help="per-layer MXFP4 error of original vs rotated activations"
    )
    add_arguments(p_an, AnalyzeConfig)

    from duquant.compare import add_compare_parser

    add_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `duquant` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command == "compare":
        return args.func(args)
    prog = f"duquant {args.command}"
    try:
        cls = AnalyzeConfig if args.command == "analyze" else RunConfig
        cfg = from_namespace(cls, args)
    except (ConfigError, ValueError, OSError) as exc:
        return fail(prog, exc)
    from duquant.runner import write_json  # heavy imports after argument errors

    try:
        if isinstance(cfg, AnalyzeConfig):
            return _analyze(cfg)
        results = _run(cfg, demo=args.command == "demo")
        print(_table(results))
        if results[0].get("export"):
            e = results[0]["export"]
            bits = e["bits_per_quantized_weight"]
            print(f"exported to {e['dir']} ({bits:.2f} bits a quantized weight)")
        if cfg.output:
            write_json(results[0] if len(results) == 1 else {"runs": results}, cfg.output)
            print(f"wrote {cfg.output}")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        return fail(prog, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
