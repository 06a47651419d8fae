"""Methods x scale rules on one model, same calibration and evaluation windows for all; JSON + markdown.

python benchmarks/methods_table.py --methods fp,rtn,duquant++ --max-windows 16 --out results/methods
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from duquant.api import load_model, run
from duquant.config import RunConfig
from duquant.jsonio import write_json

DETERMINISTIC = {"fp", "rtn", "hadamard"}


def main() -> None:
    """Run every (method, rule, seed) on a fresh copy of the FP model and tabulate WikiText-2 PPL."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument(
        "--methods", default="fp,rtn,smoothquant,hadamard,smooth+hadamard,quarot,duquant,duquant++"
    )
    p.add_argument(
        "--rules",
        default="ocp",
        help="comma list of scale rules; RULE for weights and activations or W/A for separate ones",
    )
    p.add_argument("--seeds", default="0")
    p.add_argument("--format", default="mxfp4")
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--out", default="results/methods")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 when running several)"
    )
    p.add_argument("--weights", default="rtn", help="weight quantizer: rtn or gptq")
    p.add_argument("--gptq-hessian", default="quantized", choices=["quantized", "fp"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    out = Path(args.out)
    rows = []
    for method in args.methods.split(","):
        for rule in args.rules.split(","):
            w_rule, _, a_rule = rule.partition("/")
            a_rule = a_rule or w_rule
            ppls = []
            for seed in (int(s) for s in args.seeds.split(",")):
                cfg = RunConfig(
                    model=args.model,
                    method=method,
                    format=args.format,
                    w_scale_rule=w_rule,
                    a_scale_rule=a_rule,
                    max_windows=args.max_windows,
                    seqlen=args.seqlen,
                    nsamples=args.nsamples,
                    calib_seqlen=args.calib_seqlen,
                    seed=seed,
                    weights=args.weights,
                    gptq_hessian=args.gptq_hessian,
                )
                t = time.perf_counter()
                copy_ = copy.copy(loaded)
                copy_.model = copy.deepcopy(loaded.model)
                res = run(cfg, copy_)
                res["metrics"]["total_seconds"] = time.perf_counter() - t
                tag = "" if args.weights == "rtn" else f"_{args.weights}"
                if args.weights == "gptq" and args.gptq_hessian != "quantized":
                    tag += f"-{args.gptq_hessian}"
                name = rule.replace("/", "+")
                write_json(res, out / f"{method}{tag}_{name}_s{seed}.json")
                ppls.append(res["metrics"]["wikitext2"]["ppl"])
                print(
                    f"{method:<18} {rule:<18} seed {seed}: ppl {ppls[-1]:.3f} "
                    f"(quantize {res['metrics']['quantize_seconds']:.0f}s, total {res['metrics']['total_seconds']:.0f}s)",
                    flush=True,
                )
                if method in DETERMINISTIC:  # no calibration, no random signs: one seed says it all
                    break
            rows.append(
                {
                    "method": method,
                    "rule": rule,
                    "ppl": ppls,
                    "mean": statistics.mean(ppls),
                    "std": statistics.pstdev(ppls),
                }
            )
    md = [
        "| method | scale rule | WikiText-2 PPL (mean) | std | per seed |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['method']} | {r['rule'] if r['method'] != 'fp' else '-'} | {r['mean']:.2f} | "
            f"{r['std']:.2f} | {', '.join(f'{x:.2f}' for x in r['ppl'])} |"
        )
    (out / "table.md").write_text("\n".join(md) + "\n")
    write_json({"args": vars(args), "rows": rows}, out / "table.json")
    print("\n".join(md))


if __name__ == "__main__":
    main()
