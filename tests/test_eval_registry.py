"""The evaluation registry (duquant.eval.registry): every entry's interface, perplexity entries equal
to a direct perplexity() call bit for bit, up-front checks, text files, missing data."""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch

import duquant.data
from duquant.eval.perplexity import perplexity
from duquant.eval.registry import (
    COLUMNS,
    EVALS,
    EVALUATIONS,
    ZS_COLUMNS,
    Evaluation,
    Session,
    evaluation_for,
    metrics_key,
    provenance,
    table_columns,
)

FIELDS = ["name", "columns", "settings", "fingerprint", "run", "values", "prepare", "token_ids"]


def settings(**kw) -> SimpleNamespace:
    """The settings object a run or compare hands the registry."""
    base = dict(
        seqlen=32,
        max_windows=None,
        c4_windows=6,
        limit=None,
        tasks=None,
        batch_size=8,
        zeroshot_source="auto",
    )
    return SimpleNamespace(**{**base, **kw})


class CharTok:
    """Character-code tokenizer (ids < 128, the tiny model's vocabulary), called like a HF tokenizer."""

    def __call__(self, text: str, return_tensors: str | None = None):
        ids = [ord(c) % 128 for c in text]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors else ids)


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """No hub, and an empty data directory."""
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(duquant.data, "hub_reachable", lambda *a, **k: False)
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def text_file(tmp_path, n: int = 5 * 32 + 3):
    """A UTF-8 text of n characters (n tokens for CharTok)."""
    path = tmp_path / "sample.txt"
    path.write_text("".join(chr(32 + (7 * i) % 90) for i in range(n)), encoding="utf-8")
    return path


def test_every_entry_has_the_full_interface(tmp_path, no_hub):
    """Registry entries (and a text-file entry) carry every field; settings, fingerprint and
    token_ids answer without a model."""
    assert [f.name for f in dataclasses.fields(Evaluation)] == FIELDS
    assert EVALS == tuple(EVALUATIONS) == ("wikitext2", "c4", "lambada", "zeroshot")
    path = text_file(tmp_path)
    for name in (*EVALS, str(path)):
        ev = evaluation_for(name)
        assert isinstance(ev, Evaluation) and ev.name == name
        assert ev.columns and all(isinstance(c, str) for c in ev.columns)
        for f in FIELDS[2:]:
            assert callable(getattr(ev, f)), (name, f)
        assert len(inspect.signature(ev.run).parameters) == 4
        assert len(inspect.signature(ev.prepare).parameters) == 2
        assert isinstance(ev.settings(settings()), dict)
        assert ev.fingerprint(settings())["status"] in ("ok", "missing")
    assert set(EVALUATIONS["zeroshot"].columns) == {*ZS_COLUMNS, "Avg"}
    assert EVALUATIONS["lambada"].columns == ("LAMB", "LAMB PPL")
    s = Session(settings(), CharTok())
    assert EVALUATIONS["zeroshot"].token_ids(s) is None
    assert EVALUATIONS["lambada"].token_ids(s) is None
    assert torch.equal(
        evaluation_for(str(path)).token_ids(s), CharTok()(path.read_text(), "pt").input_ids[0]
    )


def test_compare_keys_and_columns_unchanged():
    """What compare hashes and shows for its three evaluations is what it was before the registry."""
    cfg = settings(seqlen=2048, max_windows=40, c4_windows=256, limit=100, batch_size=16)
    assert EVALUATIONS["wikitext2"].settings(cfg) == {
        "name": "wikitext2",
        "seqlen": 2048,
        "max_windows": 40,
    }
    assert EVALUATIONS["c4"].settings(cfg) == {
        "name": "c4",
        "seqlen": 2048,
        "nwindows": 256,
        "max_windows": 40,
        "seed": 0,
    }
    zs = EVALUATIONS["zeroshot"].settings(cfg)
    assert zs["name"] == "zeroshot" and len(zs["tasks"]) == 7 and zs["limit"] == 100
    assert EVALUATIONS["lambada"].settings(cfg)["tasks"] == ("lambada_openai",)
    assert COLUMNS == ("method", "W2 PPL", "C4 PPL", *ZS_COLUMNS, "Avg")
    assert table_columns(["wikitext2", "zeroshot"]) == COLUMNS
    assert table_columns(["lambada"]) == (*COLUMNS, "LAMB PPL")


def test_text_file_perplexity_is_a_direct_call(tmp_path, tiny_llama):
    """A text file's entry: the same numbers as perplexity() on the whole text tokenized at once."""
    path = text_file(tmp_path)
    tok = CharTok()
    ev = evaluation_for(str(path))
    s = Session(settings(max_windows=4), tok)
    ev.prepare(s, 128)
    res = ev.run(tiny_llama, s, "text", None)
    ids = tok(path.read_text(), return_tensors="pt").input_ids[0]
    direct = perplexity(tiny_llama, ids, 32, 4, desc="text")
    assert res["ppl"].hex() == direct["ppl"].hex() and res["nll"].hex() == direct["nll"].hex()
    assert res["windows"] == 4 and res["total_windows"] == 5
    assert res["source"] == {
        "dataset": "file",
        "split": "all",
        "origin": str(path),
        "sha256": duquant.data.file_sha256(path),
    }
    assert provenance(s, str(path)) == {"source": res["source"]}
    assert ev.fingerprint(s.settings) == {"status": "ok", "source": res["source"]}
    assert metrics_key(str(path)) == "sample.txt" and metrics_key("wikitext2") == "wikitext2"
    assert ev.columns == ("sample.txt PPL",)


def test_wikitext2_entry_is_a_direct_call(tmp_path, monkeypatch, no_hub, tiny_llama):
    """WikiText-2 test: the whole split tokenized at once, then perplexity(); checkpoint honoured."""
    data = tmp_path / "data"
    (data / "wikitext2_raw").mkdir(parents=True)
    (data / "wikitext2_raw" / "wiki.test.raw").write_text(text_file(tmp_path).read_text() + "\n")
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(data))
    tok = CharTok()
    s = Session(settings(), tok)
    ev = EVALUATIONS["wikitext2"]
    ev.prepare(s, 128)
    partial = tmp_path / "partial.json"
    res = ev.run(tiny_llama, s, "w2", partial)
    text, src = duquant.data.eval_text("wikitext2")
    ids = tok(text, return_tensors="pt").input_ids[0]
    direct = perplexity(tiny_llama, ids, 32, None, desc="w2")
    assert res["ppl"].hex() == direct["ppl"].hex() and partial.is_file()
    assert res["source"] == dataclasses.asdict(src)
    assert torch.equal(ev.token_ids(s), ids)


def test_prepare_refuses_short_text_and_foreign_ids(tmp_path):
    """Too short for one window, or ids past the embedding: one-line ValueErrors naming the fix."""
    path = text_file(tmp_path, n=20)
    ev = evaluation_for(str(path))
    with pytest.raises(ValueError, match="20 tokens, fewer than one window of --seqlen 32") as exc:
        ev.prepare(Session(settings(), CharTok()), 128)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"--eval {path}:") and "smaller --seqlen" in msg
    with pytest.raises(ValueError, match="embedding has 64 rows") as exc:
        ev.prepare(Session(settings(seqlen=8), CharTok()), 64)
    assert "\n" not in str(exc.value)


def test_unknown_evaluation_is_a_clear_error(tmp_path):
    """A name that is neither an entry nor a file: one line naming it and the choices."""
    with pytest.raises(ValueError, match="'nope'") as exc:
        evaluation_for("nope")
    msg = str(exc.value)
    assert "\n" not in msg and "wikitext2" in msg and "text file" in msg
    with pytest.raises(ValueError):
        evaluation_for(str(tmp_path / "absent.txt"))


def test_lambada_without_data_is_missing(no_hub):
    """Offline with no LAMBADA file: fingerprint 'missing' naming the file; prepare refuses in one line."""
    fp = EVALUATIONS["lambada"].fingerprint(settings())
    assert fp["status"] == "missing" and "lambada_test.jsonl" in fp["reason"]
    zs = EVALUATIONS["zeroshot"].fingerprint(settings())
    assert zs["status"] == "ok"  # zero-shot reports its missing tasks one by one, as before
    assert {t["mode"] for t in zs["tasks"].values()} == {"missing"}
    pytest.importorskip("lm_eval")
    with pytest.raises(ValueError, match="--eval lambada: data missing") as exc:
        EVALUATIONS["lambada"].prepare(Session(settings()), 128)
    assert "\n" not in str(exc.value)


def test_lambada_with_local_data(offline_zeroshot):
    """With the offline files, LAMBADA is planned from the local copy, its file's sha256 recorded."""
    fp = EVALUATIONS["lambada"].fingerprint(settings())
    assert fp["status"] == "ok"
    plan = fp["tasks"]["lambada_openai"]
    assert plan["mode"] == "local" and plan["files"][0]["path"].endswith("lambada_test.jsonl")


def test_lambada_values():
    """A LAMBADA result fills LAMB (%), LAMB PPL and its examples; a missing task says so."""
    ok = {
        "tasks": {
            "lambada_openai": {
                "status": "ok",
                "score": 0.5,
                "perplexity": 12.5,
                "n_examples": 4,
                "n_available": 5153,
            }
        }
    }
    values = EVALUATIONS["lambada"].values(ok)
    assert values == {"LAMB": 50.0, "LAMB PPL": 12.5, "examples": {"LAMB": "4/5153"}}
    missing = {"tasks": {"lambada_openai": {"status": "missing", "score": None}}}
    assert EVALUATIONS["lambada"].values(missing) == {"LAMB": "missing", "LAMB PPL": "missing"}


def test_zeroshot_prepare_checks_its_config():
    """An unknown task or source is refused before any model work, in one line."""
    with pytest.raises(ValueError, match="--eval zeroshot: unknown zero-shot task") as exc:
        EVALUATIONS["zeroshot"].prepare(Session(settings(tasks=["bogus"])), 128)
    assert "\n" not in str(exc.value)
