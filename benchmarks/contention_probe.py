"""How much two single-thread processes slow each other on this machine (context for 2-rank ratios).

Times 60 float32 1024 x 1024 matmuls in one process alone, then in two processes at once, and writes the
seconds and the slow-down of each concurrent process against the solo run:

python benchmarks/contention_probe.py --out results/bench/contention.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path


def _work(reps: int = 60) -> float:
    """Seconds for `reps` single-thread 1024² float32 matmuls (after a warm-up)."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/bench/contention.json")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        solo = pool.apply(_work)
    with ctx.Pool(2) as pool:
        pair = pool.map(_work, [60, 60])
    out = {"solo_s": solo, "pair_s": pair, "slowdown": [t / solo for t in pair]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
