"""Issue 30, "trust nothing on disk", for exports: the final rename never destroys what it did not
create, stale staging folders of dead processes are cleaned (never a live run's), and an export
read back is validated file by file (a fuzz over every file of a small export)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

pytest.importorskip("compressed_tensors")

from duquant import export  # noqa: E402
from duquant.export import ExportError, atomic  # noqa: E402
from duquant.export import ct as ct_export  # noqa: E402
from duquant.methods import get_method  # noqa: E402
from duquant.models import adapter_for  # noqa: E402
from duquant.pipeline import QuantConfig, quantize_model  # noqa: E402

DEAD_PID = 2**31 - 2  # above any pid_max: no such process


@pytest.fixture(scope="module")
def tiny_quantized():
    """A one-block tiny Llama quantized with duquant++ (rotations: transforms in the export)."""
    model = make_tiny_llama(0, num_hidden_layers=1)
    calib = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(
        model, adapter_for(model), get_method("duquant++"), QuantConfig(weights="rtn"), calib, 0
    )
    return model


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (names relative), symlinks as their target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg.strip() and msg.strip()
    return msg


def _staging(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def _while_staged(monkeypatch, action) -> None:
    """Run `action` after the exporter has written the staged export, before the final rename."""
    real = ct_export.write

    def write(*args, **kwargs):
        figures = real(*args, **kwargs)
        action()
        return figures

    monkeypatch.setattr(ct_export, "write", write)


# ---- defect 1: the final rename destroys nothing it did not create --------------------------------


def test_directory_appearing_during_export_is_left_untouched(
    tmp_path: Path, monkeypatch, tiny_quantized
) -> None:
    dest = tmp_path / "out"

    def someone_else():
        dest.mkdir()
        (dest / "theirs.txt").write_text("not yours")

    _while_staged(monkeypatch, someone_else)
    with pytest.raises(ExportError) as info:
        export.save(tiny_quantized, None, dest, {})
    msg = _one_line(info.value)
    assert str(dest) in msg and "--overwrite" in msg and "kept at" in msg
    assert _tree(dest) == {"theirs.txt": hashlib.sha256(b"not yours").hexdigest()}
    # the finished export is kept where the message says, complete and without the marker
    (kept,) = _staging(tmp_path)
    assert str(kept) in msg and (kept / "model.safetensors").is_file()
    assert not (kept / atomic.STAGING_MARKER).exists()
    # and no later run removes it as stale (it has no marker of a dead process)
    atomic.clean_stale(dest)
    assert kept.is_dir()


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_overwrite_rechecks_the_destination_at_the_rename(
    tmp_path: Path, monkeypatch, tiny_quantized, kind: str
) -> None:
    dest, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"precious")

    def someone_else():
        if kind == "file":
            dest.write_text("a file")
        else:
            dest.symlink_to(elsewhere, target_is_directory=True)

    before = _tree(elsewhere)
    _while_staged(monkeypatch, someone_else)
    with pytest.raises(ExportError) as info:
        export.save(tiny_quantized, None, dest, {}, overwrite=True)
    msg = _one_line(info.value)
    assert str(dest) in msg and ("a file" in msg or "symbolic link" in msg)
    assert _tree(elsewhere) == before
    assert dest.is_symlink() if kind == "symlink" else dest.read_text() == "a file"


def test_overwrite_replaces_a_directory_through_an_aside_copy(
    tmp_path: Path, monkeypatch, tiny_quantized
) -> None:
    dest = tmp_path / "out"

    def someone_else():
        dest.mkdir()
        (dest / "old.txt").write_text("old")

    _while_staged(monkeypatch, someone_else)
    export.save(tiny_quantized, None, dest, {}, overwrite=True)
    assert (dest / "model.safetensors").is_file() and not (dest / "old.txt").exists()
    assert not _staging(tmp_path) and not (dest / atomic.STAGING_MARKER).exists()


def test_symlink_destination_is_refused_up_front(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="symbolic link"):
            atomic.check_destination(tmp_path / "link", overwrite)


@pytest.mark.parametrize("native", [True, False])
def test_rename_noreplace_never_replaces(tmp_path: Path, monkeypatch, native: bool) -> None:
    if not native:  # no renameat2 (another OS): a check, then a rename
        monkeypatch.setattr(atomic, "_renameat2", lambda: None)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()  # even an empty directory
    with pytest.raises(FileExistsError):
        atomic.rename_noreplace(tmp_path / "a", tmp_path / "b")
    atomic.rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").is_dir() and not (tmp_path / "a").exists()


# ---- defect 2: staging folders of dead processes are cleaned, a live run's never -------------------


def _fake_staging(parent: Path, name: str, marker: dict | None, tag: str) -> Path:
    folder = parent / f".{name}.partial-{tag}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    if marker is not None:
        (folder / atomic.STAGING_MARKER).write_text(json.dumps(marker))
    return folder


def test_stale_staging_of_dead_process_is_cleaned_live_one_kept(
    tmp_path: Path, tiny_quantized
) -> None:
    host, me = socket.gethostname(), os.getpid()
    dead = _fake_staging(tmp_path, "out", {"host": host, "pid": DEAD_PID, "start": 1}, "dead")
    live = _fake_staging(tmp_path, "out", atomic._marker(), "live")
    # the live pid with another start time: the pid was reused, the owner is dead
    reused = _fake_staging(
        tmp_path,
        "out",
        {"host": host, "pid": me, "start": (atomic._start_time(me) or 0) + 1},
        "reused",
    )
    other_host = _fake_staging(
        tmp_path, "out", {"host": host + "-elsewhere", "pid": DEAD_PID, "start": 1}, "host"
    )
    unmarked = _fake_staging(tmp_path, "out", None, "unmarked")
    bogus = [
        _fake_staging(tmp_path, "out", {"host": host, "pid": pid, "start": None}, f"bogus{i}")
        for i, pid in enumerate((0, -1, "12", 2**40))
    ]
    other_dest = _fake_staging(tmp_path, "other", {"host": host, "pid": DEAD_PID}, "dead")
    export.save(tiny_quantized, None, tmp_path / "out", {})
    assert not dead.exists()
    if atomic._start_time(me) is not None:
        assert not reused.exists()
    for kept in [live, other_host, unmarked, *bogus, other_dest]:
        assert (kept / "model.safetensors").is_file(), kept
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / atomic.STAGING_MARKER).exists()


def test_staging_folder_names_its_process(tmp_path: Path, monkeypatch, tiny_quantized) -> None:
    seen = {}

    def look():
        (folder,) = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
        seen["name"], seen["marker"] = folder.name, atomic.read_marker(folder)

    _while_staged(monkeypatch, look)
    export.save(tiny_quantized, None, tmp_path / "out", {})
    assert seen["name"].startswith(f".out.partial-{os.getpid()}-")
    assert seen["marker"]["pid"] == os.getpid() and atomic.owner_alive(seen["marker"])


# ---- defect 3: an export read back is validated, file by file ----------------------------------

IDS = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_quantized) -> Path:
    """A small valid export (duquant++: transforms, RTN codes) of the tiny Llama."""
    dest = tmp_path_factory.mktemp("export") / "dqpp"
    export.save(tiny_quantized, None, dest, {})
    return dest


@pytest.fixture(scope="module")
def reference_logits(export_dir) -> torch.Tensor:
    from duquant.api import load_model

    with torch.no_grad():
        return load_model(str(export_dir)).model(IDS).logits


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensors(file: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_json(file: Path, change) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data, indent=2))


def _outcome(work: Path, culprit: str, reference: torch.Tensor) -> str:
    """Load the (corrupted) export: 'same' (bit-identical logits) or 'refused' (one ValueError
    line naming `culprit`); anything else fails the test. The files are left as they were."""
    from duquant.formats.e2m1 import same_bits

    before = _tree(work)
    try:
        # the exporter's own path (duquant.api.load_model runs models.loading's source checks
        # first, which are not the exporter's)
        loader = export.find_loader(work)
        assert loader is ct_export, "no longer recognised as an export"
        model = loader.load(work)[0]
    except ValueError as exc:
        msg = _one_line(exc)
        assert culprit in msg, (culprit, msg)
        assert "Traceback" not in msg
        outcome = "refused"
    else:
        with torch.no_grad():
            out = model(IDS).logits
        assert out.dtype == reference.dtype and same_bits(out, reference), (
            f"{culprit}: a corrupted export loaded to different logits"
        )
        outcome = "same"
    assert _tree(work) == before, "loading changed the export's files"
    return outcome


def _corruptions(export_dir: Path):
    """(file kind, description, culprit file name, function corrupting a copy) for every
    corruption tried: truncations of every file, config keys removed, tensors removed, reshaped,
    retyped, NaN-filled, crafted header lengths, invalid JSON."""
    from safetensors import safe_open

    weights = export_dir / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        names = sorted(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in names}
    size = weights.stat().st_size
    out = []
    # every file truncated at several offsets (the tensors' file also inside its data)
    for file in sorted(p.name for p in export_dir.iterdir()):
        n = (export_dir / file).stat().st_size
        kind = "safetensors" if file.endswith(".safetensors") else file
        for cut in sorted({0, 1, 7, 8, 9, n // 3, n // 2, n - 200, n - 1} - {n}):
            if 0 <= cut < n:

                def trunc(d, file=file, cut=cut):
                    with open(d / file, "r+b") as f:
                        f.truncate(cut)

                out.append((kind, f"{file} truncated at {cut}", file, trunc))
    # crafted header lengths: huge, just past the file, zero
    for length in (2**63, 2**40, size, 0):

        def header(d, length=length):
            with open(d / "model.safetensors", "r+b") as f:
                f.write(length.to_bytes(8, "little"))

        out.append(("safetensors", f"header length {length}", "model.safetensors", header))
    for k in names:

        def remove(d, k=k):
            _rewrite_tensors(d / "model.safetensors", lambda t: t.pop(k))

        def reshape(d, k=k):
            _rewrite_tensors(
                d / "model.safetensors", lambda t: t.__setitem__(k, torch.cat([t[k], t[k][:1]]))
            )

        out.append(("safetensors", f"{k} removed", "model.safetensors", remove))
        out.append(("safetensors", f"{k} reshaped", "model.safetensors", reshape))
        if dtypes[k] in ("F32", "F16", "BF16"):

            def nan(d, k=k):
                def put(t):
                    t[k] = t[k].clone()
                    t[k].view(-1)[t[k].numel() // 2] = float("nan")

                _rewrite_tensors(d / "model.safetensors", put)

            def retype(d, k=k):
                _rewrite_tensors(
                    d / "model.safetensors", lambda t: t.__setitem__(k, t[k].to(torch.float16))
                )

            out.append(("safetensors", f"NaN in {k}", "model.safetensors", nan))
            out.append(("safetensors", f"{k} as float16", "model.safetensors", retype))
        elif dtypes[k] == "U8":

            def nan_byte(d, k=k):  # 255: E8M0's NaN (every byte of packed codes is a code)
                def put(t):
                    t[k] = t[k].clone()
                    t[k].view(-1)[0] = 255

                _rewrite_tensors(d / "model.safetensors", put)

            def retype(d, k=k):
                _rewrite_tensors(
                    d / "model.safetensors", lambda t: t.__setitem__(k, t[k].to(torch.int16))
                )

            if k.endswith("weight_scale"):
                out.append(("safetensors", f"255 in {k}", "model.safetensors", nan_byte))
            out.append(("safetensors", f"{k} as int16", "model.safetensors", retype))
    # config.json: each key of quantization_config removed, of one group, of one scheme
    qc = json.loads((export_dir / "config.json").read_text())["quantization_config"]
    paths = [[key] for key in qc]
    paths += [["config_groups", "group_0", key] for key in qc["config_groups"]["group_0"]]
    scheme = next(iter(qc["transform_config"]["config_groups"]))
    paths += [
        ["transform_config", "config_groups", scheme, key]
        for key in qc["transform_config"]["config_groups"][scheme]
    ]
    paths += [["transform_config", "config_groups", scheme]]
    for path in paths:

        def drop(d, path=path):
            def change(cfg):
                node = cfg["quantization_config"]
                for p in path[:-1]:
                    node = node[p]
                del node[path[-1]]

            _edit_json(d / "config.json", change)

        out.append(("config.json", "quantization_config." + ".".join(path), "config.json", drop))
    for text in ("", "{", "[]", '{"quantization_config": "x"}', '{"a": NaN}', "\xff\xfe"):

        def garbage(d, text=text):
            (d / "config.json").write_bytes(text.encode("latin-1"))

        out.append(("config.json", f"config.json = {text!r}", "config.json", garbage))
    return out


def test_fuzz_every_file_of_an_export(tmp_path: Path, export_dir, reference_logits) -> None:
    """Every corruption either loads to bit-identical logits (harmless) or is refused with one
    ValueError line naming the file; never different numbers silently, never another exception;
    the corrupted files are left as they were."""
    import collections
    import time

    start = time.perf_counter()
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    harmless = []
    for kind, what, culprit, corrupt in _corruptions(export_dir):
        work = _copy(export_dir, tmp_path / "work")
        corrupt(work)
        try:
            outcome = _outcome(work, culprit, reference_logits)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from None
        except Exception as exc:
            raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from None
        counts[kind][outcome] += 1
        counts[kind]["tried"] += 1
        if outcome == "same" and kind in ("config.json", "safetensors"):
            harmless.append(what)
    summary = {k: dict(v) for k, v in sorted(counts.items())}
    print(f"fuzz over the export's files ({time.perf_counter() - start:.1f} s): {summary}")
    print(f"harmless changes (bit-identical logits): {harmless}")
    assert counts["safetensors"]["refused"] == counts["safetensors"]["tried"] > 80
    assert counts["config.json"]["refused"] > 20


QKV = "model.layers.0.self_attn.{}_proj.l0_qkv_input.weight"


def _corrupt_copy(export_dir: Path, tmp_path: Path, how: str) -> Path:
    work = _copy(export_dir, tmp_path / how)
    st = work / "model.safetensors"
    if how == "truncated":
        with open(st, "r+b") as f:
            f.truncate(st.stat().st_size // 2)
    elif how == "no-transform":
        _rewrite_tensors(st, lambda t: t.pop(QKV.format("q")))
    elif how == "nan-transform":
        _rewrite_tensors(st, lambda t: t[QKV.format("q")].view(-1).__setitem__(3, float("inf")))
    elif how == "not-json":
        (work / "config.json").write_text('{"quantization_config": {')
    elif how == "no-ignore":
        _edit_json(work / "config.json", lambda c: c["quantization_config"].pop("ignore"))
    return work


@pytest.mark.parametrize(
    ("how", "names"),
    [
        ("truncated", "model.safetensors"),
        ("no-transform", QKV.format("q")),
        ("nan-transform", QKV.format("q")),
        ("no-ignore", "quantization_config.ignore"),
    ],
)
def test_cli_refuses_a_corrupted_export_in_one_line(
    tmp_path: Path, export_dir, capsys, offline_data, how: str, names: str
) -> None:
    from duquant.cli import main

    work = _corrupt_copy(export_dir, tmp_path, how)
    before, out = _tree(work), tmp_path / "result.json"
    args = ["run", "--model", str(work), "--method", "fp", "--max-windows", "1"]
    assert main([*args, "--seqlen", "32", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    # compressed-tensors' progress bars (tqdm, "\r"-separated) are not messages: one line besides
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
    lines = [ln for ln in lines if "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("duquant run: error: "), lines
    assert names in lines[0] and "Traceback" not in err
    assert _tree(work) == before and not out.exists()


def test_missing_transform_matrix_is_refused_a_tied_copy_is_not(tmp_path: Path, export_dir) -> None:
    # the first target's matrix is the stored one: without it the export is refused
    with pytest.raises(ExportError, match="missing from the checkpoint") as info:
        ct_export.load(_corrupt_copy(export_dir, tmp_path, "no-transform"))
    assert QKV.format("q") in str(info.value)
    # a tied copy stored beside it must equal it
    work = _copy(export_dir, tmp_path / "tied")

    def differing_copy(t):
        t[QKV.format("k")] = t[QKV.format("q")].flip(0).contiguous()

    _rewrite_tensors(work / "model.safetensors", differing_copy)
    with pytest.raises(ExportError, match="ties it to") as info:
        ct_export.load(work)
    assert QKV.format("k") in str(info.value)


def test_crafted_header_length_is_refused_before_reading(tmp_path: Path, export_dir) -> None:
    work = _copy(export_dir, tmp_path / "huge")
    with open(work / "model.safetensors", "r+b") as f:
        f.write((2**62).to_bytes(8, "little"))
    with pytest.raises(ExportError, match="header length .* exceeds the file"):
        ct_export.read_header(work / "model.safetensors")


@pytest.mark.parametrize(
    "shard", ["../elsewhere.safetensors", "/etc/passwd", 7, "missing.safetensors"]
)
def test_index_naming_a_file_outside_the_export_is_refused(
    tmp_path: Path, export_dir, shard
) -> None:
    from safetensors import safe_open

    work = _copy(export_dir, tmp_path / "sharded")
    with safe_open(str(work / "model.safetensors"), "pt") as f:
        weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    weight_map[next(iter(weight_map))] = shard
    (work / ct_export.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ExportError, match=ct_export.INDEX_FILE):
        ct_export.read_headers(work)


@pytest.mark.parametrize(("key", "value"), [("vocab_size", 10**9), ("num_hidden_layers", -1)])
def test_config_sizes_are_bounded_before_the_model_is_built(
    tmp_path: Path, export_dir, monkeypatch, key: str, value: int
) -> None:
    import transformers

    work = _copy(export_dir, tmp_path / "big")
    _edit_json(work / "config.json", lambda c: c.__setitem__(key, value))

    def boom(*a, **k):
        raise AssertionError("the model was built before its size was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", boom)
    with pytest.raises(ValueError, match="config.json") as info:
        ct_export.load(work)
    _one_line(info.value)


def test_transform_target_dropped_from_the_config_is_refused(tmp_path: Path, export_dir) -> None:
    # v_proj's weight is stored rotated: without its transform the logits would be wrong
    work = _copy(export_dir, tmp_path / "dropped")

    def drop(cfg):
        targets = cfg["quantization_config"]["transform_config"]["config_groups"]["l0_qkv"]
        targets["apply"][0]["targets"].pop()

    _edit_json(work / "config.json", drop)
    with pytest.raises(ExportError, match="duquant.json records") as info:
        ct_export.load(work)
    assert "l0_qkv" in _one_line(info.value)
