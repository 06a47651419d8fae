"""End-to-end quantization wall time and peak RSS of one method at several calibration sizes.

Each size runs in its own subprocess (so its peak RSS is its own), quantization only (no evaluation),
model loading and calibration-text tokenisation excluded from the wall time:

python benchmarks/bench_quantize.py --method duquant++ --weights gptq --sizes 16x512,128x2048 \
    --threads 2 --out results/bench/quantize_dqpp_gptq.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, write_json


def quantize_only(cfg) -> dict:
    """`duquant.api.run(cfg)` less the evaluation: check, load, calibrate and quantize through the
    same api calls; {'config': ..., 'metrics': ...} as `run` records them."""
    import torch

    from duquant import api

    plan = api.check(cfg)
    torch.manual_seed(cfg.seed)
    loaded = api.load_model(cfg.model, str(cfg.dtype), cfg.device)
    config = api.record(plan, loaded.source)
    config["run"]["evals"] = []  # quantization only: nothing is evaluated
    metrics: dict = {}
    windows, calib, seconds = api.calibrate(plan, loaded.tokenizer)
    if calib is not None:
        config["calibration"] = calib
        metrics["calibration_data_seconds"] = seconds
    report = api.quantize_loaded(plan, loaded.model, windows)
    metrics["quantize_seconds"] = report.seconds
    metrics["quantize_peak_rss_mb"] = report.peak_rss_mb
    return {"config": config, "metrics": metrics}


def one(
    method: str,
    weights: str,
    nsamples: int,
    seqlen: int,
    threads: int,
    rule: str | None,
    hessian: str = "quantized",
) -> dict:
    """Quantize the default model once in this process; the numbers of that one run."""
    import torch

    torch.set_num_threads(threads)
    from duquant.config import RunConfig

    cfg = RunConfig(
        method=method,
        weights=weights,
        nsamples=nsamples,
        calib_seqlen=seqlen,
        w_scale_rule=rule,
        a_scale_rule=rule,
        gptq_hessian=hessian,
    )
    t = time.perf_counter()
    res = quantize_only(cfg)
    m = res["metrics"]
    return {
        "method": method,
        "weights": weights,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "tokens": nsamples * seqlen,
        "quantize_seconds": m["quantize_seconds"],
        "calibration_data_seconds": m.get("calibration_data_seconds", 0.0),
        "peak_rss_mb": m["quantize_peak_rss_mb"],
        "process_seconds": time.perf_counter() - t,
        "config": res["config"],
        "machine": machine(),
    }


def main() -> None:
    """Run every size in a subprocess, print a table and write JSON."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", default="duquant++")
    p.add_argument("--weights", default="gptq")
    p.add_argument("--sizes", default="16x512,128x2048", help="comma list of NSAMPLESxSEQLEN")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rule", default=None, help="scale rule of both sides (default: the format's)")
    p.add_argument("--gptq-hessian", default="quantized", choices=["quantized", "fp"])
    p.add_argument("--out", default="results/bench/quantize.json")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        n, s = (int(v) for v in args.one.split("x"))
        print(
            json.dumps(
                one(args.method, args.weights, n, s, args.threads, args.rule, args.gptq_hessian)
            )
        )
        return
    rows = []
    for size in args.sizes.split(","):
        cmd = [sys.executable, __file__, "--one", size, "--method", args.method]
        cmd += ["--weights", args.weights, "--threads", str(args.threads)]
        cmd += ["--gptq-hessian", args.gptq_hessian]
        if args.rule:
            cmd += ["--rule", args.rule]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"size {size} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{size}: quantize {r['quantize_seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MiB",
            flush=True,
        )
    md = [
        "| method | weights | calibration | tokens | quantize wall time | peak RSS |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['method']} | {r['weights']} | {r['nsamples']} × {r['seqlen']} | {r['tokens']:,} | "
            f"{r['quantize_seconds']:.0f} s | {r['peak_rss_mb'] / 1024:.2f} GiB |"
        )
    print("\n".join(md))
    out = Path(args.out)
    write_json({"args": vars(args), "rows": rows}, out)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
