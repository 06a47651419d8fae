"""The pure parts of benchmarks/bench_llmcompressor.py (no llm-compressor needed): evaluation windows,
the perplexity both sides compute, argument checks."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_llmcompressor as bench  # noqa: E402


def test_eval_windows_ppl_matches_brute_force(tiny_llama):
    """The flat windows the bench hands to both sides, through `evaluate`, give exp(mean NLL of every
    next token inside each window), computed here token by token with log_softmax."""
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (3 * 16 + 7,))
    flat = bench.first_windows(ids, 3, 16)
    assert torch.equal(flat, ids[:48])
    res = bench.evaluate(tiny_llama, flat, 16, "test")
    total, count = 0.0, 0
    with torch.no_grad():
        for w in flat.reshape(3, 16):
            logp = torch.log_softmax(tiny_llama(w[None]).logits[0].double(), -1)
            for t in range(15):
                total -= float(logp[t, w[t + 1]])
                count += 1
    assert res["windows"] == 3 and res["tokens"] == count == 45
    assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_first_windows_refuses_short_text():
    with pytest.raises(ValueError, match="lower --eval-windows"):
        bench.first_windows(torch.arange(100), 2, 64)


def test_lists_and_seeds():
    assert bench.split_list(" duquant++, ,duquant++mx,duquant++") == ["duquant++", "duquant++mx"]
    assert bench.parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(ValueError, match="'a' is not an integer"):
        bench.parse_seeds("0,a")
    with pytest.raises(ValueError, match="no seed"):
        bench.parse_seeds(" , ")


def test_labels():
    assert bench.label("ours:duquant++") == "DuQuant++*: duquant duquant++ --weights gptq"
    assert bench.label("ours:duquant++/fp").endswith("--gptq-hessian fp")
    assert bench.label("llmc:gptq") == "llm-compressor GPTQ (MXFP4)"
    assert "QuIP(B=32)" in bench.label("llmc:sq+quip+gptq")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0,x"], "'x' is not an integer"),
        (["--ours-methods", "no-such-method"], "--ours-methods no-such-method"),
        (["--llmc-recipes", "awq"], "unknown recipe"),
        (["--llmc-python", "/nonexistent/python"], "no such interpreter"),
        (["--eval-windows", "-1"], "--eval-windows -1"),
        (["--nsamples", "0"], "--nsamples 0"),
        (["--ours-methods", "", "--llmc-recipes", ""], "no case to run"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    """Bad input: exit status 2 with one line naming the option, from the checks run before loading."""
    with pytest.raises(SystemExit) as exc:
        bench.cases_of(bench.parser().parse_args(argv))
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_cases_order_and_cli_exit_status(tmp_path):
    """Ours first (the time base), then llm-compressor's; the script itself exits 2, no traceback."""
    args = bench.parser().parse_args(
        ["--ours-methods", "duquant++,duquant++mx/fp", "--llmc-python", sys.executable]
    )
    assert bench.cases_of(args) == [
        "ours:duquant++",
        "ours:duquant++mx/fp",
        "llmc:sq+quip+gptq",
        "llmc:gptq",
    ]
    assert args.seed_list == [0]
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_llmcompressor.py"), "--seeds", "x"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()
