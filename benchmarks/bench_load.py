"""Wall time of loading the default GGUF model: converted by transformers, against read back from the
converted-GGUF cache (duquant.models.gguf_cache), each in a fresh process so nothing is shared.

Rounds alternate: the cache switched off (`DUQUANT_NO_GGUF_CACHE=1`: transformers dequantizes the GGUF
and parses its tokenizer), then a cache read (the entry written by a first, untimed load into a
temporary `DUQUANT_CACHE_DIR`). Reported: median seconds of `load_model()` each way and the median
per-round ratio.

    python benchmarks/bench_load.py --threads 1 --repeats 3 --out results/bench/load.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from _common import machine, markdown_table, paired_ratio, write_json

TIMED = """
import json, time, torch
torch.set_num_threads({threads})
from duquant.models import load_model
t = time.perf_counter()
loaded = load_model({model!r})
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""


def timed_load(model: str | None, threads: int, env: dict) -> float:
    """Seconds of one `load_model` in a fresh process with environment `env`."""
    code = TIMED.format(threads=threads, model=model)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/bench/load.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        cached = {**os.environ, "DUQUANT_CACHE_DIR": cache}
        cached.pop("DUQUANT_NO_GGUF_CACHE", None)
        off = {**cached, "DUQUANT_NO_GGUF_CACHE": "1"}
        timed_load(args.model, args.threads, cached)  # writes the entry
        times: dict[str, list[float]] = {"convert": [], "cache": []}
        for _ in range(args.repeats):
            times["convert"].append(timed_load(args.model, args.threads, off))
            times["cache"].append(timed_load(args.model, args.threads, cached))
    ratio = paired_ratio(times, "convert", "cache")
    result = {
        "model": args.model or "default",
        "threads": args.threads,
        "seconds": times,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "convert_over_cache": ratio,
        "machine": machine(),
    }
    write_json(result, args.out)
    rows = [[k, f"{statistics.median(v):.2f}"] for k, v in times.items()]
    print(markdown_table(["load", "median s"], rows))
    print(f"conversion / cache read: {ratio:.1f} x")


if __name__ == "__main__":
    main()
