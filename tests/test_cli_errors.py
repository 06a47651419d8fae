"""Bad input on the command line: one clear line on stderr, exit status 2, no traceback, nothing
written, and no model loaded (each defect of issue 17 reproduced, plus a fuzz over every numeric
option of every command, enumerated from the config classes so new options are covered too)."""

from __future__ import annotations

import math
import struct
from dataclasses import fields

import pytest
import torch
from conftest import forbid_model_loading, make_tiny_llama

import duquant.api
import duquant.models
from duquant.cli import INTERRUPTED, main
from duquant.compare import CompareConfig
from duquant.config import AnalyzeConfig, ConfigError, RunConfig


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Any model load in these tests is a failure: bad input must be caught before it."""
    forbid_model_loading(monkeypatch)


def one_line_error(capsys, code, *needles: str) -> str:
    """Assert exit status 2 and exactly one stderr line containing every needle; return it."""
    err = capsys.readouterr().err
    assert code == 2, err
    # progress bars of a load that legitimately started (tqdm: '... it/s]') are not messages
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def invoke(argv: list[str]) -> int:
    """main(argv) as an exit status (argparse errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


# ----------------------------------------------------------------------------- the reported defects


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--seqlen", "-5"], "--seqlen -5"),
        (["--max-windows", "-3"], "--max-windows -3"),
        (["--max-steps", "-1"], "--max-steps -1"),
        (["--seqlen", "0"], "--seqlen 0"),
        (["--max-windows", "0"], "--max-windows 0"),
        (["--calib-seqlen", "0"], "--calib-seqlen 0"),
        (["--nsamples", "0"], "--nsamples 0"),
        (["--block-size", "0"], "--block-size 0"),
        (["--method", "duquant++", "--block-size", "24"], "--block-size 24"),
        (["--alpha", "1.5"], "--alpha 1.5"),
        (["--alpha", "nan"], "--alpha nan"),
        (["--norm-lr", "0"], "--norm-lr 0"),
        (["--learn-lr", "-1"], "--learn-lr -1"),
        (["--norm-epochs", "-1"], "--norm-epochs -1"),
        (["--seed", "-1"], "--seed -1"),
        (["--format", "mxfp5"], "--format"),
        (["--w-scale-rule", "e4m3"], "--w-scale-rule e4m3"),
        (["--method", "flatquant", "--format", "nvfp4"], "--method flatquant"),
        (["--method", "flatquant", "--a-scale-rule", "mse"], "--method flatquant"),
        (["--method", "flatquant", "--save", "x"], "not exportable"),
    ],
)
def test_run_rejects_out_of_range_options(argv, needle, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = invoke(["run", *argv, "--output", str(out)])
    one_line_error(capsys, code, needle)
    assert not out.exists()


def test_compare_rejects_bad_options_and_caches_nothing(tmp_path, capsys):
    out = tmp_path / "cmp"
    for argv, needle in (
        (["--seqlen", "-5"], "--seqlen -5"),
        (["--format", "mxfp5"], "--format"),
        (["--weights", "bogus"], "--weights bogus"),
        (["--methods", "nope"], "--methods nope"),
        (["--evals", "c5"], "--evals c5"),
        (["--c4-windows", "0"], "--c4-windows 0"),
        (["--tasks", "arc"], "--tasks arc"),
    ):
        one_line_error(capsys, invoke(["compare", *argv, "--out", str(out)]), needle)
    assert not out.exists()


def test_device_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line_error(capsys, invoke(["run", "--device", "cuda"]), "--device cuda", "no CUDA")


def test_output_is_checked_before_any_work(tmp_path, capsys):
    one_line_error(capsys, invoke(["run", "--output", str(tmp_path)]), "is a directory")
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = invoke(["run", "--output", str(blocker / "r.json")])
    one_line_error(capsys, code, "is not a directory")
    code = invoke(["run", "--output", "/proc/duquant-result.json"])  # unwritable even for root
    one_line_error(capsys, code, "cannot write in /proc")
    code = invoke(["compare", "--out", str(blocker)])
    one_line_error(capsys, code, "--out", "is a file")


def test_eval_file_is_checked_before_loading(tmp_path, capsys):
    missing = tmp_path / "none.txt"
    one_line_error(capsys, invoke(["run", "--eval", str(missing)]), "--eval", "none.txt")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café crème\n".encode("latin-1"))
    one_line_error(capsys, invoke(["run", "--eval", str(latin)]), "not UTF-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    one_line_error(capsys, invoke(["run", "--eval", str(empty)]), "empty")
    short = tmp_path / "short.txt"
    short.write_text("a few words only\n")
    code = invoke(["run", "--eval", str(short), "--seqlen", "512"])
    one_line_error(capsys, code, "fewer than one window", "--seqlen 512")


def gguf_header(tensors: int = 1, kvs: int = 3) -> bytes:
    """The first 24 bytes of a GGUF v3 file: magic, version, tensor count, metadata count."""
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs)


def test_model_sources_that_cannot_load(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    one_line_error(capsys, invoke(["run", "--model", str(empty)]), "empty.gguf", "empty")
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"PK\x03\x04" + bytes(60))
    one_line_error(capsys, invoke(["run", "--model", str(wrong)]), "not a GGUF file")
    folder = tmp_path / "folder"
    folder.mkdir()
    one_line_error(capsys, invoke(["run", "--model", str(folder)]), "config.json")
    code = invoke(["run", "--model", str(tmp_path / "no" / "such" / "dir")])
    one_line_error(capsys, code, "no such file or folder")
    one_line_error(capsys, invoke(["run", "--model", "./missing-dir/"]), "no such file")


def test_truncated_gguf_is_one_line(tmp_path, capsys, monkeypatch):
    """A GGUF cut off after its header: the loader's struct error becomes one line naming the file."""
    monkeypatch.undo()  # this one must reach the real loader
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_header() + b"\x05\x00")
    code = invoke(
        ["run", "--model", str(cut), "--max-windows", "1", "--output", str(tmp_path / "o.json")]
    )
    one_line_error(capsys, code, "cut.gguf", "truncated or corrupt")
    assert not (tmp_path / "o.json").exists()


def test_tokenizer_larger_than_vocabulary(tmp_path, capsys, monkeypatch):
    """A model folder whose tokenizer has more tokens than the embedding has rows: a clear error."""
    monkeypatch.undo()
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_tiny_llama().save_pretrained(tmp_path)  # vocabulary 128
    vocab = {f"t{i}": i for i in range(200)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0").save_pretrained(tmp_path)
    out = tmp_path / "o.json"
    code = invoke(["run", "--model", str(tmp_path), "--output", str(out)])
    one_line_error(capsys, code, "200 tokens", "128 rows")
    assert not out.exists()


def test_ctrl_c_during_run_says_nothing_was_written(tmp_path, capsys, monkeypatch):
    def interrupted(cfg, loaded=None, plan=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(duquant.api, "run", interrupted)
    out = tmp_path / "r.json"
    code = invoke(["run", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == INTERRUPTED and err.count("\n") == 1 and "nothing was written" in err
    assert "Traceback" not in err and not out.exists()


def test_ctrl_c_during_compare_says_what_was_kept(tmp_path, capsys, monkeypatch):
    import duquant.compare

    def interrupted(cfg, loaded=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(duquant.compare, "run_compare", interrupted)
    code = invoke(["compare", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == INTERRUPTED and err.count("\n") == 1
    assert str(tmp_path / "c" / "cache") in err and "resume" in err


# ----------------------------------------------------------------------------- fuzz


def _numeric_fields(cls) -> list:
    """Fields of a config class whose command-line option is numeric."""
    return [
        f
        for f in fields(cls)
        if "help" in f.metadata and str(f.type).split(" ")[0] in ("int", "float")
    ]


COMMANDS = {"run": RunConfig, "demo": RunConfig, "compare": CompareConfig, "analyze": AnalyzeConfig}
SKIP_IN = {"demo": {"method", "weights"}}


def _bad_values(f) -> list[str]:
    """Out-of-range and malformed values for a numeric field."""
    if str(f.type).startswith("float"):
        above = ["1.5"] if "[0, 1]" in f.metadata["help"] else []  # a bounded fraction (alpha)
        return ["-0.5", "nan", "inf", "x", *above]
    low = f.metadata["minimum"]
    return sorted({str(low - 1), "-7", "1.5", "x"})


def _fuzz_cases():
    for command, cls in COMMANDS.items():
        for f in _numeric_fields(cls):
            if f.name in SKIP_IN.get(command, ()):
                continue
            for value in _bad_values(f):
                yield pytest.param(command, f, value, id=f"{command}-{f.name}={value}")


def test_every_numeric_option_has_a_range():
    """Every integer option declares its minimum (so validation and this fuzz cover it)."""
    for cls in COMMANDS.values():
        for f in _numeric_fields(cls):
            assert str(f.type).startswith("float") or "minimum" in f.metadata, f.name


@pytest.mark.parametrize("command, f, value", list(_fuzz_cases()))
def test_fuzz_numeric_options(command, f, value, tmp_path, capsys):
    target = tmp_path / ("out" if command in ("compare", "analyze") else "r.json")
    where = (
        ["--out", str(target)] if command in ("compare", "analyze") else ["--output", str(target)]
    )
    flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    code = invoke([command, flag, value, *where])
    one_line_error(capsys, code, flag)
    assert not target.exists()


def test_config_rejects_the_same_values_in_the_library():
    """The library's constructors validate too: no path around the checks."""
    with pytest.raises(ConfigError, match="--seqlen 0"):
        RunConfig(seqlen=0)
    with pytest.raises(ConfigError, match="--max-steps -1"):
        CompareConfig(max_steps=-1)
    with pytest.raises(ConfigError, match="--alpha"):
        RunConfig(alpha=math.inf)
    cfg = RunConfig(method="duquant++", weights="gptq", format="nvfp4")
    assert cfg.to_dict()["weights"] == "gptq" and cfg.resolved_rules() == ("e4m3", "e4m3")


def gguf_with_architecture(path, arch: str) -> None:
    """A GGUF whose only metadata is `general.architecture` (enough for the pre-load checks)."""
    key, value = b"general.architecture", arch.encode()
    body = struct.pack("<Q", len(key)) + key + struct.pack("<I", 8)
    body += struct.pack("<Q", len(value)) + value
    path.write_bytes(gguf_header(tensors=0, kvs=1) + body)


def test_method_refused_for_the_family_before_loading(tmp_path, capsys):
    """QuaRot on a Gemma 3 GGUF is refused from the file's declared architecture, no model loaded
    (the autouse fixture fails any load); a Llama GGUF is not refused by that check."""
    from duquant.models.loading import gguf_architecture

    gemma = tmp_path / "gemma.gguf"
    gguf_with_architecture(gemma, "gemma3")
    assert gguf_architecture(gemma) == "gemma3"
    code = invoke(["run", "--model", str(gemma), "--method", "quarot"])
    one_line_error(capsys, code, "quarot", "post-norms")
    llama = tmp_path / "llama.gguf"
    gguf_with_architecture(llama, "llama")
    duquant.api.check(RunConfig(model=str(llama), method="quarot"))  # allowed: no post-norms


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--method", "mr-gptq", "--weights", "rtn"], ("--weights rtn", "mr-gptq", "gptq")),
        (["--method", "mr-gptq", "--gptq-scale-search", "hessian"], ("--gptq-scale-search",)),
        (["--weights", "gptq", "--gptq-scale-search", "fpquant-mse"], ("static",)),
        (
            ["--weights", "gptq", "--w-scale-rule", "fpquant", "--gptq-scale-search", "hessian"],
            ("ocp",),
        ),
    ],
)
def test_gptq_options_a_method_fixes_or_cannot_take(argv, needles, capsys):
    """A weight quantizer or scale search that contradicts the method, or a search the scale rule
    cannot take, is one line before anything loads."""
    one_line_error(capsys, invoke(["run", *argv]), *needles)


def test_end_to_end_after_quarot_is_refused_before_loading(tmp_path, capsys):
    """A recipe file pairing QuaRot's global rotation with end-to-end training: one line, exit 2,
    before the model loads (the pipeline refuses it too, tests/test_recipes.py)."""
    recipe = tmp_path / "quarot-e2e.yaml"
    recipe.write_text("name: quarot-e2e\nstages:\n  - stage: quarot\n  - stage: end-to-end\n")
    out = tmp_path / "r.json"
    code = invoke(["run", "--recipe", str(recipe), "--output", str(out)])
    one_line_error(capsys, code, "end-to-end training after QuaRot", "drop one")
    assert not out.exists()
