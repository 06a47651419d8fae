"""The orchestration layer (duquant.api): the one-call `duquant.quantize`, equal to `duquant run`
on the same settings, refusing bad settings before loading, and exporting what it quantized."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama

import duquant
from duquant import api
from duquant.config import ConfigError, RunConfig
from duquant.methods import Recipe
from duquant.stages import Hadamard, Smooth

SMALL = dict(nsamples=2, calib_seqlen=16, seqlen=16, max_windows=2, seed=0)


@pytest.fixture
def tiny_folder(tmp_path, monkeypatch):
    """A tiny Llama folder with a word-level tokenizer, and a text to evaluate (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tiny"
    make_tiny_llama(5).save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(128)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0").save_pretrained(folder)
    text = tmp_path / "notes.txt"
    gen = torch.Generator().manual_seed(1)
    text.write_text(" ".join(f"t{int(i)}" for i in torch.randint(1, 128, (200,), generator=gen)))
    return folder, text


def test_quantize_equals_the_command_line_run(tiny_folder):
    """duquant.quantize(...) and `duquant run` with the same settings give the same perplexity."""
    folder, text = tiny_folder
    _, result = duquant.quantize(str(folder), recipe="duquant++", evals=[str(text)], **SMALL)
    cli = api.run(RunConfig(model=str(folder), method="duquant++", evals=[str(text)], **SMALL))
    key = text.name
    assert result["metrics"][key]["ppl"] == cli["metrics"][key]["ppl"]
    assert [s["stage"] for s in result["config"]["method"]["stages"]] == [
        "smooth",
        "greedy-rotation",
    ]


def test_quantize_with_a_python_recipe_and_save(tiny_folder, tmp_path):
    """A Recipe built in Python quantizes; --save writes an export that reloads to the same logits."""
    folder, _ = tiny_folder
    recipe = Recipe("mine", (Smooth(alpha=0.5), Hadamard(random=True)))
    model, result = duquant.quantize(
        str(folder), recipe=recipe, save=str(tmp_path / "out"), **SMALL
    )
    assert result["config"]["method"]["name"] == "mine"
    assert result["export"]["dir"] == str(tmp_path / "out")
    back = api.load_model(str(tmp_path / "out"))
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, model(ids).logits)
    info = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" in info


def test_bad_settings_are_refused_before_loading(tiny_folder, monkeypatch):
    """Unknown settings, an unknown recipe and a bad stage option: ConfigError, nothing loaded."""
    folder, _ = tiny_folder

    def boom(*a, **k):
        raise AssertionError("loaded despite bad settings")

    monkeypatch.setattr(api, "load_model", boom)
    with pytest.raises(ConfigError, match="unknown setting"):
        duquant.quantize(str(folder), recipe="rtn", colour="blue")
    with pytest.raises(ConfigError, match="--method nope"):
        duquant.quantize(str(folder), recipe="nope")
    with pytest.raises(ConfigError, match="power of two"):
        duquant.quantize(str(folder), recipe="duquant++", block_size=24)


def test_record_names_the_numeric_switches(monkeypatch):
    """DUQUANT_TRITON / DUQUANT_COMPILE_CODEC change numerics: every result records them."""
    monkeypatch.setenv("DUQUANT_TRITON", "1")
    record = api.record(api.check(RunConfig(method="rtn")), "m")
    assert record["switches"] == {"DUQUANT_TRITON": "1", "DUQUANT_COMPILE_CODEC": None}


def test_recipe_and_method_together_are_refused(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("stages: []\n")
    with pytest.raises(ConfigError, match="--recipe and --method"):
        api.check(RunConfig(method="duquant++", recipe=str(f)))
    assert api.check(RunConfig(recipe=str(f))).recipe.name == "r"


def test_quantize_with_your_own_calibration_windows(tiny_folder):
    """`calibration=` replaces WikiText-2's windows; the result records their shape and sha256,
    and the same windows give the same model."""
    folder, text = tiny_folder
    ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    kw = dict(recipe="duquant++", seqlen=16, max_windows=2)
    m1, r1 = duquant.quantize(str(folder), calibration=ids, evals=[str(text)], **kw)
    m2, r2 = duquant.quantize(str(folder), calibration=ids.clone(), **kw)
    assert r1["config"]["calibration"]["source"] == "user"
    assert r1["config"]["calibration"]["sha256"] == r2["config"]["calibration"]["sha256"]
    assert r1["metrics"][text.name]["ppl"] > 0
    x = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(m1(x).logits, m2(x).logits)
    with pytest.raises(ConfigError, match="2-D integer tensor"):
        duquant.quantize(str(folder), recipe="rtn", calibration=torch.zeros(4))


def test_the_run_table_shows_every_registry_evaluation():
    """`duquant run`'s printed table has a row per perplexity and per lm-eval task (LAMBADA with
    its perplexity), so --eval lambada / zeroshot results are not silently left out."""
    from duquant.cli import _table

    result = {
        "config": {"run": {"method": "rtn", "format": "mxfp4"}, "weights": {}, "activations": {}},
        "metrics": {
            "wikitext2": {"ppl": 82.6, "windows": 2, "seconds": 8.0},
            "lambada": {
                "tasks": {
                    "lambada_openai": {
                        "status": "ok",
                        "score": 0.06,
                        "perplexity": 929.7,
                        "n_examples": 50,
                        "seconds": 30.0,
                    },
                    "piqa": {"status": "missing"},
                }
            },
        },
    }
    rows = _table([result]).splitlines()
    assert len(rows) == 4
    assert "82.600" in rows[1] and "acc 6.0 (ppl 929.70)" in rows[2] and "missing" in rows[3]
