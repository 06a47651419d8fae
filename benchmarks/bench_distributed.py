"""1 rank against 2 ranks (torchrun, gloo, one thread each): quantize and evaluation wall time, PPL, peak RSS.

Each case is one `torchrun --standalone --nproc-per-node N -m duquant run ... --output X.json` in its own
subprocess, with OMP_NUM_THREADS=1 (issue 31, item 4). The numbers come from the result JSON that rank 0
writes (`metrics.quantize_seconds`, `metrics.wikitext2.{ppl,seconds}`, `metrics.peak_rss_mb_per_rank`,
`metrics.world_size`); the largest single process's peak RSS is also taken from outside (the launcher's
`RUSAGE_CHILDREN`) as a cross-check. Ratios are 2 ranks / 1 rank of the same method and mode, checked
against the targets (quantize <= 0.6 x, evaluation <= 0.55 x, PPL within 0.1 %):

python benchmarks/bench_distributed.py --out results/bench/distributed.json            # 16 x 1024
python benchmarks/bench_distributed.py --quick --out /tmp/dist_quick/distributed.json  # 4 x 256, minutes
python benchmarks/bench_distributed.py --dry-run                                       # print the commands

`--modes stream` runs the same cases with `--stream` on a safetensors copy of the default GGUF
(`--hf-dir`, converted once with scripts/gguf_to_hf.py when missing), each case with its own work folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import machine, markdown_table, write_json

ROOT = Path(__file__).resolve().parents[1]
# issue 31, item 4: 2 ranks against 1 rank of the same case
TARGETS = {"quantize_ratio": 0.6, "eval_ratio": 0.55, "ppl_rel_diff": 0.001}
# per method: the `duquant run` options beyond the shared ones (duquant++* is duquant++ with GPTQ)
METHODS = {
    "duquant++": ["--method", "duquant++", "--weights", "gptq"],
    "best": ["--method", "best", "--weights", "gptq"],
}
LABELS = {"duquant++": "DuQuant++\\* (`duquant++ --weights gptq`)", "best": "`best`"}


@dataclass
class Case:
    """One torchrun invocation: a method, a mode (plain or --stream) and a rank count."""

    method: str
    mode: str
    ranks: int
    output: Path
    work: Path | None = None
    cmd: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """A short name, also the result file's stem."""
        return f"{self.method}-{self.mode}-{self.ranks}r"


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine is shared: record it around every case)."""
    return [round(x, 2) for x in os.getloadavg()]


def launcher() -> list[str]:
    """torchrun of this interpreter (the module form when no torchrun sits beside it)."""
    beside = Path(sys.executable).with_name("torchrun")
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-m", "torch.distributed.run"]


def entry() -> list[str]:
    """What torchrun starts: `-m duquant` once duquant/__main__.py exists, else the console script."""
    if importlib.util.find_spec("duquant.__main__") is not None:
        return ["-m", "duquant"]
    script = shutil.which("duquant")
    if script:  # torchrun --no-python execs the script directly
        return ["--no-python", script]
    return ["-m", "duquant"]  # what the design names; run() refuses it with a clear message


def run_args(args: argparse.Namespace, case: Case, hf_dir: Path) -> list[str]:
    """The `duquant run` arguments of one case."""
    cmd = ["run", *METHODS[case.method]]
    cmd += ["--nsamples", str(args.nsamples), "--calib-seqlen", str(args.calib_seqlen)]
    cmd += ["--seed", str(args.seed), "--eval", "wikitext2", "--seqlen", str(args.seqlen)]
    cmd += ["--max-windows", str(args.eval_windows), "--output", str(case.output)]
    if case.mode == "stream":
        cmd += ["--model", str(hf_dir), "--stream", "--work-dir", str(case.work)]
    elif args.model:
        cmd += ["--model", args.model]
    return cmd


def build_cases(args: argparse.Namespace, out_dir: Path, hf_dir: Path) -> list[Case]:
    """Every (mode, method, ranks) case with its full command line."""
    cases = []
    for mode in args.modes:
        for method in args.methods:
            for ranks in args.ranks:
                case = Case(method, mode, ranks, Path())
                case.output = out_dir / "runs" / f"{case.key}.json"
                if mode == "stream":
                    case.work = Path(args.work) / case.key
                case.cmd = [
                    *launcher(),
                    "--standalone",
                    "--nproc-per-node",
                    str(ranks),
                    *entry(),
                    *run_args(args, case, hf_dir),
                ]
                cases.append(case)
    return cases


def child_env() -> dict[str, str]:
    """One thread per rank, and this checkout's source first on the path."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def wrapped(cmd: list[str], timeout: float | None) -> dict:
    """Run `cmd` in this (fresh) process and report its status, wall time and the largest peak RSS
    of any process it waited for (torchrun waits for its ranks, so: the largest rank's, in MiB)."""
    start = time.perf_counter()
    # its own process group, so that a timeout ends torchrun and every rank it started
    proc = subprocess.Popen(
        cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc, err = 124, f"{err}\ntimed out after {timeout} s"
    return {
        "returncode": rc,
        "process_seconds": time.perf_counter() - start,
        # Linux reports ru_maxrss in KiB; RUSAGE_CHILDREN is the largest single descendant
        "max_process_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "stdout_tail": out[-3000:],
        "stderr_tail": err[-3000:],
    }


def run_case(case: Case, timeout: float | None) -> dict:
    """Run one case through a wrapper process (so RUSAGE_CHILDREN is this case's alone)."""
    if case.work is not None and case.work.exists():
        shutil.rmtree(case.work)  # a fresh work folder: no block from an earlier run is reused
    case.output.unlink(missing_ok=True)
    case.output.parent.mkdir(parents=True, exist_ok=True)
    wrapper = [sys.executable, __file__, "--wrap", json.dumps(case.cmd)]
    if timeout:
        wrapper += ["--timeout", str(timeout)]
    before = loadavg()
    proc = subprocess.run(wrapper, capture_output=True, text=True)
    after = loadavg()
    try:
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        rec = {"returncode": proc.returncode or 1, "stderr_tail": proc.stderr[-3000:]}
    rec.update(loadavg_before=before, loadavg_after=after)
    rec.update(parse_result(case, rec))
    return rec


def parse_result(case: Case, rec: dict) -> dict:
    """The figures of one finished case from its result JSON (missing ones as None, with a note)."""
    notes: list[str] = []
    if rec.get("returncode") != 0:
        return {"ok": False, "notes": [first_error(rec.get("stderr_tail", ""))]}
    if not case.output.is_file():
        return {"ok": False, "notes": [f"exit 0 but no {case.output} (did rank 0 write --output?)"]}
    m = json.loads(case.output.read_text()).get("metrics", {})
    ev = m.get("wikitext2") or {}
    world = m.get("world_size")
    if world is None:
        notes.append("metrics.world_size missing")
        if case.ranks > 1:
            notes.append("the distributed path may not be in: this may be N copies of a 1-rank run")
    elif world != case.ranks:
        notes.append(f"metrics.world_size {world} != --nproc-per-node {case.ranks}")
    per_rank = m.get("peak_rss_mb_per_rank")
    if per_rank is None:
        notes.append("metrics.peak_rss_mb_per_rank missing: rank 0's peak_rss_mb only")
        per_rank = [m["peak_rss_mb"]] if "peak_rss_mb" in m else None
    return {
        "ok": True,
        "world_size": world,
        "quantize_seconds": m.get("quantize_seconds"),
        "eval_seconds": ev.get("seconds"),
        "ppl": ev.get("ppl"),
        "eval_windows": ev.get("windows"),
        "quantize_peak_rss_mb": m.get("quantize_peak_rss_mb"),
        "peak_rss_mb_per_rank": per_rank,
        # norm tweaking's record (best): steps, KL per epoch, whether each step split by tokens
        "norm_tuning": m.get("norm_tuning"),
        "notes": notes,
    }


def first_error(stderr: str) -> str:
    """The line of a failed run's stderr that says why (the CLI's one-line error, else the last)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower():
            return ln.strip()[:500]
    return lines[-1].strip()[:500] if lines else "failed without a message"


def median_of(runs: list[dict], key: str) -> float | None:
    """The median of `key` over the successful rounds of one case (None if none has it)."""
    vals = [r[key] for r in runs if r.get("ok") and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def paired(one: list[dict], two: list[dict], key: str) -> float | None:
    """Median over rounds of two[key] / one[key], each ratio from the same round."""
    ratios = [
        b[key] / a[key]
        for a, b in zip(one, two, strict=False)
        if a.get("ok") and b.get("ok") and a.get(key) and b.get(key) is not None
    ]
    return statistics.median(ratios) if ratios else None


def summarize(cases: list[Case], runs: dict[str, list[dict]], ranks: list[int]) -> list[dict]:
    """Per (mode, method): each rank count's medians, then the ratios of the largest to 1 rank."""
    rows = []
    for mode, method in dict.fromkeys((c.mode, c.method) for c in cases):
        row: dict = {"mode": mode, "method": method, "by_ranks": {}}
        for n in ranks:
            rs = runs.get(f"{method}-{mode}-{n}r", [])
            per_rank = [max(r["peak_rss_mb_per_rank"]) for r in rs if r.get("peak_rss_mb_per_rank")]
            row["by_ranks"][n] = {
                "quantize_seconds": median_of(rs, "quantize_seconds"),
                "eval_seconds": median_of(rs, "eval_seconds"),
                "ppl": median_of(rs, "ppl"),
                "max_peak_rss_mb_per_rank": max(per_rank) if per_rank else None,
                "max_process_rss_mb": median_of(rs, "max_process_rss_mb"),
                "ok_rounds": sum(1 for r in rs if r.get("ok")),
            }
        big = max(ranks)
        if 1 in ranks and big > 1:
            one, many = runs.get(f"{method}-{mode}-1r", []), runs.get(f"{method}-{mode}-{big}r", [])
            p1, pn = row["by_ranks"][1]["ppl"], row["by_ranks"][big]["ppl"]
            row["ratios"] = {
                "ranks": big,
                "quantize_ratio": paired(one, many, "quantize_seconds"),
                "eval_ratio": paired(one, many, "eval_seconds"),
                "ppl_rel_diff": abs(pn - p1) / p1 if p1 and pn is not None else None,
            }
            row["targets_met"] = {
                k: (v <= TARGETS[k] if v is not None else None)
                for k, v in row["ratios"].items()
                if k in TARGETS
            }
        rows.append(row)
    return rows


def fmt(v: float | None, spec: str, unit: str = "") -> str:
    """A number for the table, or a dash when it was not measured."""
    return "–" if v is None else f"{v:{spec}}{unit}"


def failures(runs: dict[str, list[dict]]) -> list[str]:
    """One markdown line per failed round: the case and the error line that says why."""
    return [
        f"- `{key}` round {i + 1}: {'; '.join(r.get('notes', [])) or 'failed'}"
        for key, rs in runs.items()
        for i, r in enumerate(rs)
        if not r.get("ok")
    ]


def markdown(summary: list[dict], args: argparse.Namespace) -> str:
    """The two tables of docs/benchmarks.md: per case, and 2 ranks against 1."""
    head = [
        "mode",
        "method",
        "ranks",
        "quantize s",
        "eval s",
        "WikiText-2 PPL",
        "peak RSS / rank MiB",
    ]
    rows = []
    for s in summary:
        for n, b in s["by_ranks"].items():
            rows.append(
                [
                    s["mode"],
                    LABELS.get(s["method"], s["method"]),
                    str(n),
                    fmt(b["quantize_seconds"], ".1f"),
                    fmt(b["eval_seconds"], ".1f"),
                    fmt(b["ppl"], ".4f"),
                    fmt(b["max_peak_rss_mb_per_rank"], ".0f"),
                ]
            )
    out = [
        f"Calibration {args.nsamples} x {args.calib_seqlen}, WikiText-2 test {args.eval_windows} x "
        f"{args.seqlen}, seed {args.seed}, one thread per rank (OMP_NUM_THREADS=1), gloo, "
        f"{args.repeats} round(s), medians.",
        "",
        markdown_table(head, rows),
        "",
    ]
    head2 = ["mode", "method", "quantize x 1 rank", "eval x 1 rank", "PPL rel. diff", "targets met"]
    rows2 = []
    for s in summary:
        r, t = s.get("ratios"), s.get("targets_met", {})
        if not r:
            continue
        met = ", ".join(
            f"{k}: {'yes' if v else ('no' if v is False else '–')}" for k, v in t.items()
        )
        rows2.append(
            [
                s["mode"],
                LABELS.get(s["method"], s["method"]),
                fmt(r["quantize_ratio"], ".3f", f" (≤ {TARGETS['quantize_ratio']})"),
                fmt(r["eval_ratio"], ".3f", f" (≤ {TARGETS['eval_ratio']})"),
                fmt(None if r["ppl_rel_diff"] is None else 100 * r["ppl_rel_diff"], ".4f", " %"),
                met,
            ]
        )
    if rows2:
        out += [markdown_table(head2, rows2), ""]
    return "\n".join(out)


def ensure_hf_dir(args: argparse.Namespace, hf_dir: Path) -> None:
    """Convert the GGUF to a safetensors folder for --stream once (skipped when it exists)."""
    if any(hf_dir.glob("*.safetensors")):
        return
    from duquant.models.loading import default_model

    gguf = args.model or default_model()
    cmd = [sys.executable, str(ROOT / "scripts" / "gguf_to_hf.py"), gguf, str(hf_dir)]
    print("converting for --stream:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, env=child_env(), check=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; --quick shrinks the sizes unless they were given explicitly."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--methods", default="duquant++,best", help="comma list of: " + ",".join(METHODS)
    )
    p.add_argument("--modes", default="plain,stream", help="comma list of: plain, stream")
    p.add_argument("--ranks", default="1,2", help="comma list of --nproc-per-node values")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (16; quick 4)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="(1024; quick 256)")
    p.add_argument("--eval-windows", type=int, default=None, help="WikiText-2 windows (8; quick 2)")
    p.add_argument("--seqlen", type=int, default=None, help="evaluation window (1024; quick 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="rounds; the cases alternate in each")
    p.add_argument("--quick", action="store_true", help="4 x 256 calibration, 2 x 256 evaluation")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--model", default=None, help="plain mode's --model (default: duquant's own)")
    p.add_argument("--hf-dir", default="/tmp/duquant-bench/smollm2-hf", help="safetensors copy")
    p.add_argument("--work", default="/tmp/duquant-bench/dist-work", help="--stream work folders")
    p.add_argument("--timeout", type=float, default=None, help="seconds per case (default: none)")
    p.add_argument("--out", default="results/bench/distributed.json")
    p.add_argument("--wrap", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.wrap:
        return args
    quick = {"nsamples": 4, "calib_seqlen": 256, "eval_windows": 2, "seqlen": 256}
    full = {"nsamples": 16, "calib_seqlen": 1024, "eval_windows": 8, "seqlen": 1024}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.methods = [m for m in args.methods.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    args.ranks = sorted({int(n) for n in args.ranks.split(",") if n})
    bad = [m for m in args.methods if m not in METHODS] + [
        m for m in args.modes if m not in ("plain", "stream")
    ]
    if bad:
        p.error(f"unknown method or mode: {', '.join(bad)}")
    # the calibration windows are split contiguously over ranks: the count must divide
    for n in args.ranks:
        if n < 1 or args.nsamples % n:
            p.error(f"--nsamples {args.nsamples} is not a multiple of {n} ranks")
    return args


def main() -> None:
    """Run every case (round-robin over rounds), summarize, write JSON and markdown."""
    args = parse_args()
    if args.wrap:
        print(json.dumps(wrapped(json.loads(args.wrap), args.timeout)))
        return
    out = Path(args.out)
    hf_dir = Path(args.hf_dir)
    cases = build_cases(args, out.parent / out.stem, hf_dir)
    if args.dry_run:
        env = "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src"
        if "stream" in args.modes and not any(hf_dir.glob("*.safetensors")):
            print(f"# first: python scripts/gguf_to_hf.py <default GGUF> {hf_dir}")
        for c in cases:
            print(f"{env} {shlex.join(c.cmd)}")
        if entry() == ["-m", "duquant"] and importlib.util.find_spec("duquant.__main__") is None:
            print("# note: src/duquant/__main__.py does not exist yet: `-m duquant` will fail")
        return
    if entry() == ["-m", "duquant"] and importlib.util.find_spec("duquant.__main__") is None:
        sys.exit("torchrun -m duquant needs src/duquant/__main__.py (or the `duquant` script)")
    if "stream" in args.modes:
        ensure_hf_dir(args, hf_dir)
    start_load, runs = loadavg(), {c.key: [] for c in cases}
    for rnd in range(args.repeats):
        for c in cases:
            print(f"[round {rnd + 1}/{args.repeats}] {c.key}: {shlex.join(c.cmd)}", flush=True)
            rec = run_case(c, args.timeout)
            runs[c.key].append(rec)
            status = "ok" if rec.get("ok") else "FAILED"
            print(
                f"  {status}: quantize {fmt(rec.get('quantize_seconds'), '.1f', ' s')}, eval "
                f"{fmt(rec.get('eval_seconds'), '.1f', ' s')}, PPL {fmt(rec.get('ppl'), '.4f')}, "
                f"load {rec['loadavg_before']} -> {rec['loadavg_after']}"
                + "".join(f"\n  note: {n}" for n in rec.get("notes", [])),
                flush=True,
            )
    summary = summarize(cases, runs, args.ranks)
    md = markdown(summary, args)
    failed = failures(runs)
    if failed:
        md += "\nFailed:\n\n" + "\n".join(failed) + "\n"
    print(md)
    write_json(
        {
            "args": vars(args),
            "targets": TARGETS,
            "machine": machine(),
            "loadavg_start": start_load,
            "loadavg_end": loadavg(),
            "commands": {c.key: shlex.join(c.cmd) for c in cases},
            "runs": runs,
            "summary": summary,
        },
        out,
    )
    out.with_suffix(".md").write_text(md)
    if any(not r.get("ok") for rs in runs.values() for r in rs):
        sys.exit(1)


if __name__ == "__main__":
    main()
