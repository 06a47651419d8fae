"""Command line: `duquant run`, `duquant demo`."""

from __future__ import annotations

import argparse
import logging
import sys

from duquant.config import RunConfig
from duquant.formats import FORMATS
from duquant.methods import METHODS
from duquant.pipeline import HESSIAN_SOURCES


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that quantize and evaluate."""
    p.add_argument(
        "--model", default=None, help="HF id, local HF dir or .gguf file (default: SmolLM2-135M)"
    )
    p.add_argument("--format", default="mxfp4", choices=sorted(FORMATS))
    p.add_argument("--w-scale-rule", default=None, help="weight scale rule (default: the format's)")
    p.add_argument(
        "--a-scale-rule", default=None, help="activation scale rule (default: the format's)"
    )
    p.add_argument("--rounding", default="even", choices=["even", "away"])
    p.add_argument(
        "--weights",
        default="rtn",
        choices=["rtn", "gptq"],
        help="weight quantizer: round to nearest, or GPTQ on the same grid",
    )
    p.add_argument("--act-order", action="store_true", help="GPTQ act-order (MX groups kept whole)")
    p.add_argument(
        "--gptq-hessian",
        default="quantized",
        choices=HESSIAN_SOURCES,
        help="GPTQ Hessians from the transformed, quantized inputs each group sees (one partial "
        "block pass per group), or from the statistics pass's FP inputs (faster)",
    )
    p.add_argument("--alpha", type=float, default=None, help="smoothing strength α")
    p.add_argument("--block-size", type=int, default=None, help="rotation block size B")
    p.add_argument("--max-steps", type=int, default=None, help="greedy rotation steps")
    p.add_argument(
        "--eval",
        dest="evals",
        nargs="+",
        default=["wikitext2"],
        help="'wikitext2' and/or paths of UTF-8 text files",
    )
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument(
        "--max-windows", type=int, default=None, help="evaluate only the first N windows"
    )
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="calibration window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")


def _config(args: argparse.Namespace, method: str) -> RunConfig:
    """A RunConfig from parsed arguments."""
    fields = RunConfig.__dataclass_fields__
    return RunConfig(
        method=method, **{k: v for k, v in vars(args).items() if k in fields and k != "method"}
    )


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


def _analyze(args: argparse.Namespace) -> int:
    """`duquant analyze`: CSV and PNGs of per-layer errors and outlier profiles."""
    from pathlib import Path

    from duquant.analyze import analyze, plot, write_csv
    from duquant.data import calibration_windows
    from duquant.formats import QuantSpec
    from duquant.models import adapter_for, load_model

    loaded = load_model(args.model)
    windows, _ = calibration_windows(loaded.tokenizer, args.nsamples, args.calib_seqlen, args.seed)
    methods = [m for m in args.methods.split(",") if m]
    rows = analyze(
        loaded.model,
        adapter_for(loaded.model),
        windows,
        methods,
        QuantSpec("mxfp4", args.scale_rule),
        args.seed,
    )
    out = Path(args.out)
    write_csv(rows, out / "errors.csv")
    for p in plot(rows, out, Path(loaded.source).stem):
        print(f"wrote {p}")
    print(f"wrote {out / 'errors.csv'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `duquant` console script."""
    parser = argparse.ArgumentParser(prog="duquant", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p_run = sub.add_parser("run", help="quantize one model with one method and evaluate it")
    p_run.add_argument("--method", default="rtn", choices=sorted(METHODS))
    p_run.add_argument("--output", default=None, help="write the result JSON here")
    p_run.add_argument(
        "--save",
        default=None,
        metavar="DIR",
        help="export the quantized model (compressed-tensors)",
    )
    p_run.add_argument(
        "--overwrite", action="store_true", help="let --save replace a non-empty DIR"
    )
    _add_run_args(p_run)

    p_demo = sub.add_parser(
        "demo", help="FP vs RTN MXFP4 W4A4 perplexity on the default model, a few windows"
    )
    p_demo.add_argument("--output", default="results/demo.json")
    _add_run_args(p_demo)
    p_demo.set_defaults(max_windows=4, seqlen=1024)

    p_an = sub.add_parser(
        "analyze", help="per-layer MXFP4 error of original vs rotated activations"
    )
    p_an.add_argument("--model", default=None)
    p_an.add_argument(
        "--methods",
        default="random-hadamard,duquant++",
        help="comma list of methods whose input transforms to compare",
    )
    p_an.add_argument("--scale-rule", default="ocp")
    p_an.add_argument("--nsamples", type=int, default=8)
    p_an.add_argument("--calib-seqlen", type=int, default=512)
    p_an.add_argument("--seed", type=int, default=0)
    p_an.add_argument("--out", default="results/analyze")

    from duquant.compare import add_compare_parser

    add_compare_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "compare":
        return args.func(args)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from duquant.runner import run, write_json  # heavy imports after argument errors

    try:
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "run":
            from duquant import export

            results = [export.run_and_save(_config(args, args.method), args.save, args.overwrite)]
        else:
            from duquant.models import load_model

            loaded = load_model(args.model, args.dtype, args.device)
            results = [run(_config(args, "fp"), loaded)]
            results.append(
                run(_config(args, "rtn"), loaded)
            )  # rtn replaces layers in place: run last
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        print(f"duquant: error: {exc}", file=sys.stderr)
        return 2
    print(_table(results))
    if results[0].get("export"):
        e = results[0]["export"]
        print(
            f"exported to {e['dir']} ({e['bits_per_quantized_weight']:.2f} bits a quantized weight)"
        )
    if args.output:
        write_json(results[0] if len(results) == 1 else {"runs": results}, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
