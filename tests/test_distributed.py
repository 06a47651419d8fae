"""Data parallelism under torchrun (2 ranks, gloo over 127.0.0.1, spawned and bounded by the test):
the same transforms, codes, scales and perplexity as one process; bad launches refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, make_tiny_family, make_tiny_llama
from safetensors.torch import load_file

RUN_TIMEOUT = 240  # seconds; a hung collective fails the test instead of CI


def _checkpoint(root: Path, model) -> Path:
    """`model` saved as a safetensors folder with a word-level tokenizer, and a 6-window text."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = root / "ckpt"
    model.save_pretrained(folder, max_shard_size="100KB")
    vocab = model.config.vocab_size
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0").save_pretrained(folder)
    (root / "eval.txt").write_text(" ".join(f"t{(7 * i) % vocab}" for i in range(200)))
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint folder (see _checkpoint)."""
    return _checkpoint(tmp_path_factory.mktemp("dist"), make_tiny_llama(0))


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE checkpoint folder (see _checkpoint)."""
    return _checkpoint(tmp_path_factory.mktemp("moe"), make_tiny_family("qwen3_moe"))


def _env() -> dict:
    """One thread a rank, offline, no inherited launch variables, the package importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=src)
    env.pop("DUQUANT_DATA_DIR", None)
    return env


def _args(ckpt: Path, method: str, *extra: str) -> list[str]:
    """`duquant run` on the tiny checkpoint: 4 calibration windows and 6 evaluation windows of 32."""
    args = [
        "run",
        "--model",
        str(ckpt),
        "--method",
        method,
        "--eval",
        str(ckpt.parent / "eval.txt"),
    ]
    return [*args, "--seqlen", "32", "--nsamples", "4", "--calib-seqlen", "32", *extra]


def _run(nproc: int, args: list[str], script: str | None = None, env: dict | None = None):
    """`python -m duquant ARGS` (nproc 1) or torchrun with `nproc` ranks on loopback."""
    target = [script] if script else ["-m", "duquant"]
    if nproc == 1 and script is None:
        cmd = [sys.executable, "-m", "duquant", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
        cmd += ["--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1"]
        cmd += ["--master-port", str(free_port()), *target, *args]
    return subprocess.run(
        cmd, env=env or _env(), capture_output=True, text=True, timeout=RUN_TIMEOUT
    )


def _our_lines(stderr: str) -> list[str]:
    """duquant's own error lines (torchrun adds its failure report after them)."""
    marker = "duquant run: error"
    return [marker + x.split(marker, 1)[1] for x in stderr.splitlines() if marker in x]


@pytest.mark.parametrize(
    "method, extra",
    [
        ("rtn", []),
        # duquant++ with RTN weights runs in CI through test_compare_two_ranks_equal_one
        pytest.param("duquant++", [], marks=pytest.mark.slow),
        ("duquant++", ["--weights", "gptq"]),
        ("best", []),  # a norm-tweaking batch of 1 window: rank 1 idle in those steps
    ],
    ids=["rtn", "duquant++", "duquant++gptq", "best"],
)
def test_two_ranks_equal_one(ckpt, tmp_path, method, extra):
    """2 ranks write one result and one export, equal to the single process's: every tensor of the
    export (transforms, codes, scales, norms) and the perplexity."""
    _check_equal(ckpt, tmp_path, method, extra)


@pytest.mark.parametrize(
    "family, method, extra",
    [
        ("llama", "duquant++", ["--weights", "gptq", "--format", "nvfp4"]),
        pytest.param("moe", "smoothquant", ["--weights", "gptq"], marks=pytest.mark.slow),
    ],
    ids=["nvfp4-gptq", "moe-experts-gptq"],
)
def test_whole_solves_spread_over_ranks(ckpt, moe_ckpt, tmp_path, family, method, extra):
    """NVFP4 linears (their own tensor scale) and routed experts are solved whole, one rank each,
    and broadcast: the same export and perplexity as one process."""
    _check_equal(ckpt if family == "llama" else moe_ckpt, tmp_path, method, extra)


def _check_equal(ckpt: Path, tmp_path: Path, method: str, extra: list[str]) -> None:
    """1 and 2 ranks: the same perplexity and export tensors (a packed code at most a tie apart)."""
    out = {}
    for n in (1, 2):
        args = _args(ckpt, method, *extra, "--output", str(tmp_path / f"r{n}.json"))
        args += ["--save", str(tmp_path / f"x{n}")]
        res = _run(n, args)
        assert res.returncode == 0, res.stderr[-3000:]
        out[n] = json.loads((tmp_path / f"r{n}.json").read_text())["metrics"]
    assert out[2]["world_size"] == 2 and len(out[2]["peak_rss_mb_per_rank"]) == 2
    assert out[2]["eval.txt"]["windows"] == out[1]["eval.txt"]["windows"] == 6
    assert out[2]["eval.txt"]["ppl"] == pytest.approx(out[1]["eval.txt"]["ppl"], rel=1e-6)
    # GPTQ's error records: each rank sums its share of the rows, the sums all-reduced
    errs = {n: out[n].get("layer_errors", []) for n in (1, 2)}
    assert len(errs[1]) == len(errs[2])
    for a, b in zip(errs[1], errs[2], strict=True):
        assert (a["layer"], a["linear"]) == (b["layer"], b["linear"])
        for key in ("rtn_error", "gptq_error"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-9), (a, b)
    one, two = _tensors(tmp_path / "x1"), _tensors(tmp_path / "x2")
    assert one.keys() == two.keys() and any("scale" in k for k in one)
    for k in one:
        if one[k].is_floating_point() and one[k].element_size() > 1:
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
        else:  # packed codes and FP8 scales: at most a rounding tie apart
            same = (two[k].view(torch.uint8) == one[k].view(torch.uint8)).float().mean().item()
            assert same >= 0.999, (k, same)
    assert not list(tmp_path.glob("x2*/../*.partial-*")), "a rank left a staging folder"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export's safetensors files."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_stream_two_ranks_equal_one(ckpt, tmp_path):
    """--stream under torchrun: each rank its own work folder; the perplexity of one process."""
    ppl = {}
    for n in (1, 2):
        args = _args(ckpt, "duquant++", "--weights", "gptq", "--stream")
        args += ["--work-dir", str(tmp_path / f"w{n}"), "--output", str(tmp_path / f"s{n}.json")]
        res = _run(n, args)
        assert res.returncode == 0, res.stderr[-3000:]
        ppl[n] = json.loads((tmp_path / f"s{n}.json").read_text())["metrics"]["eval.txt"]["ppl"]
    assert ppl[2] == pytest.approx(ppl[1], rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "w2").iterdir()) == ["rank-0-of-2", "rank-1-of-2"]


@pytest.mark.parametrize(
    "method, extra, nsamples",
    [("rtn", ["--weights", "gptq"], "3")],
    ids=["calibration-windows"],
)
def test_world_that_does_not_divide_the_work_is_refused(ckpt, tmp_path, method, extra, nsamples):
    """3 calibration windows on 2 ranks: one line, nothing written, before any model loads."""
    out = tmp_path / "r.json"
    args = _args(ckpt, method, "--output", str(out), "--save", str(tmp_path / "x"), *extra)
    args[args.index("--nsamples") + 1] = nsamples
    res = _run(2, args)
    assert res.returncode != 0
    lines = _our_lines(res.stderr)
    assert len(lines) == 1 and "cannot be shared evenly by 2 ranks" in lines[0], res.stderr
    assert "Loading weights" not in res.stderr  # refused before the model loads
    assert not out.exists() and not (tmp_path / "x").exists()


def test_unreachable_rendezvous_is_one_line(ckpt, tmp_path):
    """A rank whose rendezvous never answers ends after --dist-timeout with one line, exit 2."""
    env = _env()
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(free_port())
    out = tmp_path / "r.json"
    args = _args(ckpt, "rtn", "--output", str(out), "--dist-timeout", "5")
    res = subprocess.run(
        [sys.executable, "-m", "duquant", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "could not join the rendezvous" in lines[0], res.stderr
    assert "rank 1 of 2" in lines[0] and not out.exists()


def test_cuda_on_a_rank_without_gpu_is_one_line(ckpt, tmp_path):
    """--device cuda under a launch where this rank has no GPU: one line, exit 2, nothing written."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = _env()
    env.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(free_port())
    out = tmp_path / "r.json"
    res = subprocess.run(
        [sys.executable, "-m", "duquant", *_args(ckpt, "rtn", "--output", str(out))]
        + ["--device", "cuda"],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "cuda" in lines[0] and "GPU" in lines[0], res.stderr
    assert not out.exists()


FAILING_RANK = """
import sys
import duquant.pipeline as p
from duquant import distributed as dist
from duquant.cli import main

original = p._quantize_block

def broken(ctx, i):
    if dist.rank() == 1 and i == 1:
        raise ValueError("injected failure in block 1")
    return original(ctx, i)

p._quantize_block = broken
sys.exit(main())
"""


def test_a_failing_rank_ends_the_job_with_one_line(ckpt, tmp_path):
    """Rank 1 fails in the middle of quantization: the job ends, its line names the rank and the
    cause, rank 0 says only that another rank stopped, and nothing is written."""
    script = tmp_path / "fail_rank1.py"
    script.write_text(FAILING_RANK)
    out = tmp_path / "r.json"
    args = _args(ckpt, "duquant++", "--weights", "gptq", "--output", str(out))
    res = _run(
        2, [*args, "--save", str(tmp_path / "x"), "--dist-timeout", "60"], script=str(script)
    )
    assert res.returncode != 0
    lines = _our_lines(res.stderr)
    cause = [x for x in lines if "injected failure" in x]
    assert len(cause) == 1 and "rank 1 of 2" in cause[0], res.stderr
    assert all("another rank" in x for x in lines if x not in cause), lines
    assert not out.exists() and not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_compare_two_ranks_equal_one(ckpt, tmp_path):
    """`duquant compare` under torchrun (fp, duquant++ with RTN and with GPTQ weights): rank 0 writes
    the cache and the table, equal to one process's."""
    tables = {}
    for n in (1, 2):
        out = tmp_path / f"c{n}"
        args = [
            "compare",
            "--model",
            str(ckpt),
            "--methods",
            "fp,duquant++*",
            "--evals",
            "wikitext2",
        ]
        args += ["--seqlen", "32", "--max-windows", "4", "--nsamples", "4", "--calib-seqlen", "32"]
        res = _run(n, [*args, "--out", str(out)])
        assert res.returncode == 0, res.stderr[-3000:]
        tables[n] = json.loads((out / "table.json").read_text())
        assert res.stdout.count("wrote ") == 1  # one rank reports
    rows = {n: {r["label"]: r for r in tables[n]["rows"]} for n in (1, 2)}
    assert rows[1].keys() == rows[2].keys()
    for label, row in rows[1].items():
        one = row["results"]["wikitext2"]["result"]["ppl"]
        two = rows[2][label]["results"]["wikitext2"]["result"]["ppl"]
        assert two == pytest.approx(one, rel=1e-6), label
        assert rows[2][label]["results"]["wikitext2"]["environment"]["world_size"] == 2
