"""Command line: `duquant run`, `duquant demo`, `duquant analyze`, `duquant compare`.

A thin caller of the orchestration layer (duquant.api): every option is generated from the config
classes in `duquant.config`; arguments become a config, `api.check` refuses what cannot run before
any model is loaded, and every failure the user can fix is one line on stderr with exit status 2
(Ctrl-C: one line saying what was kept, exit status 130).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from duquant import compare
from duquant import distributed as dist
from duquant.compare import CompareConfig, default_out, table_markdown
from duquant.config import (
    AnalyzeConfig,
    ConfigError,
    RunConfig,
    add_arguments,
    from_namespace,
)
from duquant.methods import method_names

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


# a message longer than this is cut (an exception may quote a whole file)
MESSAGE_LIMIT = 2000


def one_line(exc: BaseException) -> str:
    """The whole message of `exc` as one line: its lines joined, whitespace collapsed, at most
    MESSAGE_LIMIT characters (an exception without a message: its type's name)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if len(message) > MESSAGE_LIMIT:
        message = message[: MESSAGE_LIMIT - 1] + "…"
    return message


def fail(prog: str, exc: BaseException, checking: bool = False) -> int:
    """Report a user-fixable error in one line (the whole message, not its first line only: a
    wrapped error names the file, key or tensor further down); exit status 2.

    Under torchrun one line per cause: a check before the model loads fails alike on every rank
    of a node (its local rank 0 reports it), a rank stopped by another's failure stays silent
    (the failing rank reports), a rank other than 0 names itself.
    """
    if dist.launched():
        r, w, local = _launch_ranks()
        if (checking and local != 0) or (isinstance(exc, dist.PeerFailed) and r != 0):
            return 2
        if _peer_lost(exc):
            exc = dist.PeerFailed(
                f"another rank stopped or could not be reached ({_gist(exc)}); the failing "
                "rank's message says why"
            )
        if r != 0:
            print(f"{prog}: error: rank {r} of {w}: {one_line(exc)}", file=sys.stderr)
            return 2
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    return 2


def _launch_ranks() -> tuple[int, int, int]:
    """(rank, world, local rank) of a torchrun launch; (0, 1, 0) when its variables are broken
    (that error is reported as such)."""
    try:
        return dist.env_world()
    except dist.DistributedError:
        return 0, 1, 0


def _gist(exc: BaseException) -> str:
    """The first sentence of a backend's error, without its source location ("[file:line] ")."""
    text = one_line(exc).rsplit("] ", 1)[-1]
    return text.split(". ")[0].rstrip(".")


def _peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank went away."""
    return dist.active() and isinstance(exc, RuntimeError) and not isinstance(exc, ValueError)


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
        head = f"{run['method']:<14} {run['format']:<7} {rules:<22}"
        for name, m in r["metrics"].items():
            if isinstance(m, dict) and "ppl" in m:
                lines.append(
                    f"{head} {name:<12} {m['ppl']:>10.3f} {m['windows']:>8} {m['seconds']:>8.1f}"
                )
            elif isinstance(m, dict) and "tasks" in m:  # lm-eval tasks: accuracy, LAMBADA's PPL
                for task, t in m["tasks"].items():
                    if t.get("status") != "ok":
                        lines.append(f"{head} {task:<12} {t.get('status', 'missing'):>10}")
                        continue
                    value = f"acc {100 * t['score']:.1f}"
                    if t.get("perplexity") is not None:
                        value += f" (ppl {t['perplexity']:.2f})"
                    n, secs = t.get("n_examples", 0), t.get("seconds", 0.0)
                    lines.append(f"{head} {task:<12} {value:>10} {n:>8} {secs:>8.1f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The `duquant` parser with every sub-command."""
    parser = Parser(prog="duquant", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    methods = {"method": method_names()}
    p_run = sub.add_parser("run", help="quantize one model with one method and evaluate it")
    add_arguments(p_run, RunConfig, choices=methods)
    p_demo = sub.add_parser(
        "demo", help="FP vs RTN MXFP4 W4A4 perplexity on the default model, a few windows"
    )
    add_arguments(
        p_demo,
        RunConfig,
        defaults={"max_windows": 4, "seqlen": 1024, "output": "results/demo.json"},
        skip=("method", "recipe", "weights", "save", "overwrite"),
    )
    p_an = sub.add_parser(
        "analyze", help="per-layer MXFP4 error of original vs rotated activations"
    )
    add_arguments(p_an, AnalyzeConfig)

    p_cmp = sub.add_parser(
        "compare", help="methods x evaluations in one resumable command, with a Table-1 summary"
    )
    add_arguments(p_cmp, CompareConfig)
    return parser


def _compare(args: argparse.Namespace) -> int:
    """`duquant compare`: check, run (or resume), print the table, say where the outputs are."""
    prog = "duquant compare"
    try:
        cfg = from_namespace(CompareConfig, args)
        compare.check_compare(cfg)
    except (ConfigError, ValueError, OSError) as exc:
        return fail(prog, exc, checking=True)
    try:
        dist.init(cfg.device, cfg.dist_timeout)
        table = compare.run_compare(cfg)
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
    finally:
        dist.shutdown()
    if dist.launched() and _launch_ranks()[0] != 0:
        return 0  # rank 0 prints the table and wrote the files
    print(table_markdown(table))
    out = Path(cfg.out) if cfg.out else default_out(table["model"])
    print(f"wrote {out / 'table.md'}, {out / 'table.json'}, {out / 'table.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `duquant` console script."""
    args = build_parser().parse_args(argv)
    quiet = dist.launched() and _launch_ranks()[0] != 0  # rank 0 logs for the world
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if quiet:  # nor do transformers' loading bars show once per rank
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.command == "compare":
        return _compare(args)
    from duquant import api

    prog = f"duquant {args.command}"
    try:
        if args.command == "analyze":
            cfg = from_namespace(AnalyzeConfig, args)
            api.check_analyze(cfg)
        else:
            cfg = from_namespace(RunConfig, args)
            plans = api.check_demo(cfg) if args.command == "demo" else [api.check(cfg)]
    except (ConfigError, ValueError, OSError) as exc:
        return fail(prog, exc, checking=True)
    try:
        if isinstance(cfg, AnalyzeConfig):
            for path in api.analyze(cfg):
                print(f"wrote {path}")
            return 0
        results = api.demo(plans) if args.command == "demo" else [api.run(cfg, plan=plans[0])]
        if dist.is_main():
            _report(results, cfg.output)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        return fail(prog, exc)
    finally:
        dist.shutdown()
    return 0


def _report(results: list[dict], output: str | None) -> None:
    """Print the results' table and export, and write the result JSON."""
    from duquant.jsonio import write_json

    print(_table(results))
    if results[0].get("export"):
        e = results[0]["export"]
        bits = e["bits_per_quantized_weight"]
        print(f"exported to {e['dir']} ({bits:.2f} bits a quantized weight)")
    if output:
        write_json(results[0] if len(results) == 1 else {"runs": results}, output)
        print(f"wrote {output}")


if __name__ == "__main__":
    sys.exit(main())
