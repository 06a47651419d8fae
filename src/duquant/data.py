"""Evaluation and calibration text: WikiText-2 from the Hugging Face hub, the package or a local directory.

Source order: a local directory when $DUQUANT_DATA_DIR is set (deterministic and offline), else the hub
through `datasets`, else the copy of WikiText-2 test and validation shipped inside the package
(`duquant/resources/wikitext2_raw/`, xz, CC BY-SA 3.0: see the NOTICE.md there). WikiText-2 train is not
shipped, so offline calibration samples the validation split and the result's config says so.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import lzma
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

WIKITEXT_FILES = {
    "test": "wikitext2_raw/wiki.test.raw",
    "validation": "wikitext2_raw/wiki.valid.raw",
}


# the package's own compressed copies (test and validation only)
PACKAGED = Path(__file__).resolve().parent / "resources"


class DataNotFoundError(FileNotFoundError):
    """A data set could be found neither locally nor on the hub."""


@dataclass(frozen=True)
class TextSource:
    """Where a text came from: enough to say in a result how it was made."""

    dataset: str
    split: str
    origin: str  # "hub" or a file path
    sha256: str


def data_dir() -> Path | None:
    """The local data directory: $DUQUANT_DATA_DIR, else a shared/data beside the checkout, else None."""
    env = os.environ.get("DUQUANT_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for cand in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def file_sha256(path: Path) -> str:
    """sha256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def raw_lines_to_rows(text: str) -> list[str]:
    """Split a wiki.*.raw file into rows as the hub's `wikitext-2-raw-v1` has them (blank lines become '')."""
    # split at "\n" only, as iterating over the file does: str.splitlines also splits at \x0b, \x0c,
    # \x1c-\x1e, \x85, U+2028 and U+2029, which would make rows the hub does not have
    lines = text.split("\n")
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    return [line if line.strip() else "" for line in lines]


@functools.cache
def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (checked once per process; HF_HUB_OFFLINE=1 says no)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_wikitext(split: str) -> list[str] | None:
    """WikiText-2 rows from the hub, or None when `datasets` or the hub is unavailable."""
    if not hub_reachable():
        return None
    try:
        import datasets
    except ImportError:
        return None
    try:
        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    except Exception as exc:  # offline, blocked, rate limited: fall back to the local copy
        log.info("WikiText-2 %s not available from the hub (%s)", split, type(exc).__name__)
        return None


def _local_path(relative: str) -> Path | None:
    """The local copy of a data file, if the data directory has it."""
    root = data_dir()
    if root is not None and (root / relative).is_file():
        return root / relative
    return None


def wikitext2_rows(split: str) -> tuple[list[str], TextSource]:
    """WikiText-2 raw rows of `split` ('train', 'validation' or 'test') and where they came from."""
    local_rel = WIKITEXT_FILES.get(split)
    if os.environ.get("DUQUANT_DATA_DIR") and local_rel:
        local = _local_path(local_rel)
        if local is None:  # an explicit override that lacks the file is a mistake, not a fallback
            raise DataNotFoundError(
                f"WikiText-2 {split}: $DUQUANT_DATA_DIR is set but {data_dir()}/{local_rel} does not "
                "exist. Unset DUQUANT_DATA_DIR to use the copy shipped with duquant, or add the file."
            )
        return _local_rows(local.read_bytes(), str(local), split)
    rows = _hub_wikitext(split)
    if rows is not None:
        sha = hashlib.sha256("\n".join(rows).encode()).hexdigest()
        return rows, TextSource("wikitext2", split, "hub", sha)
    packaged = PACKAGED / f"{local_rel}.xz" if local_rel else None
    if packaged is not None and packaged.is_file():
        origin = f"package:duquant/resources/{local_rel}.xz"
        return _local_rows(lzma.decompress(packaged.read_bytes()), origin, split)
    raise DataNotFoundError(
        f"WikiText-2 {split} is not reachable on the Hugging Face hub and duquant ships no copy of it "
        "(it ships test and validation). Go online with duquant[eval] installed, or set "
        f"DUQUANT_DATA_DIR to a folder holding wikitext2_raw/wiki.{split}.raw."
    )


def _local_rows(raw: bytes, origin: str, split: str) -> tuple[list[str], TextSource]:
    """Rows of a raw WikiText file's bytes and its provenance (sha256 of the uncompressed bytes)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"WikiText-2 {split}: {origin} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    rows = raw_lines_to_rows(text)
    return rows, TextSource("wikitext2", split, origin, hashlib.sha256(raw).hexdigest())


def eval_text(name: str) -> tuple[str, TextSource]:
    """The evaluation text for `name`: 'wikitext2' (test split) or the path of a UTF-8 text file."""
    if name == "wikitext2":
        rows, src = wikitext2_rows("test")
        return "\n\n".join(rows), src
    path = Path(name)
    if not path.is_file():
        raise DataNotFoundError(
            f"evaluation {name!r} is neither a known data set ('wikitext2') nor an existing text file"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if "\x00" in text:
        raise ValueError(f"{path} holds NUL bytes: it is a binary file, not text")
    return text, TextSource("file", "all", str(path), file_sha256(path))


@dataclass(frozen=True)
class CalibrationInfo:
    """How calibration windows were drawn, recorded in every result."""

    dataset: str
    split: str
    origin: str
    sha256: str
    nsamples: int
    seqlen: int
    seed: int


def calibration_windows(
    tokenizer, nsamples: int, seqlen: int, seed: int = 0
) -> tuple[torch.Tensor, CalibrationInfo]:
    """`nsamples` random windows of `seqlen` tokens (seeded) from WikiText-2 train, else validation offline."""
    try:
        rows, src = wikitext2_rows("train")
    except DataNotFoundError:
        rows, src = wikitext2_rows("validation")
        log.warning("WikiText-2 train is unavailable offline: calibrating on the validation split")
    ids = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    windows = torch.stack([ids[s : s + seqlen] for s in starts])
    info = CalibrationInfo(src.dataset, src.split, src.origin, src.sha256, nsamples, seqlen, seed)
    return windows, info
