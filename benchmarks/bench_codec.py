"""Codec throughput: MXFP4 (ocp) and NVFP4 quantize-dequantize on activation-shaped float32 tensors.

GB/s of float32 input, against a memcpy of the same bytes (`dst.copy_(src)` into a preallocated
buffer) and an allocating copy (`src.clone()`); the simple reference codec, the fast eager codec, the
optionally compiled one, and torchao's MX / NVFP4 emulation when it imports. Every case is checked
to give the reference's bits (torchao's equality is recorded, not required).

    python benchmarks/bench_codec.py --threads 1 --repeats 5 --compile --out results/bench/codec.json
    /work/.venv-torchao/bin/python benchmarks/bench_codec.py ...   # the same, with torchao importable
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from _common import interleaved, machine, markdown_table, paired_ratio, write_json

from duquant.formats import e2m1, mxfp4, nvfp4
from duquant.formats import reference as ref


def torchao_cases(x: torch.Tensor) -> tuple[dict[str, Callable[[], torch.Tensor]], str]:
    """torchao's MXFP4 and NVFP4 quantize + dequantize on `x`, or no cases and the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao.prototype.mx_formats.mx_tensor import MXTensor
            from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
    except Exception as exc:  # not installed, or built for another torch
        return {}, f"torchao unavailable: {type(exc).__name__}: {exc}"
    ts = nvfp4.tensor_scale_of(x)
    return {
        "mx torchao": lambda: MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32).dequantize(
            torch.float32
        ),
        "nv torchao": lambda: NVFP4Tensor.to_nvfp4(x, per_tensor_scale=ts).dequantize(
            torch.float32
        ),
    }, f"torchao {torchao.__version__}"


def codec_cases(x: torch.Tensor, dst: torch.Tensor, compiled: bool) -> dict[str, Callable]:
    """The timed calls on `x`: baselines, reference, fast eager (and compiled) codecs."""
    cases: dict[str, Callable] = {
        "memcpy": lambda: dst.copy_(x),
        "clone": lambda: x.clone(),
        "mx reference": lambda: ref.mx_quantize_dequantize(x, "ocp"),
        "mx fast": lambda: mxfp4.quantize_dequantize(x, "ocp"),
        "nv reference": lambda: ref.nv_quantize_dequantize(x),
        "nv fast": lambda: nvfp4.quantize_dequantize(x),
    }
    if compiled:
        cases["mx compiled"] = lambda: _with_compile(lambda: mxfp4.quantize_dequantize(x, "ocp"))
        cases["nv compiled"] = lambda: _with_compile(lambda: nvfp4.quantize_dequantize(x))
    return cases


def _with_compile(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run `fn` with the compiled codec switched on."""
    old = os.environ.get(e2m1.COMPILE_ENV)
    os.environ[e2m1.COMPILE_ENV] = "1"
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[e2m1.COMPILE_ENV]
        else:
            os.environ[e2m1.COMPILE_ENV] = old


def check(cases: dict[str, Callable], x: torch.Tensor) -> dict[str, bool]:
    """Whether each codec case gives the reference's bits (first calls, compile included)."""
    want = {"mx": ref.mx_quantize_dequantize(x, "ocp"), "nv": ref.nv_quantize_dequantize(x)}
    out = {}
    for name, fn in cases.items():
        fmt = name.split()[0]
        if fmt in want and "reference" not in name:
            start = time.perf_counter()
            out[name] = e2m1.same_bits(fn(), want[fmt])
            print(f"  {name}: first call {time.perf_counter() - start:.1f}s, bits {out[name]}")
            if not out[name] and "torchao" not in name:
                raise AssertionError(f"{name} differs from the reference codec")
    return out


def bench_shape(shape: tuple[int, ...], args) -> dict:
    """Time every case on one activation shape; return rows for the table and JSON."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    x[..., ::97] *= 40.0  # a few heavy channels, as in LLM activations
    cases = codec_cases(x, torch.empty_like(x), args.compile)
    ao, ao_note = ({}, "torchao skipped") if args.no_torchao else torchao_cases(x)
    cases.update(ao)
    print(f"{shape}: {ao_note}")
    bits = check(cases, x)
    times = interleaved(cases, args.repeats, inner=args.inner)
    nbytes = x.numel() * x.element_size()
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "shape": list(shape),
                "case": name,
                "median_ms": med * 1e3,
                "gbps": nbytes / med / 1e9,
                "vs_memcpy_bandwidth": 1.0 / paired_ratio(times, name, "memcpy"),
                "same_bits_as_reference": bits.get(name),
                "times_s": ts,
            }
        )
    return {"shape": list(shape), "torchao": ao_note, "rows": rows}


def main() -> None:
    """Parse arguments, time every shape, print a markdown table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="2048x1536,8192x4096")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=1, help="timed calls per case per round")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd codec")
    p.add_argument("--no-torchao", action="store_true")
    p.add_argument("--out", default="results/bench/codec.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    results = [
        bench_shape(tuple(int(d) for d in s.split("x")), args) for s in args.shapes.split(",")
    ]
    header = ["shape", "case", "median ms", "GB/s", "x memcpy bandwidth", "reference bits"]
    table = [
        [
            "x".join(map(str, r["shape"])),
            r["case"],
            f"{r['median_ms']:.2f}",
            f"{r['gbps']:.2f}",
            f"{r['vs_memcpy_bandwidth']:.3f}",
            {True: "yes", False: "no", None: "-"}[r["same_bits_as_reference"]],
        ]
        for res in results
        for r in res["rows"]
    ]
    md = markdown_table(header, table)
    print(md)
    write_json({"machine": info, "args": vars(args), "results": results, "table": md}, args.out)


if __name__ == "__main__":
    main()
