"""Trust nothing on disk: model folders, work folders and kept blocks are validated as they are read.

Every violation is one ValueError line naming the file (and the tensor or key), exit status 2 from
the command line, nothing written, the inputs unchanged; no pickle is ever loaded (a crafted one
whose __reduce__ writes a marker file never runs).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from duquant.models.streaming import MANIFEST, WorkDirError

MARKER = "pwned.txt"


class _Crafted:
    """A pickle that, when unpickled, writes a marker file (what an attacker's code would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def _crafted_pickle(dest: Path, marker: Path) -> None:
    torch.save({"model.embed_tokens.weight": _Crafted(marker)}, dest)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0").save_pretrained(folder)


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """Offline, a tiny Llama folder with a tokenizer, an evaluation text; `duquant run` args."""
    pytest.importorskip("tokenizers")
    import duquant.data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DUQUANT_DATA_DIR", raising=False)
    monkeypatch.setenv("DUQUANT_NO_GGUF_CACHE", "1")
    monkeypatch.setattr(duquant.data, "hub_reachable", lambda *a, **k: False)
    ckpt = tmp_path / "ckpt"
    make_tiny_llama(seed=2, num_hidden_layers=2).save_pretrained(ckpt)
    _tokenizer(ckpt)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"t{(7 * i) % 128}" for i in range(200)))
    args = ["--eval", str(text), "--seqlen", "32", "--nsamples", "4", "--calib-seqlen", "32"]
    return ckpt, args


def _refused(capsys, argv: list[str], needle: str, out: Path, inputs: list[Path]) -> str:
    """`duquant run argv` fails in one line holding `needle`, exit 2, writes nothing, changes no
    input."""
    from duquant.cli import main

    before = [_snapshot(p) for p in inputs]
    capsys.readouterr()
    assert main(["run", *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # the error line, after the progress bars (transformers' and duquant's: carriage returns)
    lines = [x.rsplit("\r", 1)[-1] for x in err.splitlines()]
    lines = [x for x in lines if x.strip() and not x.endswith(("it/s]", "s/it]"))]
    assert len(lines) == 1, err
    err = lines[0]
    assert err.startswith("duquant run: error: ") and needle in err, err
    assert not out.exists()
    assert [_snapshot(p) for p in inputs] == before
    return err


def _ok(capsys, argv: list[str], out: Path) -> dict:
    from duquant.cli import main

    capsys.readouterr()
    assert main(["run", *argv, "--output", str(out)]) == 0, capsys.readouterr().err
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- 1. no pickle


def test_crafted_pickle_in_work_dir_is_never_run(tmp_path, capsys, cli_env):
    """A crafted block_*.pt in a work folder (bare, or in place of a kept block) never runs: one
    line naming the folder or file."""
    from duquant.models.streaming import _load_block

    ckpt, args = cli_env
    marker = tmp_path / MARKER
    base = ["--model", str(ckpt), "--method", "rtn", "--stream", *args]
    # a folder holding a crafted block and nothing of duquant's
    bare = tmp_path / "bare"
    bare.mkdir()
    _crafted_pickle(bare / "block_00000.pt", marker)
    _refused(
        capsys,
        [*base, "--work-dir", str(bare)],
        f"--work-dir {bare}",
        tmp_path / "o.json",
        [bare, ckpt],
    )
    # a work folder of this very run, its first block replaced
    work = tmp_path / "work"
    _ok(capsys, [*base, "--work-dir", str(work)], tmp_path / "first.json")
    assert (work / MANIFEST).is_file() and (work / "block_00001.pt").is_file()
    _crafted_pickle(work / "block_00000.pt", marker)
    err = _refused(
        capsys,
        [*base, "--work-dir", str(work)],
        "block_00000.pt",
        tmp_path / "o.json",
        [work, ckpt],
    )
    assert "changed since" in err
    # read directly (no digest to compare with): refused by the reader, never unpickled
    from duquant.models.streaming import open_streamed

    _, _, store = open_streamed(ckpt, tmp_path / "w2")
    with pytest.raises(WorkDirError, match="block_00000.pt: not a block file"):
        _load_block(work / "block_00000.pt", store._pristine[0], "cpu", None)
    assert not marker.exists()


def test_pickle_model_folder_is_refused_never_unpickled(tmp_path, capsys, cli_env):
    """A model folder with pickle weights (pytorch_model.bin) is refused in one line naming it,
    in memory and streamed; the pickle never runs."""
    ckpt, args = cli_env
    marker = tmp_path / MARKER
    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in ckpt.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    _crafted_pickle(folder / "pytorch_model.bin", marker)
    for extra in ([], ["--stream"]):
        _refused(
            capsys,
            ["--model", str(folder), "--method", "fp", *args, *extra],
            "pytorch_model.bin" if not extra else "safetensors",
            tmp_path / "o.json",
            [folder],
        )
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. fingerprint


def test_work_dir_of_another_run_is_refused_and_the_same_run_reuses_it(tmp_path, capsys, cli_env):
    """Blocks a work folder keeps are reused only by a run of the same fingerprint (model, method,
    settings, versions); another run is refused in one line, the folder left as it was."""
    ckpt, args = cli_env
    work = tmp_path / "work"
    rtn = ["--model", str(ckpt), "--stream", "--work-dir", str(work), *args]
    first = _ok(capsys, [*rtn, "--method", "rtn"], tmp_path / "a.json")
    ppl = first["metrics"]["eval.txt"]["ppl"]
    recorded = json.loads((work / MANIFEST).read_text())
    assert sorted(recorded["blocks"]) == ["block_00000.pt", "block_00001.pt"]
    assert recorded["fingerprint"]["run"]["method"]["name"] == "rtn"
    for other, needle in (
        (["--method", "hadamard"], "method"),
        (["--method", "rtn", "--format", "nvfp4"], "format"),
        (["--method", "rtn", "--seed", "3"], "seed"),
    ):
        err = _refused(
            capsys, [*rtn, *other], "holds blocks of another run", tmp_path / "b.json", [work, ckpt]
        )
        assert needle in err, err
    # another model (same shapes, other weights) in the same folder: refused
    other = tmp_path / "other"
    make_tiny_llama(seed=5, num_hidden_layers=2).save_pretrained(other)
    _tokenizer(other)
    err = _refused(
        capsys,
        ["--model", str(other), "--stream", "--work-dir", str(work), "--method", "rtn", *args],
        "checkpoint",
        tmp_path / "b.json",
        [work, other],
    )
    # the same run again reads the kept blocks: the same perplexity, the blocks untouched
    blocks = {p.name: p.stat().st_mtime_ns for p in work.glob("block_*.pt")}
    again = _ok(capsys, [*rtn, "--method", "rtn", "--eval", args[1]], tmp_path / "c.json")
    assert again["metrics"]["eval.txt"]["ppl"] == ppl
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("block_*.pt")} == blocks
    # a damaged record is refused, naming it
    (work / MANIFEST).write_text("{not json")
    _refused(capsys, [*rtn, "--method", "rtn"], MANIFEST, tmp_path / "d.json", [work])


# ----------------------------------------------------------------------------- 3. NaN, streamed


@pytest.mark.parametrize(
    "tensor", ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight", "lm_head.weight"]
)
def test_nan_weight_is_refused_streamed_and_in_memory(tmp_path, capsys, cli_env, tensor):
    from safetensors.torch import load_file, save_file

    ckpt, args = cli_env
    tensors = load_file(ckpt / "model.safetensors")
    tensors[tensor][0, 0] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    for extra in ([], ["--stream", "--work-dir", str(tmp_path / "w")]):
        err = _refused(
            capsys,
            ["--model", str(ckpt), "--method", "rtn", *args, *extra],
            tensor,
            tmp_path / "o.json",
            [ckpt],
        )
        assert str(ckpt / "model.safetensors") in err and "NaN" in err, err


# ----------------------------------------------------------------------------- 4. model folders


def test_model_folder_defects_are_refused_naming_the_file(tmp_path, capsys, cli_env):
    """A missing tensor, a renamed (packed-looking) tensor, an invalid config.json, a truncated
    shard: one line naming the file, in memory and streamed."""
    from safetensors.torch import load_file, save_file

    ckpt, args = cli_env
    st = ckpt / "model.safetensors"
    good = st.read_bytes()
    run = ["--model", str(ckpt), "--method", "fp", *args]
    stream = ["--stream", "--work-dir", str(tmp_path / "w")]

    def write(t):
        save_file(t, st, metadata={"format": "pt"})

    tensors = load_file(st)
    missing = dict(tensors)
    del missing["model.layers.0.self_attn.k_proj.weight"]
    write(missing)
    for extra in ([], stream):
        _refused(
            capsys,
            [*run, *extra],
            "model.layers.0.self_attn.k_proj.weight",
            tmp_path / "o.json",
            [ckpt],
        )
    # an export stripped of its quantization_config: packed weights under other names
    packed = dict(tensors)
    w = packed.pop("model.layers.1.mlp.up_proj.weight")
    packed["model.layers.1.mlp.up_proj.weight_packed"] = w.to(torch.uint8)[
        :, : w.shape[1] // 2
    ].contiguous()
    write(packed)
    for extra in ([], stream):
        _refused(
            capsys, [*run, *extra], "model.layers.1.mlp.up_proj.weight", tmp_path / "o.json", [ckpt]
        )
    st.write_bytes(good)
    config = ckpt / "config.json"
    good_config = config.read_text()
    config.write_text(good_config[:-20])
    for extra in ([], stream):
        _refused(capsys, [*run, *extra], str(config), tmp_path / "o.json", [ckpt])
    config.write_text(good_config)
    # a shard of a multi-shard folder truncated
    sharded = tmp_path / "sharded"
    make_tiny_llama(seed=2, num_hidden_layers=2).save_pretrained(sharded, max_shard_size="60KB")
    _tokenizer(sharded)
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2
    shards[-1].write_bytes(shards[-1].read_bytes()[:-100])
    run[1] = str(sharded)
    for extra in ([], stream):
        _refused(
            capsys,
            [*run, *extra],
            f"{shards[-1]}: the safetensors file is damaged",
            tmp_path / "o.json",
            [sharded],
        )
    assert not (tmp_path / "w").exists()  # no work folder left by a refused streamed run


# ----------------------------------------------------------------------------- 5. GGUF cache


def test_gguf_cache_entry_missing_a_tensor_is_rebuilt(tmp_path, monkeypatch):
    """A cache entry whose weights lack a tensor is not loaded with a random one: it fails the
    loading check, which is what makes the GGUF loader drop and rebuild it."""
    from safetensors.torch import load_file, save_file

    from duquant.models.loading import ModelSourceError, _from_pretrained

    entry = tmp_path / "entry"
    make_tiny_llama(seed=2).save_pretrained(entry)
    _tokenizer(entry)
    t = load_file(entry / "model.safetensors")
    del t["model.norm.weight"]
    save_file(t, entry / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match="model.norm.weight"):
        _from_pretrained(str(entry), "x.gguf", torch.float32)


@pytest.mark.parametrize("damage", ["nan", "missing tensor", "truncated", "config"])
def test_gguf_cache_damaged_entry_is_rebuilt_never_used(tmp_path, monkeypatch, damage):
    """A cache entry whose weights hold NaN, lack a tensor, are cut short, or whose config.json is
    invalid is dropped and converted again: the load gives the conversion's weights."""
    from safetensors.torch import load_file, save_file

    import duquant.models.loading as loading
    from duquant.models import gguf_cache

    good = tmp_path / "converted"
    make_tiny_llama(seed=2).save_pretrained(good)
    _tokenizer(good)
    entry = tmp_path / "cache" / "m-0123456789abcdef"
    entry.parent.mkdir()
    make_tiny_llama(seed=2).save_pretrained(entry)
    _tokenizer(entry)
    st = entry / "model.safetensors"
    t = load_file(st)
    if damage == "nan":
        t["model.layers.0.mlp.up_proj.weight"][3, 3] = float("nan")
        save_file(t, st, metadata={"format": "pt"})
    elif damage == "missing tensor":
        del t["model.norm.weight"]
        save_file(t, st, metadata={"format": "pt"})
    elif damage == "truncated":
        st.write_bytes(st.read_bytes()[:-64])
    else:
        (entry / "config.json").write_text("{")
    monkeypatch.setattr(gguf_cache, "entry_for", lambda path: entry)
    real, converted = loading._from_pretrained, []

    def from_pretrained(where, source, dtype, gguf=None):
        if gguf:  # the GGUF conversion: the good weights
            converted.append(where)
            return real(str(good), source, dtype)
        return real(where, source, dtype)

    monkeypatch.setattr(loading, "_from_pretrained", from_pretrained)
    _, model = loading._load_gguf(tmp_path / "m.gguf", "m.gguf", torch.float32, "cpu")
    assert converted, "the damaged entry was used"
    want = load_file(good / "model.safetensors")
    for name, p in model.state_dict().items():
        if name in want:
            assert torch.equal(p, want[name]), name
    assert torch.equal(
        load_file(entry / "model.safetensors")["model.norm.weight"], want["model.norm.weight"]
    )


# ----------------------------------------------------------------------------- 6. fuzz

FUZZ_COUNTS: dict[str, int] = {}


def _reference_logits(folder: Path, ids):
    from duquant.models.loading import load_model

    with torch.no_grad():
        return load_model(str(folder)).model(ids).logits


def _streamed(folder: Path, ids, work: Path):
    from duquant.models.streaming import open_streamed
    from duquant.stream import streamed_logits

    model, adapter, store = open_streamed(folder, work)
    return torch.cat(streamed_logits(model, adapter, store, ids))


def _outcome(fn, label: str, want, names: tuple[str, ...]):
    """'same' when `fn()` gives `want` bit for bit, 'refused' when it raises one ValueError line
    naming one of `names`; anything else (another exception, other numbers) fails the test."""
    try:
        got = fn()
    except ValueError as exc:
        msg = str(exc)
        assert "\n" not in msg.strip(), f"{label}: {msg}"
        assert any(n in msg for n in names), f"{label}: {msg}"
        return "refused"
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"{label}: {type(exc).__name__}: {exc}") from exc
    assert torch.equal(got, want), f"{label}: a corrupted input gave other numbers silently"
    return "same"


def _safetensors_corruptions(good: bytes):
    """(label, bytes) of model.safetensors corrupted every way."""
    from safetensors.torch import load, save

    n = struct.unpack("<Q", good[:8])[0]
    for cut in (0, 4, 8, 8 + n // 2, 8 + n, 8 + n + 1, len(good) // 2, len(good) - 1):
        yield f"truncated at {cut}", good[:cut]
    yield "huge header length", struct.pack("<Q", 2**62) + good[8:]
    yield "header length past the end", struct.pack("<Q", len(good)) + good[8:]
    yield "header not JSON", good[:8] + b"\xff" * n + good[8 + n :]
    tensors = load(good)
    for name in tensors:
        t = dict(tensors)
        del t[name]
        yield f"without {name}", save(t, metadata={"format": "pt"})
        t = dict(tensors)
        t[name] = tensors[name][..., :-1].contiguous()
        yield f"{name} of the wrong shape", save(t, metadata={"format": "pt"})
        t = dict(tensors)
        bad = tensors[name].clone()
        bad.view(-1)[0] = float("nan")
        t[name] = bad
        yield f"NaN in {name}", save(t, metadata={"format": "pt"})
        t = dict(tensors)
        t[name] = tensors[name].to(torch.int32)
        yield f"{name} as integers", save(t, metadata={"format": "pt"})


def test_fuzz_model_folder_and_work_folder(tmp_path, monkeypatch):
    """Corrupt model.safetensors, config.json and the kept block files every way: each either loads
    to the very same logits or is refused with one ValueError line naming the file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DUQUANT_NO_GGUF_CACHE", "1")
    folder = tmp_path / "ckpt"
    make_tiny_llama(seed=2).save_pretrained(folder)
    _tokenizer(folder)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    want = _reference_logits(folder, ids)
    assert torch.equal(_streamed(folder, ids, tmp_path / "w0"), want)
    st, config = folder / "model.safetensors", folder / "config.json"
    good_st, good_config = st.read_bytes(), config.read_text()
    counts = {"model.safetensors": 0, "config.json": 0, "block file": 0}
    outcomes = {"same": 0, "refused": 0}
    paths = (lambda: _reference_logits(folder, ids), lambda: _streamed(folder, ids, tmp_path / "w"))
    for label, data in _safetensors_corruptions(good_st):
        st.write_bytes(data)
        for fn in paths:
            outcomes[_outcome(fn, f"model.safetensors {label}", want, (str(st),))] += 1
        counts["model.safetensors"] += 1
    st.write_bytes(good_st)
    cfg = json.loads(good_config)
    variants = [(f"without {k}", {kk: v for kk, v in cfg.items() if kk != k}) for k in cfg]
    variants += [("truncated", None), ("not an object", [1, 2]), ("empty", "")]
    variants += [
        (f"{k} a string", {**cfg, k: "x"})
        for k in ("hidden_size", "num_hidden_layers", "vocab_size")
    ]
    variants += [("architectures not a list", {**cfg, "architectures": 3})]
    for label, value in variants:
        if value is None:
            config.write_text(good_config[: len(good_config) // 2])
        else:
            config.write_text(value if isinstance(value, str) else json.dumps(value))
        for fn in paths:
            names = (str(config), str(folder))
            outcomes[_outcome(fn, f"config.json {label}", want, names)] += 1
        counts["config.json"] += 1
    config.write_text(good_config)
    # the kept blocks of a streamed RTN run, read back through a store that records their digests
    # (this run's) and through one that does not (the reader alone must refuse them)
    from duquant.methods import get_method
    from duquant.models.streaming import _load_block
    from duquant.pipeline import QuantConfig
    from duquant.stream import quantize_streaming, streamed_logits

    work = tmp_path / "kept"
    model, adapter, store, _ = quantize_streaming(
        folder, get_method("rtn"), QuantConfig(), None, work
    )
    ref = torch.cat(streamed_logits(model, adapter, store, ids))
    block = work / "block_00001.pt"
    good_block = block.read_bytes()
    variants = [
        (f"truncated at {c}", good_block[:c])
        for c in (0, 10, len(good_block) // 3, len(good_block) - 30, len(good_block) - 1)
    ]
    for off in range(0, len(good_block), max(1, len(good_block) // 24)):
        flipped = bytearray(good_block)
        flipped[off] ^= 0xFF
        variants.append((f"byte {off} flipped", bytes(flipped)))
    data = torch.load(block, weights_only=True)
    tree = json.loads(data["tree"])
    for name in list(data["tensors"]):
        d = {**data, "tensors": {k: v for k, v in data["tensors"].items() if k != name}}
        variants.append((f"without {name}", d))
        t = data["tensors"][name]
        if t.is_floating_point():
            bad = t.clone()
            bad.view(-1)[0] = float("nan")
            variants.append((f"NaN in {name}", {**data, "tensors": {**data["tensors"], name: bad}}))
        variants.append(
            (f"{name} reshaped", {**data, "tensors": {**data["tensors"], name: t.reshape(-1)}})
        )
    for i in range(len(tree["objects"])):
        for cls in ("builtins.eval", "os.system", "torch.nn.modules.linear.Identity"):
            objects = [dict(e) for e in tree["objects"]]
            objects[i]["cls"] = cls
            variants.append(
                (f"object {i} as {cls}", {**data, "tree": json.dumps({**tree, "objects": objects})})
            )
    variants += [
        ("not a dict", [1]),
        ("tree not JSON", {**data, "tree": "{"}),
        ("other format", {**data, "format": 99}),
    ]
    for label, value in variants:
        if isinstance(value, bytes):
            block.write_bytes(value)
        else:
            torch.save(value, block)
        counts["block file"] += 1
        fn = lambda: torch.cat(streamed_logits(model, adapter, store, ids))  # noqa: E731
        outcomes[_outcome(fn, f"block file {label}", ref, (str(block),))] += 1
        # the reader alone (no digest to compare with): a block, or one line naming the file
        try:
            _load_block(block, store._pristine[1], "cpu", None)
        except WorkDirError as exc:
            assert "\n" not in str(exc) and str(block) in str(exc), exc
    block.write_bytes(good_block)
    assert torch.equal(torch.cat(streamed_logits(model, adapter, store, ids)), ref)
    FUZZ_COUNTS.update(counts)
    print(f"fuzz: corrupted inputs tried per file kind {counts}; outcomes {outcomes}")
    assert (
        counts["model.safetensors"] >= 40
        and counts["config.json"] >= 15
        and counts["block file"] >= 40
    )
    assert outcomes["refused"] > 0
