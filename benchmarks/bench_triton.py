"""GPU: the fused Triton rotation + MXFP4 kernel against the torch path and a device memcpy.

Per activation shape (tokens x K), CUDA-event timed, median of `--repeats` interleaved rounds:
`copy` (dst.copy_(x), the bandwidth limit), `torch` (BlockRotation then the eager MXFP4 codec, what
the pipeline does without the kernel), `fused` (one kernel, dequantized output) and `fused pack`
(codes + E8M0 scales, what a W4A4 GEMM would consume). Every fused output is checked against the
torch path (bit-equal with an exact +-1/8 Hadamard rotation on integer inputs). Without a CUDA
device it says so and writes that to the JSON instead of numbers:

    python benchmarks/bench_triton.py --out results/bench/triton.json
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import machine, write_json

from duquant.formats import mxfp4
from duquant.formats.e2m1 import same_bits
from duquant.transforms.base import BlockRotation
from duquant.transforms.hadamard import block_hadamard

SHAPES = ((4096, 576), (4096, 1536), (16384, 4096), (65536, 4096))


def cuda_time(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` CUDA-event timed calls (after a warm-up)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def one_shape(rows: int, k: int, repeats: int, rule: str) -> dict:
    """Times and checks of every case on one (rows, k) float32 activation."""
    from duquant.kernels import rotate_quantize_mxfp4

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(-4000, 4000, (rows, k), generator=g, device="cuda").float()
    r = (torch.sign(block_hadamard(32)) / 8).cuda()
    rot = BlockRotation(r).cuda()
    dst = torch.empty_like(x)
    ref = mxfp4.quantize_dequantize(rot(x), rule)
    fused = rotate_quantize_mxfp4(x, r, rule)
    cases = {
        "copy": lambda: dst.copy_(x),
        "torch": lambda: mxfp4.quantize_dequantize(rot(x), rule),
        "fused": lambda: rotate_quantize_mxfp4(x, r, rule),
        "fused pack": lambda: rotate_quantize_mxfp4(x, r, rule, pack=True),
    }
    secs = {name: cuda_time(fn, repeats) for name, fn in cases.items()}
    gbytes = x.numel() * 4 / 1e9
    return {
        "shape": [rows, k],
        "seconds": secs,
        "gb_per_s": {n: gbytes / s for n, s in secs.items()},
        "fused_vs_copy_bandwidth": secs["copy"] / secs["fused"],
        "fused_speedup_vs_torch": secs["torch"] / secs["fused"],
        "bit_equal": same_bits(fused, ref),
    }


def main() -> None:
    """Time every shape on the GPU, print a table and write JSON (or record that there is no GPU)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--rule", default="ct-round")
    p.add_argument("--out", default="results/bench/triton.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        msg = "no CUDA device: the Triton kernel is only timed on a GPU (its CPU tests use the interpreter)"
        print(msg)
        write_json({"args": vars(args), "skipped": msg, "machine": machine()}, args.out)
        return
    rows = [one_shape(m, k, args.repeats, args.rule) for m, k in SHAPES]
    print(
        "| shape | copy GB/s | torch GB/s | fused GB/s | fused pack GB/s | fused / copy | x torch | bit-equal |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        bw = r["gb_per_s"]
        print(
            f"| {r['shape'][0]}x{r['shape'][1]} | {bw['copy']:.0f} | {bw['torch']:.0f} | "
            f"{bw['fused']:.0f} | {bw['fused pack']:.0f} | {r['fused_vs_copy_bandwidth']:.2f} | "
            f"{r['fused_speedup_vs_torch']:.1f} | {r['bit_equal']} |"
        )
    write_json(
        {
            "args": vars(args),
            "device": torch.cuda.get_device_name(),
            "rows": rows,
            "machine": machine(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
