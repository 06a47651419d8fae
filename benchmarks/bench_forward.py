"""W4A4 forward time of the quantized default model (SmolLM2-135M) against its full-precision forward.

Each method quantizes a copy of the FP model with `duquant.pipeline.quantize_model` (MXFP4 ocp weights
and activations, small calibration: the online cost does not depend on it), then the FP model and the
quantized ones run the same window, round-robin, `--repeats` times. Reported: median seconds per
forward, the median of per-round ratios to the FP forward, online FLOPs per token.

    python benchmarks/bench_forward.py --threads 1 --seqlen 1024 --out results/bench/forward.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _common import interleaved, machine, markdown_table, paired_ratio, write_json

import duquant.qlinear
from duquant.data import calibration_windows
from duquant.formats import FORMATS
from duquant.formats import reference as ref
from duquant.methods import get_method
from duquant.models import adapter_for, load_model
from duquant.pipeline import QuantConfig, online_flops_per_token, quantize_model


def quantized_copy(model, method: str, windows: torch.Tensor, max_steps: int) -> tuple:
    """A deep copy of `model` quantized W4A4 by `method`; (model, quantize seconds)."""
    m = copy.deepcopy(model)
    start = time.perf_counter()
    quantize_model(
        m, adapter_for(m), get_method(method, max_steps=max_steps), QuantConfig(), windows
    )
    return m.eval(), time.perf_counter() - start


class ReferenceMX:
    """Stands in for `duquant.formats.mxfp4` in InputQuantizer: the simple codec, out of place."""

    @staticmethod
    def quantize_dequantize(x, rule, rounding, *, name="tensor", inplace=False):
        """The reference MXFP4 fake-quant (ignores `inplace`, as the old InputQuantizer did)."""
        return ref.mx_quantize_dequantize(x, rule, rounding)


def with_reference_codec(fn) -> None:
    """Run `fn` with the InputQuantizers using the reference MXFP4 codec (the code before issue 7)."""
    duquant.qlinear.FORMATS = {**FORMATS, "mxfp4": ReferenceMX}
    try:
        fn()
    finally:
        duquant.qlinear.FORMATS = FORMATS


def main() -> None:
    """Quantize a copy per method, time forwards interleaved, print a markdown table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="default: duquant.models.load_model()'s")
    p.add_argument("--methods", default="rtn,hadamard,quarot,duquant,duquant++")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--reference-codec",
        default="duquant++",
        help="methods also timed with the simple reference codec ('' for none)",
    )
    p.add_argument("--out", default="results/bench/forward.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    print(f"loaded in {time.perf_counter() - t0:.0f}s")
    tok, fp = loaded.tokenizer, loaded.model
    windows, _ = calibration_windows(tok, args.nsamples, args.calib_seqlen, seed=0)
    ids, _ = calibration_windows(tok, 1, args.seqlen, seed=1)
    models, quant_s, flops = {"fp": fp}, {}, {"fp": 0}
    for method in args.methods.split(","):
        models[method], quant_s[method] = quantized_copy(fp, method, windows, args.max_steps)
        flops[method] = online_flops_per_token(models[method])
        print(f"{method}: quantized in {quant_s[method]:.0f}s", flush=True)

    def forward(m) -> None:
        with torch.no_grad():
            m(ids, use_cache=False)

    cases = {name: (lambda m=m: forward(m)) for name, m in models.items()}
    for name in args.reference_codec.split(",") if args.reference_codec else []:
        flops[f"{name} (reference codec)"] = flops[name]
        cases[f"{name} (reference codec)"] = lambda m=models[name]: with_reference_codec(
            lambda: forward(m)
        )
    for fn in cases.values():  # one warm-up each, outside the timed rounds
        fn()
    times = interleaved(cases, args.repeats, inner=1, warmup=False)
    rows = [
        {
            "method": name,
            "median_s": statistics.median(ts),
            "vs_fp": paired_ratio(times, name, "fp"),
            "online_flops_per_token": flops[name],
            "quantize_s": quant_s.get(name.split(" (")[0], 0.0),
            "times_s": ts,
        }
        for name, ts in times.items()
    ]
    header = ["method", f"forward s ({args.seqlen} tokens)", "x FP forward", "online FLOPs/token"]
    table = [
        [r["method"], f"{r['median_s']:.2f}", f"{r['vs_fp']:.3f}", str(r["online_flops_per_token"])]
        for r in rows
    ]
    md = markdown_table(header, table)
    print(md)
    out = {"machine": info, "args": vars(args), "model": loaded.source, "rows": rows, "table": md}
    write_json(out, args.out)


if __name__ == "__main__":
    main()
