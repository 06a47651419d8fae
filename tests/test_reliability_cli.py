"""Trust nothing on disk (issue 30): every file duquant reads is validated, and a fault is one line
naming the file (exit status 2, nothing written, the inputs unchanged), or, for compare's own cache
records and per-window checkpoints, one warning and the result computed again (never printed).

Items: corrupt compare cache records and perplexity checkpoints; whole messages on one line; data
errors refused before the model loads; an output path overlapping an input; and a fuzz over the JSON
and text inputs (cache records, partial checkpoints, recipe files, evaluation texts) counting the
corrupted inputs tried per file kind (docs/reliability.md has the table)."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import forbid_model_loading, make_tiny_llama

import duquant.api
import duquant.data
import duquant.models
from duquant.cli import main

# ----------------------------------------------------------------------------- helpers


def invoke(argv: list[str]) -> int:
    """main(argv) as an exit status (argparse errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def one_line_error(capsys, code, *needles: str) -> str:
    """Assert exit status 2 and exactly one stderr line containing every needle; return it."""
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (to assert that nothing was written or changed)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load is a failure: the fault must be refused before it."""
    forbid_model_loading(monkeypatch)


@pytest.fixture
def wiki(tmp_path, monkeypatch) -> Path:
    """A local WikiText-2 test split ($DUQUANT_DATA_DIR), no hub."""
    data = tmp_path / "data"
    (data / "wikitext2_raw").mkdir(parents=True)
    text = "".join(chr(32 + (7 * i) % 90) for i in range(5 * 32 + 3))
    (data / "wikitext2_raw" / "wiki.test.raw").write_text(text)
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(duquant.data, "hub_reachable", lambda *a, **k: False)
    return data


# ----------------------------------------------------------------------------- 1. compare's cache

PPL = 17.3125  # the cached perplexity: printed as 17.31


def cached_cell(tmp_path: Path, evals=("wikitext2",)):
    """A compare config (fp, the given evaluations) and its planned cells, none cached yet."""
    import duquant.compare as cmp

    cfg = cmp.CompareConfig(
        methods=["fp"], evals=list(evals), seqlen=32, model="tiny/llama", out=str(tmp_path / "cmp")
    )
    return cfg, cmp.plan(cfg, Path(cfg.out), "tiny/llama")


def ppl_record(cell) -> dict:
    """A finished, valid perplexity cache record of `cell` (as compare writes it)."""
    from duquant.compare import key_hash

    return {
        "status": "ok",
        "finished": True,
        "hash": key_hash(cell.key),
        "label": cell.job.label,
        "method": cell.job.method,
        "weights": cell.job.weights,
        "eval": cell.name,
        "config": json.loads(json.dumps(cell.key, default=str)),
        "quantization": {"quantize_seconds": 0.0, "calibration": None},
        "result": {
            "ppl": PPL,
            "nll": math.log(PPL),
            "windows": 4,
            "seqlen": 32,
            "tokens": 4 * 31,
            "total_windows": 5,
            "resumed_windows": 0,
            "resumed_seconds": 0.0,
            "seconds": 1.5,
        },
        "seconds": 1.5,
        "environment": {},
        "finished_at": "2026-01-01T00:00:00",
    }


def lambada_record(cell) -> dict:
    """A finished, valid LAMBADA (lm-eval) cache record of `cell`."""
    rec = ppl_record(cell)
    task = {
        "status": "ok",
        "task": "lambada_openai",
        "metric": "acc",
        "score": 0.375,
        "perplexity": 41.5,
        "n_examples": 8,
        "n_available": 5153,
        "seconds": 2.0,
    }
    rec["result"] = {
        "config": {},
        "tasks": {"lambada_openai": task},
        "average": {"value": 0.375, "over": ["lambada_openai"], "missing": [], "complete": True},
    }
    return rec


def test_valid_cache_record_is_used(tmp_path, wiki, no_loading, capsys):
    """The reference: a valid record is read back and its number printed (no model loaded)."""
    from duquant.compare import load_cached

    cfg, (cell,) = cached_cell(tmp_path)
    rec = ppl_record(cell)
    cell.path.parent.mkdir(parents=True)
    cell.path.write_text(json.dumps(rec))
    assert load_cached(cell.path, "wikitext2") == rec
    argv = ["compare", "--methods", "fp", "--evals", "wikitext2", "--seqlen", "32"]
    code = invoke([*argv, "--model", "tiny/llama", "--out", cfg.out, "--cached-only"])
    out = capsys.readouterr().out
    assert code == 0 and "| fp | 17.31 |" in out


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda r: r["result"].update(ppl="99.5"), "result.ppl"),
        (lambda r: r["result"].update(ppl=99.5), "result.nll"),
        (lambda r: r["result"].update(ppl=math.nan, nll=math.nan), "result.ppl"),
        (lambda r: r["result"].update(windows=True), "result.windows"),
        (lambda r: r.update(hash="0" * 16), "key 'hash'"),
        (lambda r: r["config"].update(seed=1), "key 'config'"),
        (lambda r: r.update(finished=False), "finished"),
        (lambda r: r.update(result=[99.5]), "key 'result'"),
    ],
)
def test_bad_cache_record_is_recomputed_never_printed(
    mutate, needle, tmp_path, wiki, no_loading, capsys, caplog
):
    """A cache record whose number is not a number, not finite, not this cell's, or of the wrong
    shape: one warning naming the file and the key, the cell pending (computed again by a run
    that may load the model), never printed; the file is neither changed nor deleted."""
    cfg, (cell,) = cached_cell(tmp_path)
    rec = ppl_record(cell)
    mutate(rec)
    cell.path.parent.mkdir(parents=True)
    cell.path.write_text(json.dumps(rec))
    before = cell.path.read_bytes()
    argv = ["compare", "--methods", "fp", "--evals", "wikitext2", "--seqlen", "32"]
    with caplog.at_level(logging.WARNING):
        code = invoke([*argv, "--model", "tiny/llama", "--out", cfg.out, "--cached-only"])
    out = capsys.readouterr().out
    assert code == 0 and "99.5" not in out and "17.31" not in out and "| fp | – |" in out
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and cell.path.name in warned[0] and needle in warned[0]
    assert cell.path.read_bytes() == before


def test_bad_cache_record_is_rewritten_by_the_next_run(tmp_path, wiki):
    """A corrupt record is this cell's own file: the next run computes the cell and replaces it."""
    import duquant.compare as cmp
    from duquant.models import LoadedModel

    cfg, (cell,) = cached_cell(tmp_path)
    cell.path.parent.mkdir(parents=True)
    cell.path.write_text('{"status": "ok", "finished": true, "result": {"ppl": "NaN"}}')

    class Tok:
        def __call__(self, text, return_tensors="pt"):
            from types import SimpleNamespace

            return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 128 for c in text]]))

    table = cmp.run_compare(cfg, LoadedModel(make_tiny_llama(), Tok(), "tiny/llama"))
    ppl = table["rows"][0]["values"]["W2 PPL"]
    assert math.isfinite(ppl) and cmp.load_cached(cell.path, "wikitext2")["result"]["ppl"] == ppl


# ----------------------------------------------------------------------------- 1. partial checkpoints


def _ids() -> torch.Tensor:
    return torch.arange(5 * 32 + 3) % 128


@pytest.mark.parametrize(
    "mutate",
    [
        lambda ck: ck.update(total_windows=9),  # another text's window count
        lambda ck: ck.update(seqlen=16),
        lambda ck: ck.update(window_nll=[*ck["window_nll"], 1.0, 1.0, 1.0]),  # more than there are
        lambda ck: ck["window_nll"].__setitem__(0, math.nan),
        lambda ck: ck["window_nll"].__setitem__(0, 1e300),
        lambda ck: ck["window_nll"].__setitem__(0, -1.0),
        lambda ck: ck.update(seconds=math.inf),
        lambda ck: ck.pop("total_windows"),
    ],
)
def test_foreign_or_malformed_checkpoint_starts_over(mutate, tmp_path, caplog):
    """A checkpoint of other tokens, window length or count, or with a non-finite or impossible
    window NLL, is not resumed: the cell starts over and its result is a clean run's."""
    from duquant.eval.perplexity import perplexity

    model = make_tiny_llama()
    ck = tmp_path / "partial.json"
    clean = perplexity(model, _ids(), seqlen=32, max_windows=3, checkpoint=ck)
    saved = json.loads(ck.read_text())
    assert saved["total_windows"] == 5 and len(saved["window_nll"]) == 3
    mutate(saved)
    ck.write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING):
        res = perplexity(model, _ids(), seqlen=32, max_windows=3, checkpoint=ck)
    assert res["resumed_windows"] == 0 and res["ppl"] == clean["ppl"]
    assert any("partial.json" in r.getMessage() for r in caplog.records)


def test_progress_of_a_malformed_checkpoint(tmp_path):
    """compare's 'N windows done' note reads the checkpoint through the same validation."""
    from duquant.compare import partial_path, progress

    cached = tmp_path / "cache" / "fp-wikitext2-0123456789abcdef.json"
    part = partial_path(cached)
    part.parent.mkdir(parents=True)
    part.write_text('{"window_nll": [1, 2, 3]}')
    assert progress(cached) == "no saved progress"


# ----------------------------------------------------------------------------- 2. whole messages


def test_multi_line_error_is_one_whole_line(tmp_path, monkeypatch, capsys):
    """A wrapped exception whose detail (the tensor, the file) is on a later line: all of it, on
    one line, exit status 2."""

    def broken(cfg, loaded=None, plan=None):
        raise RuntimeError(
            "Error(s) in loading state_dict for LlamaForCausalLM:\n\tsize mismatch for "
            "model.layers.0.self_attn.q_proj.weight: copying a param with shape [64, 64]\n"
        )

    monkeypatch.setattr(duquant.api, "run", broken)
    out = tmp_path / "r.json"
    line = one_line_error(capsys, invoke(["run", "--output", str(out)]), "q_proj.weight")
    assert "\t" not in line and "  " not in line and not out.exists()


def test_long_message_is_bounded(monkeypatch, capsys):
    from duquant.cli import MESSAGE_LIMIT

    def broken(cfg, loaded=None, plan=None):
        raise ValueError("x\n" * 10 * MESSAGE_LIMIT)

    monkeypatch.setattr(duquant.api, "run", broken)
    line = one_line_error(capsys, invoke(["run"]))
    assert len(line) < MESSAGE_LIMIT + 40


# ----------------------------------------------------------------------------- 4. overlapping paths


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny Llama folder (config.json and safetensors), as an input."""
    path = tmp_path / "in" / "model"
    make_tiny_llama().save_pretrained(path)
    return path


def _overlap_cases(tmp: Path, model: Path) -> list[tuple[list[str], tuple[str, ...]]]:
    """Command lines whose output overlaps an input or another output, and the line's needles."""
    text = tmp / "in" / "notes.txt"
    recipe = tmp / "in" / "r.yaml"
    link = tmp / "in" / "link"
    m = ["--model", str(model)]
    return [
        ([*m, "--save", str(model)], ("--save", "is the same path as --model")),
        ([*m, "--save", str(model / "q")], ("--save", "is inside --model")),
        ([*m, "--save", str(tmp / "in")], ("--save", "contains --model")),
        ([*m, "--save", str(link)], ("--save", "is the same path as --model")),  # a symlink
        ([*m, "--output", str(model / "config.json")], ("--output", "is inside --model")),
        ([*m, "--eval", str(text), "--output", str(text)], ("--output", "--eval")),
        ([*m, "--recipe", str(recipe), "--output", str(recipe)], ("--output", "--recipe")),
        ([*m, "--save", str(tmp / "in"), "--eval", str(text)], ("--save", "contains")),
        ([*m, "--stream", "--work-dir", str(model)], ("--work-dir", "--model")),
        (
            [*m, "--stream", "--work-dir", str(tmp / "w"), "--save", str(tmp / "w" / "x")],
            ("--save",),
        ),
        ([*m, "--save", str(tmp / "x"), "--output", str(tmp / "x" / "r.json")], ("--output",)),
    ]


def test_output_overlapping_an_input_is_refused(tmp_path, model_dir, no_loading, capsys):
    """--output / --save / --work-dir equal to, inside or containing the model, an --eval or
    --recipe file or another output (symlinks resolved): one line before anything loads, nothing
    written, every input byte-identical."""
    (tmp_path / "in" / "notes.txt").write_text("some words " * 400)
    (tmp_path / "in" / "r.yaml").write_text("stages: []\n")
    (tmp_path / "in" / "link").symlink_to(model_dir)
    before = snapshot(tmp_path)
    for argv, needles in _overlap_cases(tmp_path, model_dir):
        one_line_error(capsys, invoke(["run", "--max-windows", "1", *argv]), *needles)
        assert snapshot(tmp_path) == before, argv


def test_paths_apart_are_not_refused(tmp_path, model_dir):
    """The same inputs with outputs elsewhere pass the check."""
    from duquant.config import RunConfig

    text = tmp_path / "in" / "notes.txt"
    text.write_text("some words " * 400)
    cfg = RunConfig(
        model=str(model_dir),
        evals=[str(text)],
        save=str(tmp_path / "out" / "q"),
        output=str(tmp_path / "out" / "r.json"),
    )
    duquant.api.check_paths(cfg)
    assert duquant.api.path_overlap(tmp_path / "a", tmp_path / "ab") is None
    # a result file that does not exist yet may go inside an input folder (it changes no file)
    duquant.api.check_paths(RunConfig(model=str(model_dir), output=str(model_dir / "r.json")))


# ----------------------------------------------------------------------------- 3. data before the model


def _data_cases(tmp: Path) -> list[tuple[dict, list[str], tuple[str, ...]]]:
    """(files under the data folder, the command line, the line's needles): data that is missing
    or malformed, all refused before any model loads."""
    w2 = "wikitext2_raw/wiki.test.raw"
    valid = "wikitext2_raw/wiki.valid.raw"
    c4 = "c4/c4-validation.00000-of-00008.json.gz"
    good = "text " * 200
    return [
        ({}, ["--method", "fp"], ("--eval wikitext2", "wiki.test.raw")),
        ({w2: b"\xff\xfe bad"}, ["--method", "fp"], ("wiki.test.raw", "not UTF-8")),
        ({w2: good}, ["--method", "fp", "--eval", "c4"], ("--eval c4", "C4")),
        ({w2: good, c4: b"not gzip"}, ["--method", "fp", "--eval", "c4"], ("c4-validation",)),
        ({w2: good, c4: _gz(b'{"text": 3}\n')}, ["--method", "fp", "--eval", "c4"], ("line 1",)),
        ({w2: good, c4: _gz(b"[1]\n")[:-9]}, ["--method", "fp", "--eval", "c4"], ("C4 shard",)),
        ({w2: good, c4: _damaged_gz()}, ["--method", "fp", "--eval", "c4"], ("C4 shard",)),
        ({w2: good}, ["--method", "smoothquant"], ("calibration data", "wiki.valid.raw")),
        ({w2: good, valid: b"\xc3("}, ["--method", "rtn", "--weights", "gptq"], ("not UTF-8",)),
        (
            {w2: good},
            ["--method", "fp", "--eval", str(tmp / "bin.txt")],
            ("--eval", "bin.txt", "NUL"),
        ),
        ({w2: good}, ["--recipe", str(tmp / "latin.yaml")], ("--recipe", "latin.yaml")),
    ]


def _damaged_gz() -> bytes:
    """A gzip file whose deflate stream is damaged (zlib.error, not an OSError)."""
    raw = _gz(b'{"text": "abc"}\n' * 1000)
    return raw[:20] + bytes(b ^ 0x55 for b in raw[20:60]) + raw[60:]


def _gz(raw: bytes) -> bytes:
    import gzip

    return gzip.compress(raw)


def test_data_faults_are_refused_before_loading(tmp_path, wiki, no_loading, monkeypatch, capsys):
    """Missing or malformed WikiText-2 / C4 / calibration data, a binary evaluation text, an
    unreadable recipe: one line naming the file before any model loads (the fixture fails any
    load), nothing written, the inputs unchanged."""
    (tmp_path / "bin.txt").write_bytes(b"text\x00" * 400)
    (tmp_path / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    out = tmp_path / "o.json"
    for files, argv, needles in _data_cases(tmp_path):
        data = tmp_path / f"data{len(list(tmp_path.glob('data*')))}"
        data.mkdir()
        for rel, content in files.items():
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            raw = content.encode() if isinstance(content, str) else content
            (data / rel).write_bytes(raw)
        monkeypatch.setenv("DUQUANT_DATA_DIR", str(data))
        before = snapshot(tmp_path)
        code = invoke(["run", *argv, "--seqlen", "32", "--output", str(out)])
        one_line_error(capsys, code, *needles)
        assert snapshot(tmp_path) == before and not out.exists(), argv


def test_invalid_config_json_names_the_file(tmp_path, no_loading, capsys):
    """A model folder whose config.json is not a JSON object: one line naming the file."""
    folder = tmp_path / "m"
    folder.mkdir()
    for content in (b'{"model_type": "llama", "hidden_size": ', b"[1, 2]", b"\xff{}"):
        (folder / "config.json").write_bytes(content)
        code = invoke(["run", "--model", str(folder), "--output", str(tmp_path / "o.json")])
        one_line_error(capsys, code, "config.json", "not a valid config.json")
        assert (folder / "config.json").read_bytes() == content
        assert not (tmp_path / "o.json").exists()


# ----------------------------------------------------------------------------- 5. fuzz

# what replaces a value: wrong types, non-finite and huge numbers
BAD_VALUES = ("x", None, [], {}, True, math.nan, math.inf, -math.inf, 1e308, 10**400, -(10**400))
# the corrupted inputs tried per file kind (docs/reliability.md's table; printed with -s)
TRIED: dict[str, int] = {}


def _paths(obj, prefix=()):
    """Every key path (dict keys and list indices) of a JSON-like object."""
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


def _removed(obj, path):
    out = copy.deepcopy(obj)
    parent = out
    for k in path[:-1]:
        parent = parent[k]
    del parent[path[-1]]
    return out


def _replaced(obj, path, value):
    out = copy.deepcopy(obj)
    parent = out
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return out


def _byte_variants(raw: bytes) -> list[bytes]:
    """Truncated at several offsets; invalid UTF-8 inserted at the start, middle and end."""
    n = len(raw)
    cuts = sorted({0, 1, 2, n // 7, n // 3, n // 2, 2 * n // 3, n - 2, n - 1} - {n})
    variants = [raw[:c] for c in cuts]
    for at in (0, n // 2, n - 1):
        variants += [raw[:at] + b"\xff" + raw[at:], raw[:at] + b"\xc3(" + raw[at + 1 :]]
    return variants


def corrupted(obj, dump) -> list[bytes]:
    """Every corruption of the document `obj` (serialized by `dump`): truncations, invalid UTF-8,
    each key removed, each value (and the whole document) of a wrong type, NaN / inf, huge."""
    variants = _byte_variants(dump(obj))
    variants += [dump(v) for v in ([], "x", 1, None, math.nan)]
    for path in _paths(obj):
        variants.append(dump(_removed(obj, path)))
        variants += [dump(_replaced(obj, path, v)) for v in BAD_VALUES]
    return variants


def _json_dump(obj) -> bytes:
    return json.dumps(obj).encode()


def _numbers(values: dict) -> dict:
    """The numbers (and 'n/m' example counts) a table row prints."""
    return {
        k: v
        for k, v in values.items()
        if k == "examples" or (isinstance(v, (int, float)) and not isinstance(v, bool))
    }


def _no_wrong_number(got: dict, want: dict) -> None:
    """Every number `got` would print is the one `want` holds (one left out prints '–')."""
    for k, v in got.items():
        if k == "examples":
            for col, counts in v.items():
                for a, b in zip(counts.split("/"), want[k][col].split("/"), strict=True):
                    assert a in ("None", b), (got, want)
        else:
            assert v is None or want.get(k) == v, (got, want)


@pytest.mark.parametrize("kind", ["perplexity", "lambada"])
def test_fuzz_compare_cache_records(kind, tmp_path, wiki, caplog):
    """Every corruption of a cache record is either refused (one warning, the cell recomputed) or
    read back with exactly the numbers it held: never a wrong number, never an exception."""
    import duquant.compare as cmp
    from duquant.compare import load_cached
    from duquant.eval.registry import evaluation_for

    name = "wikitext2" if kind == "perplexity" else "lambada"
    cfg, _ = cached_cell(tmp_path)
    job = cmp.jobs_of(cfg)[0]  # a cell as compare plans it (its data needs not be present here)
    key = cmp.result_key(cfg, job, name, {"status": "ok"}, "tiny/llama", None)
    cell = cmp.Cell(job, name, key, cmp.cache_path(Path(cfg.out), job, name, cmp.key_hash(key)))
    rec = (ppl_record if kind == "perplexity" else lambada_record)(cell)
    ev = evaluation_for(name)
    want = _numbers(ev.values(rec["result"]))
    cell.path.parent.mkdir(parents=True)
    cell.path.write_bytes(_json_dump(rec))
    assert load_cached(cell.path, name) == rec
    variants = corrupted(rec, _json_dump)
    refused = 0
    for raw in variants:
        cell.path.write_bytes(raw)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            got = load_cached(cell.path, name)
        assert cell.path.read_bytes() == raw  # read only: never changed, never deleted
        if got is None:
            refused += 1
            assert len(caplog.records) == 1 and cell.path.name in caplog.records[0].getMessage()
        else:
            _no_wrong_number(_numbers(ev.values(got["result"])), want)
    TRIED[f"compare cache record ({kind})"] = len(variants)
    assert refused > len(variants) // 2


def test_fuzz_perplexity_checkpoints(tmp_path, caplog):
    """Every corruption of a per-window checkpoint is either refused (one warning, the cell starts
    over) or resumes from a prefix of the windows it held; a sample run end to end gives the
    clean perplexity every time."""
    from duquant.eval.perplexity import _resume, perplexity, tokens_fingerprint

    model = make_tiny_llama()
    ck = tmp_path / "partial.json"
    clean = perplexity(model, _ids(), seqlen=32, max_windows=3, checkpoint=ck)
    saved = json.loads(ck.read_text())
    tokens = (tokens_fingerprint(_ids(), 32), 32, 5)

    def window(i: int) -> torch.Tensor:
        return _ids()[i * 32 : (i + 1) * 32].unsqueeze(0)

    variants = corrupted(saved, _json_dump)
    for i, raw in enumerate(variants):
        ck.write_bytes(raw)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            done, seconds = _resume(model, window, ck, tokens, 3, "ppl")
        assert ck.read_bytes() == raw
        assert done == saved["window_nll"][: len(done)] and math.isfinite(seconds)
        assert len(caplog.records) <= 1
        if i % 40 == 0:  # end to end, a sample: resumed or not, the clean number
            res = perplexity(model, _ids(), seqlen=32, max_windows=3, checkpoint=ck)
            assert res["ppl"] == pytest.approx(clean["ppl"], rel=1e-6)
    TRIED["perplexity partial checkpoint"] = len(variants)


def test_fuzz_recipe_files(tmp_path):
    """Every corruption of a recipe file is either a valid recipe with finite options or one
    line naming the file (ConfigError: the command line's exit status 2), no other exception."""
    import yaml

    from duquant.config import ConfigError, RunConfig

    repo = Path(__file__).resolve().parents[1]
    tried = 0
    for source in sorted((repo / "recipes").glob("*.yaml")):
        obj = yaml.safe_load(source.read_text())
        variants = corrupted(obj, lambda o: yaml.safe_dump(o).encode())
        variants += [b"a: &x [1]\n" + b"".join(b"%d: &x%d [*x, *x]\n" % (i, i) for i in range(30))]
        variants += [b"[" * 5000, b"!!python/object:os.system {}", b"stages: []\n" * 200_000]
        path = tmp_path / source.name
        for raw in variants:
            path.write_bytes(raw)
            try:
                recipe = duquant.api.resolve_recipe(RunConfig(recipe=str(path)))
            except ConfigError as exc:
                assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
                continue
            finally:
                assert path.read_bytes() == raw
            for stage in recipe.to_dict()["stages"]:
                for v in stage.values():
                    assert not isinstance(v, float) or math.isfinite(v), (raw, stage)
        tried += len(variants)
    TRIED["recipe YAML file"] = tried


def test_fuzz_eval_texts(tmp_path):
    """Every corruption of an evaluation text is either a UTF-8 text long enough for one window
    or one line naming the file (exit status 2 on the command line), no other exception."""
    from duquant.config import ConfigError

    good = ("The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 漢字\n" * 40).encode()
    variants = _byte_variants(good)
    variants += [b"", b"  \n\t", b"\x00" * 100, good[:50] + b"\x00" + good[50:], b"\xef\xbb\xbf"]
    variants += [good.decode().encode("utf-16"), good.decode().encode("latin-1", "replace")]
    variants += [good[: n - 1] for n in range(1, len(good), len(good) // 12)]  # cut mid-character
    for bad in (b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\x80", b"\x00"):
        variants += [good[:at] + bad + good[at:] for at in (0, len(good) // 2, len(good))]
    path = tmp_path / "notes.txt"
    for raw in variants:
        path.write_bytes(raw)
        try:
            duquant.api.check_eval_file(str(path), 512)
        except ConfigError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
        else:
            text = raw.decode("utf-8")
            assert "\x00" not in text and len(raw) + 2 >= 512
        assert path.read_bytes() == raw
    TRIED["evaluation text file"] = len(variants)


def test_fuzz_counts_are_reported():
    """The corrupted inputs tried per file kind (run with -s to see them; docs/reliability.md)."""
    for kind, n in TRIED.items():
        print(f"fuzz: {kind}: {n} corrupted inputs")


# ----------------------------------------------------------------------------- a crash mid-write


def test_ctrl_c_while_writing_json_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    """Ctrl-C in the middle of an atomic JSON write: the old file whole, no temp file left."""
    import os

    from duquant.jsonio import write_json

    target = tmp_path / "r.json"
    write_json({"a": 1}, target)

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json({"a": 2}, target)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_compare_out_overlapping_the_model_is_refused(
    tmp_path, model_dir, no_loading, capsys, where
):
    """`duquant compare --out` may not be, be inside or contain the model folder."""
    before = snapshot(model_dir)
    out = {
        "same": model_dir,
        "inside": model_dir / "results",
        "contains": model_dir.parent,
    }[where]
    code = main(
        [
            "compare",
            "--model",
            str(model_dir),
            "--methods",
            "fp",
            "--evals",
            "wikitext2",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--out" in err and "Traceback" not in err
    assert snapshot(model_dir) == before
    assert not (model_dir / "results").exists()
