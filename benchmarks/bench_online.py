"""Online transform cost per token: DuQuant++ vs DuQuant v1 vs global and block Hadamard.

On activations of SmolLM2-135M's linear-input widths (576: q/k/v, o, gate/up; 1536: down), as the
pipeline builds them: DuQuant++ one shared B=32 rotation; DuQuant v1 rotation, zigzag permutation,
rotation (smoothing folds into the norm / producer in both); QuaRot's online global Hadamard of
down_proj's input (KroneckerHadamard); a block Hadamard (B=32). Times the transform alone and the
whole online step (InputQuantizer: transform then MXFP4 fake-quant, in place), and for comparison the
old online step (the same transform, then the reference codec into a fresh tensor).

    python benchmarks/bench_online.py --threads 1 --tokens 2048 --out results/bench/online.json
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import interleaved, machine, markdown_table, paired_ratio, write_json

from duquant.formats import QuantSpec
from duquant.formats import reference as ref
from duquant.qlinear import InputQuantizer
from duquant.transforms.base import BlockRotation, Permutation, Sequence, Transform
from duquant.transforms.hadamard import KroneckerHadamard, block_hadamard
from duquant.transforms.permutation import zigzag_permutation

BLOCK = 32


def random_rotation(b: int, gen: torch.Generator) -> torch.Tensor:
    """A random b x b orthogonal matrix (stands in for a greedy-searched rotation: same cost)."""
    q, _ = torch.linalg.qr(torch.randn(b, b, generator=gen, dtype=torch.float64))
    return q


class IndexedPermutation(Permutation):
    """Permutation as it was before issue 7 (advanced indexing), to measure the change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.perm]


def online_transforms(width: int, x: torch.Tensor, gen: torch.Generator) -> dict[str, Transform]:
    """Each method's online transform of an input of `width` channels, built as the pipeline does."""
    r1 = BlockRotation(random_rotation(BLOCK, gen))
    perm = zigzag_permutation(r1(x).abs().amax(dim=(0, 1)), BLOCK)
    r2 = BlockRotation(random_rotation(BLOCK, gen))
    return {
        "duquant++": Sequence([BlockRotation(random_rotation(BLOCK, gen))]),
        "duquant v1": Sequence([r1, Permutation(perm), r2]),
        "duquant v1, x[..., perm]": Sequence([r1, IndexedPermutation(perm), r2]),
        "global hadamard": KroneckerHadamard(width),
        "block hadamard": Sequence([BlockRotation(block_hadamard(BLOCK))]),
    }


def old_online_step(t: Transform, x: torch.Tensor) -> torch.Tensor:
    """The online step before the fast codec: transform, then the reference codec (fresh output)."""
    return ref.mx_quantize_dequantize(t(x), "ocp")


def bench_width(width: int, args, gen: torch.Generator) -> list[dict]:
    """Time each transform, alone and with quantization, on a (1, tokens, width) activation."""
    x = torch.randn(1, args.tokens, width, generator=gen)
    x[..., ::61] *= 30.0  # outlier channels
    ts = online_transforms(width, x, gen)
    spec = QuantSpec("mxfp4", "ocp")
    cases = {}
    for name, t in ts.items():
        iq = InputQuantizer(t, spec)
        cases[f"{name} | transform"] = lambda t=t: t(x)
        cases[f"{name} | transform+quant"] = lambda iq=iq: (iq.reset(), iq(x))
        cases[f"{name} | old transform+quant"] = lambda t=t: old_online_step(t, x)
    times = interleaved(cases, args.repeats, inner=args.inner)
    rows = []
    for name, t in ts.items():
        flops = t.flops_per_token(width)
        tt = statistics.median(times[f"{name} | transform"])
        tq = statistics.median(times[f"{name} | transform+quant"])
        to = statistics.median(times[f"{name} | old transform+quant"])
        rows.append(
            {
                "width": width,
                "method": name,
                "flops_per_token": flops,
                "transform_us_per_token": tt / args.tokens * 1e6,
                "transform_gflops": flops * args.tokens / tt / 1e9,
                "vs_duquant_v1": paired_ratio(
                    times, f"{name} | transform", "duquant v1 | transform"
                ),
                "online_step_us_per_token": tq / args.tokens * 1e6,
                "old_online_step_us_per_token": to / args.tokens * 1e6,
                "online_step_speedup": to / tq,
                "times_s": {k: v for k, v in times.items() if k.startswith(name + " |")},
            }
        )
    return rows


def main() -> None:
    """Parse arguments, time both widths, print a markdown table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", default="576,1536")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=3, help="timed calls per case per round")
    p.add_argument("--out", default="results/bench/online.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    info = machine()
    rows = [r for w in args.widths.split(",") for r in bench_width(int(w), args, gen)]
    header = [
        "width",
        "online transform",
        "FLOPs/token",
        "transform µs/token",
        "x duquant v1 time",
        "transform+MXFP4 µs/token",
        "old transform+MXFP4 µs/token",
    ]
    table = [
        [
            str(r["width"]),
            r["method"],
            str(r["flops_per_token"]),
            f"{r['transform_us_per_token']:.3f}",
            f"{r['vs_duquant_v1']:.2f}",
            f"{r['online_step_us_per_token']:.3f}",
            f"{r['old_online_step_us_per_token']:.3f}",
        ]
        for r in rows
    ]
    md = markdown_table(header, table)
    print(md)
    write_json({"machine": info, "args": vars(args), "rows": rows, "table": md}, args.out)


if __name__ == "__main__":
    main()
