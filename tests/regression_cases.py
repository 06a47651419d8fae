"""The redesign's regression record (issue 29): perplexities of eight methods and the sha256 of one
export on the real model, computed through the command line so that the record does not depend on
the library's internal structure.

`python tests/regression_cases.py` (re)writes tests/data/regression_baseline.json; it was first run
on main at 3c11286, before the redesign. `python tests/regression_cases.py best` re-records one case
only, after a deliberate change of that method (norm tweaking block by block, issue 31). test_regression.py recomputes every case and asserts bit
equality (float.hex), single-threaded, so that summation order does not vary with the machine.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

BASELINE = Path(__file__).parent / "data" / "regression_baseline.json"
# 2 x 512 evaluation windows, 4 x 512 calibration windows, seed 0
COMMON = [
    "--seqlen",
    "512",
    "--max-windows",
    "2",
    "--nsamples",
    "4",
    "--calib-seqlen",
    "512",
    "--seed",
    "0",
]
CASES: dict[str, list[str]] = {
    "rtn": ["--method", "rtn"],
    "duquant++": ["--method", "duquant++"],
    "duquant++*": ["--method", "duquant++", "--weights", "gptq"],
    "duquant++mx*": ["--method", "duquant++mx", "--weights", "gptq"],
    "best": ["--method", "best"],
    "mr-gptq": ["--method", "mr-gptq"],
    "quarot*": ["--method", "quarot", "--weights", "gptq"],
    "flatquant": ["--method", "flatquant", "--learn-epochs", "1"],
}
EXPORT_CASE = "duquant++mx*"


def run_case(name: str, workdir: Path, save: bool = False) -> dict:
    """Run one case through `duquant run` (one thread); its PPL as float.hex, and the export's
    sha256 of every safetensors file when `save`."""
    import torch

    from duquant.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = workdir / f"{name.replace('*', 'star')}.json"
    args = ["run", *CASES[name], *COMMON, "--output", str(out)]
    export = workdir / "export"
    if save:
        args += ["--save", str(export)]
    try:
        rc = main(args)
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, f"duquant {' '.join(args)} exited {rc}"
    result = json.loads(out.read_text())
    record = {"ppl": float(result["metrics"]["wikitext2"]["ppl"]).hex()}
    if save:
        record["export_sha256"] = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(export.glob("*.safetensors"))
        }
    return record


def main(argv: list[str] | None = None) -> int:
    """Compute every case (or only the ones named: a deliberate change of those methods, the rest
    of the record kept) and write the baseline."""
    only = list(sys.argv[1:] if argv is None else argv)
    unknown = [n for n in only if n not in CASES]
    if unknown:
        print(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
        return 2
    records = json.loads(BASELINE.read_text()) if only else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in only or CASES:
            records[name] = run_case(name, Path(tmp), save=name == EXPORT_CASE)
            print(name, records[name], flush=True)
    BASELINE.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {BASELINE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
