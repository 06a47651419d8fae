"""Shared helpers of the benchmark scripts: machine description, interleaved timing, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, threads, torch, load at the start."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
        "compile_codec_env": os.environ.get("DUQUANT_COMPILE_CODEC", ""),
    }


def interleaved(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    inner: int = 1,
    warmup: bool = True,
    warmup_below_s: float = 0.25,
) -> dict[str, list[float]]:
    """Seconds per call of every case, round-robin: each round runs each case `inner` times in a row
    (after a warm-up call) and keeps their median. Interleaving spreads the noise of a shared
    machine over all cases alike; the warm-up lets the allocator reach its steady state for the
    case (a fresh large allocation page-faults, see docs/benchmarks.md). Cases slower than
    `warmup_below_s` skip it after the first round: it cannot matter there and would cost most."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            if warmup and (not times[name] or times[name][-1] < warmup_below_s):
                fn()
            runs = []
            for _ in range(inner):
                start = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - start)
            times[name].append(statistics.median(runs))
    return times


def paired_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of time[name] / time[base] (each ratio from the same round)."""
    return statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(obj: dict, path: str | Path) -> None:
    """Write `obj` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    print(f"wrote {path}")
