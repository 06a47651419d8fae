"""Evaluation suite: C4 protocol on a fixture, lm-eval wiring vs hand-computed scores, resumable compare."""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_tiny_llama

import duquant.data
import duquant.eval.c4 as c4mod
import duquant.eval.zeroshot as zs
from duquant.data import DataNotFoundError
from duquant.eval.c4 import C4_LOCAL, c4_windows, sample_windows
from duquant.eval.perplexity import perplexity
from duquant.eval.registry import EVALUATIONS, Session

TASKS_DIR = Path(zs.__file__).parent / "tasks"


class WordTokenizer:
    """A whitespace tokenizer: token id = hash bucket of the word (enough for window sampling)."""

    class _Enc:
        def __init__(self, ids: list[int]):
            self.input_ids = ids

    def __call__(self, text: str, **_: object) -> WordTokenizer._Enc:
        return self._Enc([sum(map(ord, w)) % 120 + 1 for w in text.split()])


@pytest.fixture
def no_hub(monkeypatch):
    """Nothing asks the network: the hub counts as unreachable everywhere."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(duquant.data, "hub_reachable", lambda *a, **k: False)


def write_c4_fixture(root: Path, n_docs: int = 40, seed: int = 1) -> list[str]:
    """A gzip JSON-lines C4 shard in the real layout under root/c4/; returns the documents."""
    rng = random.Random(seed)
    docs = [
        " ".join(f"w{rng.randint(0, 999)}" for _ in range(rng.randint(5, 120)))
        for _ in range(n_docs)
    ]
    path = root / C4_LOCAL
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(
                json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": f"u{i}"}) + "\n"
            )
    return docs


def reference_windows(docs: list[str], tok, seqlen: int, nwindows: int) -> torch.Tensor:
    """GPTQ/DuQuant `get_c4` validation sampling, written as they write it (global random.seed(0))."""
    random.seed(0)
    out = []
    for _ in range(nwindows):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tok(docs[i]).input_ids
            if len(ids) >= seqlen + 1:
                break
        i = random.randint(0, len(ids) - seqlen - 1)
        out.append(torch.tensor(ids[i : i + seqlen]))
    return torch.stack(out)


def test_c4_local_fixture_follows_protocol(tmp_path, monkeypatch, no_hub, tiny_llama):
    """The local shard is read, windows match the peers' sampling, PPL runs and records provenance."""
    docs = write_c4_fixture(tmp_path)
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(tmp_path))
    tok = WordTokenizer()
    windows, info = c4_windows(tok, seqlen=32, nwindows=6, seed=0)
    assert windows.shape == (6, 32)
    assert torch.equal(windows, reference_windows(docs, tok, 32, 6))
    assert info.documents == len(docs) and info.source.origin == str(tmp_path / C4_LOCAL)
    assert info.source.sha256 == duquant.data.file_sha256(tmp_path / C4_LOCAL)
    assert c4mod.c4_mode() == "local"
    session = Session(SimpleNamespace(seqlen=32, c4_windows=6, max_windows=4), tok)
    EVALUATIONS["c4"].prepare(session, 128)
    res = EVALUATIONS["c4"].run(tiny_llama, session, "c4", None)
    assert res["windows"] == 4 and res["total_windows"] == 6 and res["ppl"] > 1
    assert res["c4"]["nwindows"] == 6 and res["source"]["sha256"] == info.source.sha256
    direct = perplexity(tiny_llama, windows.reshape(-1), 32, 4, desc="c4")
    # the registry's C4 is perplexity() on the drawn windows, bit for bit
    assert res["ppl"].hex() == direct["ppl"].hex()
    assert torch.equal(EVALUATIONS["c4"].token_ids(session), windows.reshape(-1))


def test_c4_missing_names_the_file(tmp_path, monkeypatch, no_hub):
    """Offline without the shard: DataNotFoundError naming the file, and c4_mode says missing."""
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(tmp_path))
    assert c4mod.c4_mode() == "missing"
    with pytest.raises(DataNotFoundError, match="c4-validation.00000-of-00008.json.gz"):
        c4_windows(WordTokenizer(), seqlen=32, nwindows=2)


def test_c4_no_long_document_raises():
    """When no document is longer than seqlen the sampler stops instead of looping forever."""
    with pytest.raises(ValueError, match="longer than seqlen"):
        sample_windows(["a b c", "d e"], WordTokenizer(), seqlen=8, nwindows=1)


# ----------------------------------------------------------------------------- zero-shot wiring


class _TagLoader(yaml.SafeLoader):
    """A YAML loader that keeps `!function x` tags as plain strings."""


_TagLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {node.value}")


def _lm_eval_task_yaml(rel: str) -> dict:
    """One of lm-eval's own task YAMLs, following a single `include`."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / rel
    cfg = yaml.load(path.read_text(), Loader=_TagLoader)
    if "include" in cfg:
        base = yaml.load((path.parent / cfg.pop("include")).read_text(), Loader=_TagLoader)
        cfg = {**base, **cfg}
    return cfg


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("arc_easy_local.yaml", "arc/arc_easy.yaml"),
        ("arc_challenge_local.yaml", "arc/arc_challenge.yaml"),
        ("hellaswag_local.yaml", "hellaswag/hellaswag.yaml"),
        ("lambada_openai_local.yaml", "lambada/lambada_openai.yaml"),
        ("piqa_local.yaml", "piqa/piqa.yaml"),
        ("openbookqa_local.yaml", "openbookqa/openbookqa.yaml"),
        ("winogrande_local.yaml", "winogrande/default.yaml"),
    ],
)
def test_local_tasks_mirror_lm_eval(ours, theirs):
    """Prompts, targets, choices and metrics of our offline tasks are lm-eval's."""
    pytest.importorskip("lm_eval")
    mine = yaml.load((TASKS_DIR / ours).read_text(), Loader=_TagLoader)
    ref = _lm_eval_task_yaml(theirs)
    keys = ["output_type", "metric_list", "doc_to_text", "doc_to_target", "doc_to_choice"]
    if ours.startswith("winogrande"):  # same functions, copied into our utils module
        keys = ["output_type", "metric_list"]
        from duquant.eval.tasks import utils

        doc = {
            "sentence": "The cup fell on _ because it broke.",
            "option1": "A",
            "option2": "B",
            "answer": "2",
        }
        assert utils.winogrande_doc_to_text(doc) == 1
        assert utils.winogrande_doc_to_choice(doc) == ["The cup fell on A", "The cup fell on B"]
        assert utils.winogrande_doc_to_target(doc) == "because it broke."
    for k in keys:
        assert mine.get(k) == ref.get(k), k


def test_missing_zero_shot_data_is_reported(tmp_path, monkeypatch, no_hub):
    """Without local files every task is planned as missing, naming its file; the average says so."""
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(tmp_path))
    plans = zs.plan_tasks(zs.ZeroShotConfig())
    assert [p.mode for p in plans] == ["missing"] * 7
    assert "ARC-Easy-Test.jsonl" in plans[0].reason
    tasks = {p.name: {"status": "missing", "score": None} for p in plans}
    tasks["piqa"] = {"status": "ok", "score": 0.5}
    avg = zs.average(tasks)
    assert avg["over"] == ["piqa"] and len(avg["missing"]) == 6 and not avg["complete"]


def test_hellaswag_local_parses(offline_zeroshot):
    """The llama.cpp HellaSwag copy: 10042 tasks, four endings, gold in 0..3."""
    from duquant.eval.tasks import utils

    rows = utils.hellaswag_rows(offline_zeroshot / utils.LOCAL_FILES["hellaswag"][0])
    assert len(rows) == 10042
    assert all(len(r["choices"]) == 4 and 0 <= r["label"] <= 3 for r in rows)


@torch.no_grad()
def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized the way lm-eval's HFLM does for causal models."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx) :]
    logits = model(torch.tensor([whole[:-1]])).logits[0].float()
    logp = F.log_softmax(logits, dim=-1)[len(ctx) - 1 :]
    return sum(logp[i, t].item() for i, t in enumerate(cont))


@pytest.mark.model
def test_zero_shot_matches_hand_computed(smollm, offline_zeroshot, one_thread):
    """ARC-Easy acc/acc_norm and WinoGrande acc from our lm-eval wiring equal a hand computation."""
    pytest.importorskip("lm_eval")
    model, tok, limit = smollm.model, smollm.tokenizer, 4
    out = zs.evaluate_zeroshot(
        model,
        tok,
        zs.ZeroShotConfig(tasks=("arc_easy", "winogrande"), limit=limit, batch_size=4),
        log_samples=True,
    )
    arc = out["tasks"]["arc_easy"]
    assert arc["status"] == "ok" and arc["source"] == "local" and arc["n_examples"] == limit
    assert arc["n_available"] == 2376 and arc["files"][0]["sha256"].startswith("ce32a0774b4beb19")
    rows = [json.loads(line) for line in (offline_zeroshot / "arc/ARC-Easy-Test.jsonl").open()][
        :limit
    ]
    acc, acc_norm = [], []
    for row, sample in zip(rows, sorted(arc["samples"], key=lambda s: s["doc_id"]), strict=True):
        q = row["question"]
        choices = [c["text"] for c in q["choices"]]
        gold = [c["label"] for c in q["choices"]].index(row["answerKey"])
        lls = [
            _loglikelihood(model, tok, f"Question: {q['stem']}\nAnswer:", " " + c) for c in choices
        ]
        theirs = [r[0][0] for r in sample["resps"]]
        assert theirs == pytest.approx(lls, abs=2e-3)
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == gold))
        normed = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
        acc_norm.append(float(max(range(len(lls)), key=normed.__getitem__) == gold))
        assert sample["acc"] == acc[-1] and sample["acc_norm"] == acc_norm[-1]
    assert arc["acc"] == pytest.approx(sum(acc) / limit)
    assert arc["acc_norm"] == pytest.approx(sum(acc_norm) / limit) == pytest.approx(arc["score"])

    wg = out["tasks"]["winogrande"]
    rows = [json.loads(line) for line in (offline_zeroshot / "winogrande/dev.jsonl").open()][:limit]
    acc = []
    for (
        row
    ) in rows:  # partial scoring: context = sentence up to the blank + option, target = the rest
        cut = row["sentence"].index("_")
        target = " " + row["sentence"][cut + 1 :].strip()
        lls = [
            _loglikelihood(model, tok, row["sentence"][:cut] + row[o], target)
            for o in ("option1", "option2")
        ]
        acc.append(float(lls.index(max(lls)) == int(row["answer"]) - 1))
    assert wg["score"] == pytest.approx(sum(acc) / limit) and wg["metric"] == "acc"
    assert out["average"]["over"] == ["arc_easy", "winogrande"]
    assert out["average"]["value"] == pytest.approx((arc["score"] + wg["score"]) / 2)


# ----------------------------------------------------------------------------- compare


class _FakeTok:
    """Enough tokenizer for compare's bookkeeping (the evaluators are replaced in these tests)."""


def _loaded(model):
    """A LoadedModel around a tiny model."""
    from duquant.models import LoadedModel

    return LoadedModel(model, _FakeTok(), "tiny-llama")


def test_compare_resumes_after_interruption(tmp_path, monkeypatch, no_hub, tiny_llama):
    """An interrupted compare, re-run, computes only the unfinished cell; a third run computes nothing."""
    import duquant.api
    import duquant.compare as cmp

    data = tmp_path / "data"
    (data / "wikitext2_raw").mkdir(parents=True)
    (data / "wikitext2_raw" / "wiki.test.raw").write_text(" = T = \n\n some text here \n")
    write_c4_fixture(data)
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(data))

    calls: list[tuple[str, str]] = []
    fail_on = {("rtn", "c4")}

    def fake(name):
        def run(model, session, desc, partial):
            label = desc.split(" ")[0]
            if (label, name) in fail_on:
                raise KeyboardInterrupt  # the user pressed Ctrl-C during rtn's C4
            calls.append((label, name))
            return {"ppl": 10.0 + len(calls), "windows": 1}

        return run

    for name in ("wikitext2", "c4"):
        monkeypatch.setitem(
            cmp.EVALUATIONS, name, dataclasses.replace(cmp.EVALUATIONS[name], run=fake(name))
        )
    quantized: list[str] = []
    real_quantize = duquant.api.quantize_loaded

    def counting_quantize(plan, *a, **k):
        quantized.append(plan.recipe.name)
        return real_quantize(plan, *a, **k)

    monkeypatch.setattr(duquant.api, "quantize_loaded", counting_quantize)
    cfg = cmp.CompareConfig(
        methods=["fp", "rtn"], evals=["wikitext2", "c4"], out=str(tmp_path / "out")
    )
    loaded = _loaded(tiny_llama)

    with pytest.raises(KeyboardInterrupt):
        cmp.run_compare(cfg, loaded)
    assert calls == [("fp", "wikitext2"), ("fp", "c4"), ("rtn", "wikitext2")]
    assert quantized == ["rtn"]
    assert len(list((tmp_path / "out" / "cache").glob("*.json"))) == 3

    fail_on.clear()
    calls.clear()
    quantized.clear()
    table = cmp.run_compare(cfg, loaded)
    assert calls == [("rtn", "c4")] and quantized == ["rtn"]
    assert [r["label"] for r in table["rows"]] == ["fp", "rtn"]
    assert table["rows"][1]["values"]["C4 PPL"] == 11.0
    for f in ("table.md", "table.json", "table.png"):
        assert (tmp_path / "out" / f).is_file()
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| method | W2 PPL | C4 PPL | ARC-E |" in md

    calls.clear()
    quantized.clear()
    cmp.run_compare(cfg, loaded)
    assert calls == [] and quantized == []

    # a changed evaluation setting is a different result: only that recomputes
    cmp.run_compare(cmp.CompareConfig(**{**cfg.__dict__, "max_windows": 3}), loaded)
    assert sorted(calls) == [("fp", "c4"), ("fp", "wikitext2"), ("rtn", "c4"), ("rtn", "wikitext2")]
    recs = [json.loads(p.read_text()) for p in (tmp_path / "out" / "cache").glob("rtn-*-c4-*.json")]
    assert sorted(str(r["config"]["eval"]["max_windows"]) for r in recs) == ["3", "None"]
    assert recs[0]["config"]["data"]["source"]["sha256"] == duquant.data.file_sha256(
        data / C4_LOCAL
    )


def test_compare_reports_missing_and_rejects_unknown_weights(
    tmp_path, monkeypatch, no_hub, tiny_llama
):
    """C4 absent offline is 'missing' in the table (not cached); an unknown weight quantizer is a clear error."""
    import duquant.compare as cmp

    data = tmp_path / "data"
    (data / "wikitext2_raw").mkdir(parents=True)
    (data / "wikitext2_raw" / "wiki.test.raw").write_text("some text\n")
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(data))
    w2 = dataclasses.replace(
        cmp.EVALUATIONS["wikitext2"], run=lambda m, s, d, p: {"ppl": 5.0, "windows": 1}
    )
    monkeypatch.setitem(cmp.EVALUATIONS, "wikitext2", w2)
    cfg = cmp.CompareConfig(methods=["fp"], evals=["wikitext2", "c4"], out=str(tmp_path / "out"))
    table = cmp.run_compare(cfg, _loaded(tiny_llama))
    values = table["rows"][0]["values"]
    assert values["W2 PPL"] == 5.0 and values["C4 PPL"] == "missing"
    assert "c4 missing" in (tmp_path / "out" / "table.md").read_text()
    assert len(list((tmp_path / "out" / "cache").glob("*.json"))) == 1

    with pytest.raises(ValueError, match="--weights bogus"):
        cmp.CompareConfig(
            methods=["rtn"], weights=["bogus"], evals=["wikitext2"], out=str(tmp_path / "o2")
        )
    with pytest.raises(ValueError, match="unknown method"):
        cmp.CompareConfig(methods=["nope"])


def test_star_method_means_gptq_weights():
    """`quarot*` is QuaRot with GPTQ weights (the paper's notation), next to --weights for the rest."""
    import duquant.compare as cmp

    cfg = cmp.CompareConfig(methods=["fp", "rtn", "quarot", "quarot*"], weights=["rtn"])
    assert cmp.jobs_of(cfg) == [
        cmp.Job("fp", None),
        cmp.Job("rtn", "rtn"),
        cmp.Job("quarot", "rtn"),
        cmp.Job("quarot", "gptq"),
    ]
    assert cmp.jobs_of(cfg)[-1].label == "quarot (gptq)"
    with pytest.raises(ValueError, match="unknown method"):
        cmp.CompareConfig(methods=["nope*"])


class _CharTok:
    """Character-code tokenizer (ids < 128) with the call shape compare uses."""

    def __call__(self, text: str, return_tensors: str = "pt"):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 128 for c in text]]))


def test_compare_resumes_inside_a_perplexity_cell(tmp_path, monkeypatch, no_hub, tiny_llama):
    """Interrupted mid-way through W2, a re-run keeps the finished windows; the result equals a clean run's."""
    import duquant.compare as cmp

    pplmod = importlib.import_module(
        "duquant.eval.perplexity"
    )  # the package re-exports the function
    import duquant.models
    from duquant.models import LoadedModel

    data = tmp_path / "data"
    (data / "wikitext2_raw").mkdir(parents=True)
    text = "".join(chr(32 + (7 * i) % 90) for i in range(5 * 32 + 3))
    (data / "wikitext2_raw" / "wiki.test.raw").write_text(text)
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(data))
    real = pplmod._window_nll
    seen: list[int] = []
    stop = {"at": 4}

    def counted(model, window, index):
        seen.append(index)
        if len(seen) == stop["at"]:
            raise KeyboardInterrupt
        return real(model, window, index)

    monkeypatch.setattr(pplmod, "_window_nll", counted)
    kw = dict(methods=["rtn"], evals=["wikitext2"], seqlen=32)
    cfg = cmp.CompareConfig(**kw, out=str(tmp_path / "out"))
    with pytest.raises(KeyboardInterrupt):
        cmp.run_compare(cfg, LoadedModel(make_tiny_llama(), _CharTok(), "tiny-llama"))
    partial = list((tmp_path / "out" / "cache" / "partial").glob("*.json"))
    assert len(partial) == 1 and len(json.loads(partial[0].read_text())["window_nll"]) == 3

    seen.clear()  # --cached-only: the table so far, nothing computed, the pending cell's progress shown

    def no_loading(*a, **k):
        raise AssertionError("--cached-only loaded a model")

    monkeypatch.setattr(duquant.models, "load_model", no_loading)
    only = cmp.run_compare(
        cmp.CompareConfig(**kw, model="tiny-llama", out=cfg.out, cached_only=True), None
    )
    assert seen == [] and only["rows"][0]["values"]["W2 PPL"] is None
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| rtn | – |" in md and "not computed yet (`–`): rtn wikitext2 (3 windows done)" in md

    stop["at"] = None
    table = cmp.run_compare(cfg, LoadedModel(make_tiny_llama(), _CharTok(), "tiny-llama"))
    assert seen == [2, 3, 4]  # window 2 re-checked, then the two that were left
    assert not partial[0].exists()
    rec = json.loads(next((tmp_path / "out" / "cache").glob("rtn-*.json")).read_text())
    assert rec["result"]["resumed_windows"] == 3 and rec["result"]["windows"] == 5
    clean = cmp.run_compare(
        cmp.CompareConfig(**kw, out=str(tmp_path / "clean")),
        LoadedModel(make_tiny_llama(), _CharTok(), "tiny-llama"),
    )
    assert table["rows"][0]["values"]["W2 PPL"] == pytest.approx(
        clean["rows"][0]["values"]["W2 PPL"], rel=1e-9
    )
