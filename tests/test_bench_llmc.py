"""The pure parts of benchmarks/bench_llmcompressor.py (no llm-compressor needed): evaluation windows,
the perplexity both sides compute, the second text (LAMBADA), the summary, argument checks."""

from __future__ import annotations

import json
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
        (["--second-text", "c4"], "--second-text c4: unknown text"),
        (["--second-text", "lambada", "--second-windows", "0"], "--second-windows 0"),
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


class CharTokenizer:
    """A stand-in tokenizer: one id per character (its code point), called like a HF tokenizer."""

    def __call__(self, text: str, return_tensors: str = "pt"):
        assert return_tensors == "pt"
        return type("Enc", (), {"input_ids": torch.tensor([[ord(c) for c in text]])})()


def write_lambada(root: Path, texts: list[str]) -> Path:
    """A LAMBADA jsonl where duquant's zero-shot task looks for it under data directory `root`."""
    path = root / "lambada_openai" / "lambada_test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_second_text_in_file_order_windowed_like_wikitext(tmp_path, monkeypatch):
    """The zero-shot lookup finds the file under $DUQUANT_DATA_DIR; the passages are joined with a
    blank line in file order and cut into the first N x L tokens exactly as the WikiText-2 text is
    (same tokenizer call, same window function): checked against a hand-built token list."""
    texts = ["zeta one", "alpha two\n\nthree", "mid"]
    path = write_lambada(tmp_path, texts)
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(tmp_path))
    assert bench.find_lambada() == path
    joined = bench.passages_text(path)
    assert joined == "zeta one\n\nalpha two\n\nthree\n\nmid"
    tok = CharTokenizer()
    ids = bench.text_windows(tok, joined, 3, 8, "--second-windows")
    assert ids.tolist() == [ord(c) for c in "zeta one\n\nalpha two\n\nthr"]
    assert ids.shape == (24,)
    # the WikiText-2 windows go through the same function: same text, same tokens
    assert torch.equal(ids, bench.text_windows(tok, joined, 3, 8))
    with pytest.raises(ValueError, match="lower --second-windows or --eval-seqlen"):
        bench.text_windows(tok, joined, 4, 8, "--second-windows")


def test_second_text_option_resolution(tmp_path, monkeypatch, capsys):
    """Default: lambada when the file is found, else none; asked for explicitly without the file:
    one line, exit 2; none: no second text."""
    parse = bench.parser().parse_args
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(tmp_path))
    assert bench.second_text_path(parse([])) is None
    assert bench.second_text_path(parse(["--second-text", "none"])) is None
    with pytest.raises(SystemExit) as exc:
        bench.second_text_path(parse(["--second-text", "lambada"]))
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "lambada_test.jsonl not found" in lines[0]
    assert "--second-text none" in lines[0]
    path = write_lambada(tmp_path, ["a b"])
    assert bench.second_text_path(parse([])) == str(path)
    assert bench.second_text_path(parse(["--second-text", "lambada"])) == str(path)
    assert bench.second_text_path(parse(["--second-text", "none"])) is None


def fake_runs(ppl: dict[str, list[float]], second: dict[str, list[float]]) -> dict:
    """Worker results with only the fields the summary reads."""
    return {
        c: [
            {
                "eval": {"ppl": a},
                "eval_second": {"ppl": b},
                "quantize_seconds": 10.0 + i,
                "peak_rss_mb": 100.0,
            }
            for i, (a, b) in enumerate(zip(ppl[c], second[c], strict=True))
        ]
        for c in ppl
    }


def test_summary_second_text_and_ratios():
    """Per seed and mean PPL on both texts; our best case is picked on WikiText-2 and its mean PPL
    divided by each recipe's on both texts (hand-computed); the order per text."""
    cases = ["ours:duquant++", "ours:duquant++mx", "llmc:sq+quip+gptq", "llmc:gptq"]
    ppl = {
        cases[0]: [30.0, 32.0, 31.0],  # mean 31
        cases[1]: [27.0, 27.0, 27.0],  # mean 27: our best on WikiText-2
        cases[2]: [29.0, 30.0, 31.0],  # mean 30
        cases[3]: [45.0, 50.0, 55.0],  # mean 50
    }
    second = {
        cases[0]: [40.0, 40.0, 40.0],  # better than ours-best here, but not picked on this text
        cases[1]: [42.0, 44.0, 46.0],  # mean 44
        cases[2]: [50.0, 55.0, 60.0],  # mean 55
        cases[3]: [80.0, 80.0, 80.0],  # mean 80
    }
    runs = fake_runs(ppl, second)
    assert bench.case_ppls(runs, cases, "eval_second") == second
    means = {
        "wikitext2": {c: sum(v) / 3 for c, v in ppl.items()},
        "second": {c: sum(v) / 3 for c, v in second.items()},
    }
    best = bench.best_ours(means["wikitext2"])
    assert best == "ours:duquant++mx"
    ratios = bench.ratios_to_llmc(means, best)
    assert list(ratios) == ["llmc:sq+quip+gptq", "llmc:gptq"]
    assert ratios["llmc:sq+quip+gptq"]["wikitext2"] == pytest.approx(27 / 30)
    assert ratios["llmc:sq+quip+gptq"]["second"] == pytest.approx(44 / 55)
    assert ratios["llmc:gptq"]["wikitext2"] == pytest.approx(27 / 50)
    assert ratios["llmc:gptq"]["second"] == pytest.approx(44 / 80)
    assert bench.ppl_order(means["second"]) == [cases[0], cases[1], cases[2], cases[3]]
    table = bench.summary_table(cases, runs, [0, 1, 2], "MXFP4", "LAMBADA")
    header, _, *rows = table.splitlines()
    assert "LAMBADA PPL (seeds 0,1,2)" in header and "mean LAMBADA PPL" in header
    assert "42.000, 44.000, 46.000 | 44.000" in rows[1]
    assert "27.000, 27.000, 27.000 | 27.000" in rows[1]
    names = {"wikitext2": "WikiText-2", "second": "LAMBADA"}
    rt = bench.ratio_table(ratios, best, "MXFP4", names)
    assert "duquant duquant++mx" in rt.splitlines()[0]
    # 27/30 = 0.900 meets the 9 % target, 44/55 = 0.800 too; plain GPTQ: 0.540, 0.550
    assert "| 0.900 | 0.800 | yes, yes |" in rt
    assert "| 0.540 | 0.550 | yes, yes |" in rt
    # a run without the second text: no second-text columns, WikiText-2 columns stay
    runs_wt = {
        c: [{k: v for k, v in r.items() if k != "eval_second"} for r in runs[c]] for c in cases
    }
    assert "LAMBADA" not in bench.summary_table(cases, runs_wt, [0, 1, 2], "MXFP4", "LAMBADA")


def test_cli_second_text_missing_exits_2(tmp_path):
    """The script itself: --second-text lambada with a data directory that lacks the file exits 2
    with one line, before any model is loaded, and writes nothing."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_llmcompressor.py")]
        + ["--second-text", "lambada", "--llmc-recipes", "", "--out", str(out)],
        capture_output=True,
        text=True,
        env={
            "PYTHONPATH": str(REPO / "src"),
            "PATH": "/usr/bin:/bin",
            "OMP_NUM_THREADS": "1",
            "DUQUANT_DATA_DIR": str(tmp_path),
        },
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--second-text lambada" in proc.stderr
    assert not out.exists()


COMBINE_CASES = ["ours:duquant++", "ours:duquant++mx", "llmc:sq+quip+gptq", "llmc:gptq"]
COMBINE_PPL = {  # (WikiText-2, LAMBADA) PPL per seed 0, 1, 2
    "ours:duquant++": [(30.0, 40.0), (32.0, 41.0), (31.0, 42.0)],
    "ours:duquant++mx": [(27.0, 42.0), (28.0, 44.0), (29.0, 46.0)],
    "llmc:sq+quip+gptq": [(29.0, 50.0), (30.0, 55.0), (31.0, 60.0)],
    "llmc:gptq": [(45.0, 80.0), (50.0, 80.0), (55.0, 80.0)],
}


def combine_run(case: str, seed: int) -> dict:
    """A worker result of one case and seed with every field the summary reads (llm-compressor's too)."""
    wt, lam = COMBINE_PPL[case][seed]
    run = {
        "eval": {"ppl": wt},
        "eval_second": {"ppl": lam},
        "fp_eval": {"ppl": 20.0 + seed / 100},
        "quantize_seconds": 10.0 * (1 + COMBINE_CASES.index(case)) + seed,
        "peak_rss_mb": 100.0 + seed,
    }
    if case.startswith("llmc:"):
        run |= {
            "quantized_linears": 210,
            "weights_on_e2m1_grid": 1.0,
            "rotations": {"rotation_sha256": f"{seed:02d}" * 32 if "quip" in case else None},
        }
    return run


def run_settings(cases: list[str], seeds: list[int], out: Path, sha: str = "ab" * 32) -> dict:
    """What main() hands write_summary for a run of `cases` over `seeds` (the keys its JSON starts
    with): the args as parsed and checked, calibration per seed, evaluation and second-text sources."""
    args = bench.parser().parse_args(
        ["--seeds", ",".join(map(str, seeds)), "--out", str(out), "--second-text", "lambada"]
        + ["--ours-methods", ",".join(c[5:] for c in cases if c.startswith("ours:"))]
        + ["--llmc-recipes", ",".join(c[5:] for c in cases if c.startswith("llmc:"))]
    )
    args.seed_list, args.second_path = seeds, "/data/lambada_openai/lambada_test.jsonl"
    calib = {"dataset": "wikitext2", "split": "train", "origin": "/data/wiki.train.raw"}
    calib |= {"sha256": sha, "nsamples": 16, "seqlen": 1024}
    source = {"dataset": "wikitext2", "split": "test", "origin": "/data/wiki.test.raw"}
    return {
        "machine": {"cpu": "test", "nproc": 2},
        "args": {k: v for k, v in vars(args).items() if k not in bench.HIDDEN_ARGS},
        "calibration": {s: calib | {"seed": s} for s in seeds},
        "evaluation": {"source": source | {"sha256": "cd" * 32}, "windows": 8, "seqlen": 1024},
        "second_text": {
            "dataset": "lambada_openai",
            "split": "test",
            "origin": args.second_path,
            "sha256": "ef" * 32,
            "joined_with": "\n\n",
            "passage_order": "file",
            "windows": 8,
            "seqlen": 1024,
        },
    }


def write_part(path: Path, cases: list[str], seeds: list[int], **kw) -> Path:
    """The JSON a run of `cases` over `seeds` (in that order) writes, through the run's own writer."""
    runs = {c: [combine_run(c, s) for s in seeds] for c in cases}
    bench.write_summary(run_settings(cases, seeds, path, **kw), cases, runs, seeds, path)
    return path


def run_combine(out: Path, *parts: Path) -> subprocess.CompletedProcess:
    """The script's --combine mode, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_llmcompressor.py"), "--combine"]
        + [str(p) for p in parts]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


def test_combine_equals_one_run(tmp_path):
    """Three parallel parts (llm-compressor on seeds 0-2; ours on seeds 2,0 given in that order; ours
    on seed 1), combined, give the JSON and markdown of one run of all cases on seeds 0,1,2 (but
    for `combined_from`); runs are in seed order and the figures are the hand-computed ones."""
    out = tmp_path / "all.json"
    llmc, ours = COMBINE_CASES[2:], COMBINE_CASES[:2]
    parts = [
        write_part(tmp_path / "llmc.json", llmc, [0, 1, 2]),
        write_part(tmp_path / "ours20.json", ours, [2, 0]),
        write_part(tmp_path / "ours1.json", ours, [1]),
    ]
    one = tmp_path / "one" / "all.json"
    runs = {c: [combine_run(c, s) for s in (0, 1, 2)] for c in COMBINE_CASES}
    one_md = bench.write_summary(
        run_settings(COMBINE_CASES, [0, 1, 2], out), COMBINE_CASES, runs, [0, 1, 2], one
    )
    proc = run_combine(out, *parts)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())
    assert [x["path"] for x in got.pop("combined_from")] == [str(p) for p in parts]
    assert got == json.loads(one.read_text())
    assert out.with_suffix(".md").read_text() == one_md
    # hand-computed: seed order restored, ours first, best ours on WikiText-2 = duquant++mx (28)
    assert got["cases"] == COMBINE_CASES and got["seeds"] == [0, 1, 2]
    assert got["ppl"]["ours:duquant++"] == [30.0, 32.0, 31.0]
    assert got["mean_ppl"]["ours:duquant++mx"] == pytest.approx(28.0)
    assert got["best_ours"] == "ours:duquant++mx"
    assert got["ratio_to_llmc"]["llmc:sq+quip+gptq"]["wikitext2"] == pytest.approx(28 / 30)
    assert got["ratio_to_llmc"]["llmc:gptq"]["second"] == pytest.approx(44 / 80)
    assert got["order"]["second"] == COMBINE_CASES
    assert list(got["calibration"]) == ["0", "1", "2"]
    assert got["args"]["seeds"] == "0,1,2" and got["args"]["llmc_recipes"] == "sq+quip+gptq,gptq"
    assert (
        "time base: DuQuant++*" in one_md
        and "rotation sha256 per seed: 000000000000, 0101" in one_md
    )


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda s: s["calibration"][0].update(sha256="00" * 32), "calibration[0] (sha256"),
        (lambda s: s["calibration"][1].update(nsamples=32), "calibration[1] (nsamples"),
        (lambda s: s["evaluation"]["source"].update(sha256="11" * 32), "evaluation (source.sha256"),
        (lambda s: s["evaluation"].update(windows=4), "evaluation (windows"),
        (lambda s: s["second_text"].update(origin="/other.jsonl"), "second_text (origin"),
        (lambda s: s.update(second_text=None), "second_text ("),
        (lambda s: s["args"].update(threads=2), "args.threads"),
        (lambda s: s["args"].update(model="/other.gguf"), "args.model"),
    ],
)
def test_combine_mismatched_settings_exit_2(tmp_path, change, where, monkeypatch, capsys):
    """Files on other calibration, evaluation or second-text windows (or model, threads) are refused:
    exit 2, one line naming both files and the mismatch, nothing written."""
    first = write_part(tmp_path / "a.json", COMBINE_CASES[:2], [0, 1])
    settings = run_settings(COMBINE_CASES[2:], [0, 1], tmp_path / "b.json")
    change(settings)
    runs = {c: [combine_run(c, s) for s in (0, 1)] for c in COMBINE_CASES[2:]}
    second = tmp_path / "b.json"
    bench.write_summary(settings, COMBINE_CASES[2:], runs, [0, 1], second)
    capsys.readouterr()
    out = tmp_path / "all.json"
    with pytest.raises(SystemExit) as exc:
        bench.combine([str(first), str(second)], out)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and where in lines[0], lines
    assert str(first) in lines[0] and str(second) in lines[0]
    assert not out.exists() and not out.with_suffix(".md").exists()


def test_combine_cli_mismatch_one_line(tmp_path):
    """The script itself: a calibration sha256 mismatch exits 2 with one line, no traceback."""
    a = write_part(tmp_path / "a.json", COMBINE_CASES[:2], [0])
    b = write_part(tmp_path / "b.json", COMBINE_CASES[2:], [0], sha="99" * 32)
    out = tmp_path / "all.json"
    proc = run_combine(out, a, b)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "calibration[0] (sha256" in lines[0]
    assert not out.exists()


def test_combine_duplicate_case_seed_exit_2(tmp_path):
    """The same (case, seed) in two files: exit 2, one line naming it and both files."""
    a = write_part(tmp_path / "a.json", COMBINE_CASES, [0, 1])
    b = write_part(tmp_path / "b.json", ["ours:duquant++mx"], [1, 2])
    out = tmp_path / "all.json"
    proc = run_combine(out, a, b)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"case ours:duquant++mx seed 1 is in both {a} and {b}" in lines[0]
    assert not out.exists()


def test_combine_partial_case_and_bad_files_exit_2(tmp_path, capsys):
    """A case missing some seeds of the union is refused (documented choice), as are a file that is
    not a result and an --out that is one of the inputs; each with one line and exit 2."""
    a = write_part(tmp_path / "a.json", COMBINE_CASES[:2], [0, 1, 2])
    b = write_part(tmp_path / "b.json", COMBINE_CASES[2:], [0, 1])
    junk = tmp_path / "junk.json"
    junk.write_text('{"ppl": {}}')
    out = tmp_path / "all.json"
    capsys.readouterr()
    for paths, dest, message in [
        ([a, b], out, "case llmc:sq+quip+gptq has seeds 0,1, the others 0,1,2"),
        ([a, junk], out, "not a bench_llmcompressor result"),
        ([a, tmp_path / "none.json"], out, "cannot read it as JSON"),
        ([a, b], a, "is one of the inputs"),
    ]:
        with pytest.raises(SystemExit) as exc:
            bench.combine([str(p) for p in paths], dest)
        assert exc.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_smoothing_mappings_follow_the_family():
    """SmoothQuant's mappings come from duquant's adapter: none passed for Llama (llm-compressor's
    defaults, the SmolLM2 recipe unchanged); Gemma 3's gate/up are smoothed against the norm that
    feeds them (pre_feedforward_layernorm), not against its post-norm."""
    from conftest import make_tiny_family, make_tiny_llama

    assert bench.smoothing_mappings(make_tiny_llama()) is None
    maps = bench.smoothing_mappings(make_tiny_family("gemma3"))
    assert [norm for _, norm in maps] == [
        "re:.*input_layernorm$",
        "re:.*pre_feedforward_layernorm$",
    ]
    assert maps[1][0] == ["re:.*mlp.gate_proj$", "re:.*mlp.up_proj$"]


def test_model_option_checked_before_loading(tmp_path, capsys):
    """--model takes any source duquant loads (here a Hugging Face folder); a missing one and a
    method the family refuses (QuaRot on Gemma 3) exit 2 with one line before anything loads."""
    from conftest import make_tiny_family

    folder = tmp_path / "gemma3"
    make_tiny_family("gemma3").save_pretrained(folder)
    args = bench.parser().parse_args(
        ["--model", str(folder), "--ours-methods", "duquant++mx", "--llmc-recipes", ""]
    )
    assert bench.cases_of(args) == ["ours:duquant++mx"] and args.source == str(folder)
    for argv, message in [
        (["--model", str(tmp_path / "none.gguf")], "GGUF file does not exist"),
        (["--model", str(folder), "--ours-methods", "quarot"], "post-norms"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            bench.cases_of(bench.parser().parse_args([*argv, "--llmc-recipes", ""]))
        assert exc.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
