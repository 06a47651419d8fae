"""The converted-GGUF cache (duquant.models.gguf_cache): a GGUF load read back from the cache folder
gives the weights and tokenizer of transformers' own GGUF conversion, bit for bit; a damaged entry is
rebuilt, an unwritable cache falls back to converting, and nothing half-written is left."""

from __future__ import annotations

import logging

import torch
from conftest import make_tiny_llama

from duquant.models import gguf_cache


class _Tokenizer:
    """Stands in for a tokenizer: writes one file, as save_pretrained does."""

    def save_pretrained(self, folder) -> None:
        (folder / "tokenizer.json").write_text("{}")


def test_cache_location_and_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("DUQUANT_CACHE_DIR", str(tmp_path / "c"))
    assert gguf_cache.cache_root() == tmp_path / "c" / "gguf"
    monkeypatch.delenv("DUQUANT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert gguf_cache.cache_root() == tmp_path / "x" / "duquant" / "gguf"
    monkeypatch.setenv("DUQUANT_NO_GGUF_CACHE", "1")
    assert gguf_cache.cache_root() is None
    assert gguf_cache.entry_for(tmp_path / "any.gguf") is None


def test_entry_is_keyed_by_content(monkeypatch, tmp_path):
    """Same bytes under two names: one key; one byte changed: another."""
    monkeypatch.setenv("DUQUANT_CACHE_DIR", str(tmp_path / "c"))
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"GGUF" + bytes(100))
    assert gguf_cache.entry_for(a) == gguf_cache.entry_for(b)
    b.write_bytes(b"GGUF" + bytes(99) + b"\x01")
    assert gguf_cache.entry_for(a) != gguf_cache.entry_for(b)
    assert gguf_cache.entry_for(a).name.startswith("m-")


def test_write_entry_round_trips_a_tied_model(tmp_path):
    """The folder reloads as the same model (tied head included), and only the entry is left."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(3, tie_word_embeddings=True)
    entry = tmp_path / "gguf" / "tiny-0123"
    assert gguf_cache.write_entry(entry, model, _Tokenizer())
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == ["tiny-0123"]
    back = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)
    # a second writer finding the entry already there keeps it
    assert gguf_cache.write_entry(entry, model, _Tokenizer())


def test_unwritable_cache_is_one_warning_and_nothing_left(tmp_path, caplog):
    blocker = tmp_path / "gguf"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="duquant.models.gguf_cache"):
        assert not gguf_cache.write_entry(blocker / "tiny-0123", make_tiny_llama(1), _Tokenizer())
    assert "DUQUANT_NO_GGUF_CACHE" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["gguf"]


def test_real_gguf_cached_load_is_the_conversion(smollm, monkeypatch, tmp_path, caplog):
    """Against transformers' own GGUF load: the converted-then-cached load and a later cache read
    have the same float32 weights and tokenize the WikiText-2 test text identically; bfloat16 from
    the cache is the float32 weights rounded; a damaged entry is dropped and rebuilt."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from duquant.data import eval_text
    from duquant.models import load_model

    path = Path(smollm.source)
    monkeypatch.setenv("DUQUANT_CACHE_DIR", str(tmp_path / "c"))
    ref = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ref_sd = ref.state_dict()
    text = eval_text("wikitext2")[0]
    ref_ids = ref_tok(text).input_ids

    def same(loaded) -> bool:
        sd = loaded.model.state_dict()
        return sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)

    with caplog.at_level(logging.INFO, logger="duquant"):
        first = load_model(str(path))
    entry = gguf_cache.entry_for(path)
    assert entry.is_dir() and "converting the GGUF" in caplog.text
    assert same(first) and first.tokenizer(text).input_ids == ref_ids
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="duquant"):
        again = load_model(str(path))
    assert "from its converted copy" in caplog.text and "converting" not in caplog.text
    assert same(again) and again.tokenizer(text).input_ids == ref_ids
    assert len(again.tokenizer) == len(ref_tok) and again.tokenizer.eos_token == ref_tok.eos_token
    assert again.tokenizer.chat_template == ref_tok.chat_template
    bf16 = load_model(str(path), dtype="bfloat16").model.state_dict()
    assert all(torch.equal(bf16[k], ref_sd[k].to(torch.bfloat16)) for k in ref_sd)
    (entry / "model.safetensors").write_bytes(b"damaged")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="duquant"):
        rebuilt = load_model(str(path))
    assert "dropping the cached GGUF conversion" in caplog.text and same(rebuilt)
    assert entry.is_dir() and (entry / "model.safetensors").stat().st_size > 10**6
