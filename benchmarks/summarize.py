"""Tabulate result JSONs (from methods_table.py / duquant run) as mean ± std over seeds, markdown.

python benchmarks/summarize.py results/table1 results/search1 --out results/summary.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def load(dirs: list[str]) -> list[dict]:
    """Every result JSON with a wikitext2 PPL under `dirs`."""
    out = []
    for d in dirs:
        for p in sorted(Path(d).glob("*.json")):
            r = json.loads(p.read_text())
            if "metrics" in r and "wikitext2" in r["metrics"]:
                out.append(r)
    return out


def method_name(config: dict) -> str:
    """The method of a result: --method, or the recipe's name for a `--recipe FILE` run (the
    config's `method` is the recipe's record since the stage redesign)."""
    run, method = config["run"], config.get("method")
    if run.get("recipe") and isinstance(method, dict) and method.get("name"):
        return method["name"]
    return run["method"]


def key(r: dict) -> tuple:
    """(method, weight quantizer, weight rule, activation rule, format) of a result."""
    c = r["config"]
    w, a = c.get("weights") or {}, c.get("activations") or {}
    return (
        method_name(c),
        c.get("weight_quantizer", "rtn") if c.get("weights") else "-",
        w.get("scale_rule", "-"),
        a.get("scale_rule", "-"),
        c["run"]["format"],
    )


def table(results: list[dict]) -> str:
    """Markdown rows: method, weights, rules, mean PPL, std, seeds, tokens, calibration."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[key(r)].append(r)
    lines = [
        "| method | weights | w rule | a rule | WikiText-2 PPL mean | std | n seeds | per seed | eval tokens | calibration |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, rs in groups.items():
        rs.sort(key=lambda r: r["config"]["run"]["seed"])
        ppl = [r["metrics"]["wikitext2"]["ppl"] for r in rs]
        cal = rs[0]["config"].get("calibration")
        cal_s = f"{cal['nsamples']}×{cal['seqlen']} {cal['split']}" if cal else "-"
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {statistics.mean(ppl):.2f} | "
            f"{statistics.pstdev(ppl):.2f} | {len(ppl)} | {', '.join(f'{x:.2f}' for x in ppl)} | "
            f"{rs[0]['metrics']['wikitext2']['tokens']} | {cal_s} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Print (and optionally write) the table of every result under the given folders."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dirs", nargs="+")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    md = table(load(args.dirs))
    print(md)
    if args.out:
        Path(args.out).write_text(md)


if __name__ == "__main__":
    main()
