"""Architecture adapters, weight checks and default-model resolution (tiny random models, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG
from torch import nn

from duquant.models import (
    ADAPTERS,
    UnsupportedArchitectureError,
    adapter_for,
    default_model,
    load_model,
    loading,
)
from duquant.models.loading import ModelSourceError, check_finite_weights

TINY = dict(TINY_CONFIG, max_position_embeddings=128)


def _tiny(arch: str) -> nn.Module:
    import transformers

    config_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
    }[arch]
    torch.manual_seed(0)
    return getattr(transformers, arch)(config_cls(**TINY)).eval()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_adapter_lookup_and_layout(arch):
    model = _tiny(arch)
    adapter = adapter_for(model)
    assert adapter is ADAPTERS[arch]
    blocks = adapter.blocks(model)
    assert len(blocks) == 2
    names = adapter.linear_names()
    assert len(names) == 7 and len(set(names)) == 7
    for block in blocks:
        # the adapter names exactly the block's linears
        linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        assert set(names) == linears
        for g in adapter.groups:
            first = block.get_submodule(g.linears[0])
            for lname in g.linears:  # linears of a group read the same input width
                assert block.get_submodule(lname).in_features == first.in_features
            if g.norm:
                norm = block.get_submodule(g.norm)
                assert norm.weight.shape == (first.in_features,)
            if g.producer:  # the producer's output rows feed this group's input
                prod = block.get_submodule(g.producer)
                assert isinstance(prod, nn.Linear)
    assert adapter.group_of("mlp.down_proj").name == "down"
    assert adapter.group_of("self_attn.k_proj").name == "qkv"
    with pytest.raises(KeyError):
        adapter.group_of("mlp.nope")
    assert isinstance(model.get_submodule(adapter.embed), nn.Embedding)
    assert isinstance(model.get_submodule(adapter.lm_head), nn.Linear)
    model.get_submodule(adapter.final_norm)


def test_adapter_by_config_architectures():
    """A wrapper class is recognised by `config.architectures` too."""
    model = _tiny("LlamaForCausalLM")

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.config = inner.config
            self.model = inner.model

    wrapped = Wrapped(model)
    wrapped.config.architectures = ["LlamaForCausalLM"]
    assert adapter_for(wrapped) is ADAPTERS["LlamaForCausalLM"]


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    )
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for(model)
    msg = str(info.value)
    assert "GPT2LMHeadModel" in msg
    for arch in (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
        "Qwen3MoeForCausalLM",
    ):
        assert arch in msg
    assert isinstance(info.value, ValueError)  # the CLI reports ValueErrors cleanly


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_weights_rejects_non_finite(bad):
    model = _tiny("LlamaForCausalLM")
    check_finite_weights(model)  # a healthy model passes
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 7] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        check_finite_weights(model)


def test_default_model_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DUQUANT_MODEL", "some-org/some-model")
    assert default_model() == "some-org/some-model"
    gguf = tmp_path / "x.gguf"
    monkeypatch.setenv("DUQUANT_MODEL", str(gguf))
    assert default_model() == str(gguf)


def test_default_model_search_order(monkeypatch, tmp_path):
    monkeypatch.delenv("DUQUANT_MODEL", raising=False)
    cache, shared = tmp_path / "cache", tmp_path / "shared" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(loading, "_shared_candidates", lambda: [shared])
    with pytest.raises(FileNotFoundError) as info:
        default_model()
    assert str(shared) in str(info.value) and "DUQUANT_MODEL" in str(info.value)
    shared.mkdir(parents=True)
    (shared / loading.DEFAULT_MODEL_FILE).write_bytes(b"")
    assert default_model() == str(shared / loading.DEFAULT_MODEL_FILE)
    (cache / "duquant" / "models").mkdir(parents=True)
    (cache / "duquant" / "models" / loading.DEFAULT_MODEL_FILE).write_bytes(b"")
    assert (
        Path(default_model()).parent == cache / "duquant" / "models"
    )  # the user cache comes first


def test_load_model_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tmp_path / "m.gguf"), dtype="float8")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_load_model_local_hf_dir(tmp_path, monkeypatch):
    """A local Hugging Face directory (model + tokenizer files) loads offline, in eval mode."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _tiny("LlamaForCausalLM")
    model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(128)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0").save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.source == str(tmp_path)
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    ids = loaded.tokenizer("t5 t7 t9", return_tensors="pt").input_ids
    assert ids[0, -3:].tolist() == [5, 7, 9]
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    bf16 = load_model(str(tmp_path), dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    # a damaged weights file: one ModelSourceError naming it, not the reader's own exception
    (tmp_path / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(ModelSourceError, match="safetensors file is damaged"):
        load_model(str(tmp_path))


@pytest.mark.model
def test_smollm_layout(smollm):
    """The real default model: Llama layout as the design notes describe it, finite weights."""
    model = smollm.model
    adapter = adapter_for(model)
    assert adapter.name == "llama"
    assert len(adapter.blocks(model)) == 30
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size) == (576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert smollm.source.endswith(".gguf")  # load_model already ran check_finite_weights on it


def test_unsupported_checkpoint_folder_is_refused_before_loading(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    # no weights and no tokenizer there: the error must come from the architecture check
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel is not supported"):
        load_model(str(tmp_path))
