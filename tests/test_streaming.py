"""Streaming: block-by-block quantization from safetensors gives the in-memory path's logits, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama

from duquant.methods import get_method
from duquant.models import adapter_for
from duquant.models.streaming import SafetensorsCheckpoint, activation_bytes
from duquant.pipeline import QuantConfig, quantize_model
from duquant.qlinear import QuantLinear
from duquant.stream import quantize_streaming, streamed_nll


def _saved_llama(tmp_path, tie: bool):
    m = make_tiny_llama(seed=2, tie_word_embeddings=tie, num_hidden_layers=3)
    m.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")  # several shards
    return m


@pytest.mark.parametrize(
    "method,weights", [("duquant++", "rtn"), ("rtn", "rtn"), ("duquant++", "gptq")]
)
@pytest.mark.parametrize("tie", [False, True])
def test_streaming_matches_in_memory_bit_for_bit(tmp_path, method, weights, tie):
    from transformers import AutoModelForCausalLM

    _saved_llama(tmp_path, tie)
    ckpt = tmp_path / "ckpt"
    assert len({*SafetensorsCheckpoint(ckpt).weight_map.values()}) > 1
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    cfg = get_method(method, max_steps=8)
    quant = QuantConfig(weights=weights)

    ref_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    quantize_model(ref_model, adapter_for(ref_model), cfg, quant, ids, seed=1)
    with torch.no_grad():
        ref = [ref_model(w.unsqueeze(0)).logits for w in ids]

    model, adapter, store, report = quantize_streaming(
        ckpt, cfg, quant, ids, tmp_path / "work", seed=1
    )
    assert len(report.plans) == 3
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        f"block_0000{i}.pt" for i in range(3)
    ]
    # nothing of the model stays loaded between blocks
    assert all(p.device.type == "meta" for p in model.parameters())
    from duquant.stream import streamed_logits

    got = streamed_logits(model, adapter, store, ids)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    block = store.load(1)
    assert isinstance(block.mlp.down_proj, QuantLinear)
    store.release(1)
    assert all(p.device.type == "meta" for p in model.parameters())
    nll = streamed_nll(model, adapter, store, ids)
    expect = torch.stack(
        [torch.nn.functional.cross_entropy(r[0, :-1], w[1:]) for r, w in zip(ref, ids, strict=True)]
    ).mean()
    assert abs(nll - float(expect)) < 1e-5


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "gemma3", "gemma3-softcap", "phi3"])
def test_streaming_other_families_match_in_memory(tmp_path, family):
    """A MoE checkpoint (experts saved one by one) and per-layer attention kinds stream exactly too."""
    from conftest import make_tiny_family
    from transformers import AutoModelForCausalLM

    from duquant.stream import streamed_logits

    model = make_tiny_family(family.removesuffix("-softcap"))
    if family.endswith("-softcap"):
        model.config.final_logit_softcapping = 3.0  # logits reach ~80 uncapped: the cap matters
    model.save_pretrained(tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    cfg, quant = get_method("duquant++", max_steps=4), QuantConfig()
    ref_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    quantize_model(ref_model, adapter_for(ref_model), cfg, quant, ids)
    with torch.no_grad():
        ref = [ref_model(w.unsqueeze(0)).logits for w in ids]
    model, adapter, store, _ = quantize_streaming(ckpt, cfg, quant, ids, tmp_path / "work")
    got = streamed_logits(model, adapter, store, ids)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_streaming_fp_reads_the_checkpoint_and_writes_nothing(tmp_path):
    from transformers import AutoModelForCausalLM

    from duquant.stream import streamed_logits

    _saved_llama(tmp_path, False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        ref = [ref_model(w.unsqueeze(0)).logits for w in ids]
    model, adapter, store, _ = quantize_streaming(
        tmp_path / "ckpt", get_method("fp"), QuantConfig(), None, tmp_path / "w"
    )
    got = streamed_logits(model, adapter, store, ids)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    assert not list((tmp_path / "w").iterdir())


def test_streaming_refuses_a_checkpoint_in_another_layout(tmp_path):
    # Mixtral's files name experts block_sparse_moe.experts.N.w1/w2/w3, not the in-memory layout
    from conftest import make_tiny_family

    make_tiny_family("mixtral").save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        ValueError, match="block 0 do not match the model.*transformers' own layout"
    ):
        quantize_streaming(tmp_path / "ckpt", get_method("rtn"), QuantConfig(), ids, tmp_path / "w")


def test_streaming_refuses_global_rotation_and_a_mismatched_checkpoint(tmp_path):
    _saved_llama(tmp_path, False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="quarot rotates the whole model"):
        quantize_streaming(
            tmp_path / "ckpt", get_method("quarot"), QuantConfig(), ids, tmp_path / "w"
        )
    with pytest.raises(ValueError, match="over the budget"):
        quantize_streaming(
            tmp_path / "ckpt",
            get_method("rtn"),
            QuantConfig(),
            ids,
            tmp_path / "w",
            max_activation_mb=0.01,
        )
    assert activation_bytes(2, 16, 64) == 2 * 2 * 16 * 64 * 4
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SafetensorsCheckpoint(tmp_path)


def _cli_checkpoint(tmp_path, monkeypatch, tie: bool):
    """A tiny Llama safetensors folder with a tokenizer, offline, and `duquant run` arguments on an
    evaluation text of 6 windows of 32 tokens."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import duquant.data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DUQUANT_DATA_DIR", raising=False)
    monkeypatch.setattr(duquant.data, "hub_reachable", lambda *a, **k: False)
    _saved_llama(tmp_path, tie)
    ckpt = tmp_path / "ckpt"
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0").save_pretrained(ckpt)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"t{(7 * i) % 128}" for i in range(200)))
    args = ["run", "--model", str(ckpt), "--method", "duquant++", "--eval", str(text)]
    args += ["--seqlen", "32", "--nsamples", "4", "--calib-seqlen", "32"]
    return ckpt, args


def test_run_stream_equals_the_in_memory_run(tmp_path, capsys, monkeypatch):
    """`duquant run --stream` on a safetensors folder gives the in-memory run's perplexity exactly,
    and bad streaming input is refused in one line before anything is written."""
    from duquant.cli import main

    ckpt, args = _cli_checkpoint(tmp_path, monkeypatch, tie=False)
    results = {}
    for mode, extra in (
        ("memory", []),
        ("stream", ["--stream", "--work-dir", str(tmp_path / "w")]),
    ):
        out = tmp_path / f"{mode}.json"
        assert main([*args, *extra, "--output", str(out)]) == 0, capsys.readouterr().err
        results[mode] = json.loads(out.read_text())["metrics"]["eval.txt"]
    assert results["stream"]["windows"] == results["memory"]["windows"] == 6
    assert results["stream"]["ppl"] == results["memory"]["ppl"]
    assert len(list((tmp_path / "w").glob("block_*.pt"))) == 3
    capsys.readouterr()
    no_st = tmp_path / "no_safetensors"
    no_st.mkdir()
    (no_st / "config.json").write_text((ckpt / "config.json").read_text())
    for bad, needle in (
        (["--model", str(tmp_path / "nope"), "--stream"], "no such file"),
        (["--model", str(no_st), "--stream"], "not a checkpoint folder with safetensors"),
        (
            ["--model", str(ckpt), "--stream", "--format", "nvfp4", "--save", str(tmp_path / "x")],
            "--save with --stream: a nvfp4 export",
        ),
        (["--model", str(ckpt), "--work-dir", str(tmp_path / "w3")], "--stream runs only"),
        (["--model", str(ckpt), "--stream", "--method", "quarot"], "rotates the whole model"),
    ):
        assert main(["run", *bad, "--output", str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
        assert not (tmp_path / "bad.json").exists() and not (tmp_path / "w3").exists()


@pytest.mark.parametrize("tie", [False, True])
def test_run_stream_save_equals_the_in_memory_export(tmp_path, capsys, monkeypatch, tie):
    """`duquant run --stream --save` writes one shard per block plus one of the rest, with an index
    naming every tensor; the tensors, the quantization config, the reloaded logits and perplexity
    are the in-memory export's, bit for bit."""
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import load_file

    from duquant.cli import main
    from duquant.export import ExportError, ct

    _, args = _cli_checkpoint(tmp_path, monkeypatch, tie)
    for mode, extra in (
        ("memory", []),
        ("stream", ["--stream", "--work-dir", str(tmp_path / "w")]),
    ):
        out = tmp_path / f"{mode}.json"
        save = ["--save", str(tmp_path / f"{mode}_export"), "--output", str(out)]
        assert main([*args, *extra, *save]) == 0, capsys.readouterr().err
    mem, st = tmp_path / "memory_export", tmp_path / "stream_export"
    shards = sorted(p.name for p in st.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((st / "model.safetensors.index.json").read_text())
    got = {}
    for shard in shards:
        part = load_file(st / shard)
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(part)
        got.update(part)
    for i in range(3):  # each block's tensors in its own shard, nothing else there
        assert {k.split(".")[2] for k in load_file(st / shards[i])} == {str(i)}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in got.values()
    )
    want = load_file(mem / "model.safetensors")
    assert set(got) == set(want) and ("lm_head.weight" in got) != tie
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    qc = [json.loads((d / "config.json").read_text())["quantization_config"] for d in (mem, st)]
    assert qc[0] == qc[1] and qc[0]["transform_config"]["config_groups"]
    for f in ("tokenizer.json", "duquant.json", "README.md"):
        assert (st / f).is_file()
    sidecar = [json.loads((d / "duquant.json").read_text()) for d in (mem, st)]
    assert sidecar[0]["sizes"] == sidecar[1]["sizes"]
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = [ct.load(d)[0](ids).logits for d in (mem, st)]
    assert torch.equal(logits[0], logits[1])
    ppl = {}
    for name, d in (("memory", mem), ("stream", st)):
        out = tmp_path / f"{name}_reload.json"
        rel = ["run", "--model", str(d), "--method", "fp", "--eval", args[args.index("--eval") + 1]]
        assert main([*rel, "--seqlen", "32", "--output", str(out)]) == 0, capsys.readouterr().err
        ppl[name] = json.loads(out.read_text())["metrics"]["eval.txt"]["ppl"]
    assert ppl["memory"] == ppl["stream"]
    # and the reload is close to what the streamed run measured itself (same fake-quant model)
    measured = json.loads((tmp_path / "stream.json").read_text())["metrics"]["eval.txt"]["ppl"]
    assert abs(ppl["stream"] / measured - 1) < 1e-3
    # an index that does not match its shards is refused, not half-loaded
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    (st / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ExportError, match="does not hold the tensors"):
        ct.load(st)


def test_interrupted_stream_export_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A streamed export interrupted after its first shard leaves no directory and no partial."""
    import safetensors.torch

    from duquant.cli import main

    _, args = _cli_checkpoint(tmp_path, monkeypatch, tie=False)
    real, calls = safetensors.torch.save_file, []

    def interrupted(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    dest = tmp_path / "export"
    rc = main([*args, "--stream", "--work-dir", str(tmp_path / "w"), "--save", str(dest)])
    assert rc != 0 and len(calls) == 2 and "model-00001-of-00004" in str(calls[0])
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("method", ["best", "duquant++e2e"])
def test_streamed_best_on_the_command_line(tmp_path, capsys, monkeypatch, method):
    """`run --stream --method best` (and duquant++e2e, trained the same way) equals the in-memory
    run's perplexity; rerun on the work folder it filled (quantized blocks, not the full-precision
    teacher) it is refused in one line."""
    from duquant.cli import main

    ckpt, args = _cli_checkpoint(tmp_path, monkeypatch, tie=True)
    args[args.index("duquant++")] = method
    ppl = {}
    for mode, extra in (
        ("memory", []),
        ("stream", ["--stream", "--work-dir", str(tmp_path / "w")]),
    ):
        out = tmp_path / f"{mode}.json"
        assert main([*args, *extra, "--output", str(out)]) == 0, capsys.readouterr().err
        ppl[mode] = json.loads(out.read_text())["metrics"]["eval.txt"]["ppl"]
    assert ppl["stream"] == pytest.approx(ppl["memory"], rel=1e-5)
    capsys.readouterr()
    again = [
        *args,
        "--stream",
        "--work-dir",
        str(tmp_path / "w"),
        "--output",
        str(tmp_path / "x.json"),
    ]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give an empty --work-dir" in err, err
    assert not (tmp_path / "x.json").exists()
