"""Evaluation and calibration text, offline: never touches the network (the hub check is patched)."""

from __future__ import annotations

import hashlib
import lzma

import pytest
import torch
from conftest import REPO

import duquant.data as data
from duquant.data import (
    DataNotFoundError,
    calibration_windows,
    eval_text,
    raw_lines_to_rows,
    wikitext2_rows,
)


class ByteTokenizer:
    """A stand-in tokenizer: one token per UTF-8 byte, called like a Hugging Face tokenizer."""

    def __init__(self):
        self.calls = 0

    def __call__(self, text, return_tensors=None):
        assert return_tensors == "pt"
        self.calls += 1
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

        class Out:
            input_ids = ids.unsqueeze(0)

        return Out()


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """An empty data directory and an unreachable hub."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(empty))
    monkeypatch.setattr(data, "hub_reachable", lambda *a, **k: False)
    return empty


# --- raw_lines_to_rows ---------------------------------------------------------------------------


def test_raw_lines_to_rows_literal():
    text = " \n = Title = \n \n Body line one . \n\n last"
    assert raw_lines_to_rows(text) == ["", " = Title = \n", "", " Body line one . \n", "", " last"]
    assert raw_lines_to_rows("") == []
    # row, "\n\n", empty row, "\n\n", row: the standard "\n\n".join of the rows
    assert "\n\n".join(raw_lines_to_rows(" = A = \n \n b \n")) == " = A = \n\n\n\n\n b \n"


def test_raw_lines_to_rows_splits_on_newline_only():
    """Rows are lines of the file as the hub's loader reads them (split at '\\n'): a form feed, a
    vertical tab or U+2028 inside a line must not start a new row."""
    text = " a \x0c b \n c \u2028 d \x0b e \x1c f \x85 g \n"
    assert raw_lines_to_rows(text) == [" a \x0c b \n", " c \u2028 d \x0b e \x1c f \x85 g \n"]


# --- WikiText-2 offline --------------------------------------------------------------------------


def test_eval_text_wikitext2_offline(offline_data):
    """Offline with no data directory, the test split comes from the package: the canonical bytes."""
    text, src = eval_text("wikitext2")
    assert src.dataset == "wikitext2" and src.split == "test"
    assert src.origin == "package:duquant/resources/wikitext2_raw/wiki.test.raw.xz"
    assert src.sha256.startswith("173c87a53759e020")  # shared/data/MANIFEST.md: the canonical file
    raw = lzma.decompress((data.PACKAGED / "wikitext2_raw" / "wiki.test.raw.xz").read_bytes())
    assert len(raw) == 1290590
    rows = raw.decode("utf-8").split("\n")[:-1]  # 4358 lines, each ending in '\n'
    assert len(rows) == 4358
    expected = "\n\n".join(r + "\n" if r.strip() else "" for r in rows)
    assert text == expected
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")


def test_packaged_copy_equals_shared_copy(offline_data):
    """Where ../shared/data is present, the shipped copies are byte-identical to it."""
    shared = REPO.parent / "shared" / "data" / "wikitext2_raw"
    if not shared.is_dir():
        pytest.skip("no ../shared/data beside the checkout")
    for name in ("wiki.test.raw", "wiki.valid.raw"):
        packaged = lzma.decompress((data.PACKAGED / "wikitext2_raw" / f"{name}.xz").read_bytes())
        assert packaged == (shared / name).read_bytes()


def test_packaged_copy_carries_its_licence():
    notice = (data.PACKAGED / "wikitext2_raw" / "NOTICE.md").read_text()
    assert "CC BY-SA 3.0" in notice and "Merity" in notice


def test_wikitext2_validation_rows_offline(offline_data):
    rows, src = wikitext2_rows("validation")
    assert len(rows) == 3760 and src.split == "validation"
    assert rows[1] == " = Homarus gammarus = \n" and rows[0] == rows[2] == ""
    assert src.sha256.startswith("dab71a4a3f19b979")


def test_data_dir_without_the_file_is_an_error(no_data):
    """An explicit $DUQUANT_DATA_DIR that lacks the file says so (no silent fallback)."""
    with pytest.raises(DataNotFoundError) as info:
        eval_text("wikitext2")
    msg = str(info.value)
    assert f"{no_data}/wikitext2_raw/wiki.test.raw" in msg
    assert "DUQUANT_DATA_DIR" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_missing_train_split_has_no_local_copy(offline_data):
    with pytest.raises(DataNotFoundError, match="ships no copy"):
        wikitext2_rows("train")


def test_hub_is_not_asked_when_data_dir_is_set(tmp_path, monkeypatch):
    (tmp_path / "wikitext2_raw").mkdir()
    (tmp_path / "wikitext2_raw" / "wiki.test.raw").write_text(" = A = \n b \n")
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(tmp_path))

    def boom(*a, **k):
        raise AssertionError("the hub must not be asked when DUQUANT_DATA_DIR has the file")

    monkeypatch.setattr(data, "_hub_wikitext", boom)
    rows, src = wikitext2_rows("test")
    assert rows == [" = A = \n", " b \n"] and src.origin == str(
        tmp_path / "wikitext2_raw" / "wiki.test.raw"
    )


# --- calibration windows -------------------------------------------------------------------------


def test_calibration_windows_offline_validation_fallback(offline_data):
    tok = ByteTokenizer()
    windows, info = calibration_windows(tok, nsamples=6, seqlen=64, seed=3)
    assert windows.shape == (6, 64) and windows.dtype == torch.long
    assert info.split == "validation" and info.dataset == "wikitext2"
    assert info.origin == "package:duquant/resources/wikitext2_raw/wiki.valid.raw.xz"
    assert (info.nsamples, info.seqlen, info.seed) == (6, 64, 3)
    # every window is a contiguous slice of the tokenized validation text
    rows, _ = wikitext2_rows("validation")
    stream = "\n\n".join(rows).encode("utf-8")
    for w in windows:
        assert bytes(w.tolist()) in stream


def test_calibration_windows_seeded(offline_data):
    tok = ByteTokenizer()
    a, _ = calibration_windows(tok, 8, 32, seed=0)
    b, _ = calibration_windows(tok, 8, 32, seed=0)
    c, _ = calibration_windows(tok, 8, 32, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (
        len({tuple(w.tolist()) for w in a}) == 8
    )  # distinct random starts, not one window repeated


def test_calibration_windows_too_short(no_data, tmp_path, monkeypatch):
    d = tmp_path / "small"
    (d / "wikitext2_raw").mkdir(parents=True)
    (d / "wikitext2_raw" / "wiki.valid.raw").write_text(" short \n", encoding="utf-8")
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(d))
    with pytest.raises(ValueError, match="fewer than seqlen=64"):
        calibration_windows(ByteTokenizer(), 2, 64)


def test_calibration_without_any_data(no_data):
    with pytest.raises(DataNotFoundError, match="wiki.valid.raw"):
        calibration_windows(ByteTokenizer(), 2, 16)


# --- user text files -----------------------------------------------------------------------------


def test_eval_text_user_file(tmp_path, no_data):
    path = tmp_path / "my eval.txt"
    content = "Première ligne.\n\nSecond paragraph — with UTF-8 ✓.\n"
    path.write_bytes(content.encode("utf-8"))
    text, src = eval_text(str(path))
    assert text == content
    assert src.dataset == "file" and src.origin == str(path)
    assert src.sha256 == hashlib.sha256(content.encode("utf-8")).hexdigest()


def test_eval_text_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8") as info:
        eval_text(str(path))
    assert str(path) in str(info.value)


def test_eval_text_unknown_name(no_data, tmp_path):
    with pytest.raises(DataNotFoundError, match="neither a known data set"):
        eval_text(str(tmp_path / "does-not-exist.txt"))
    with pytest.raises(DataNotFoundError):
        eval_text("c4")
