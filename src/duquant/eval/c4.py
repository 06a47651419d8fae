"""C4 perplexity by the protocol of GPTQ, OmniQuant/DuQuant and their peers (random windows of C4 en validation).

What is implemented, step by step (GPTQ `datautils.get_c4`, copied by OmniQuant and DuQuant):
1. Documents: the `en` validation shard `c4-validation.00000-of-00008.json.gz` of allenai/c4 (45,576
   documents), in file order: from the hub through
   `datasets.load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"})`,
   or from a local file of the same layout (gzip JSON lines with a `text` field) at
   `$DUQUANT_DATA_DIR/c4/c4-validation.00000-of-00008.json.gz`.
   Source order, as for WikiText-2 in `duquant.data`: the local file when $DUQUANT_DATA_DIR is set and holds
   it, else the hub when `duquant.data.hub_reachable()`, else the local file in the default data directory, else
   `DataNotFoundError` naming the file needed. Never another corpus in its place.
2. Sampling: `rng = random.Random(seed)` (seed 0, the same stream as the peers' `random.seed(0)`); for each
   of `nwindows` (256) windows, draw `i = rng.randint(0, ndocs - 1)` until document i tokenizes
   (`tokenizer(text)`, default special tokens, i.e. with BOS for Llama tokenizers) to MORE than `seqlen`
   tokens; then `start = rng.randint(0, ntokens - seqlen - 1)` and take tokens [start, start + seqlen).
   (GPTQ tests `>= seqlen` and then crashes in randint when a document has exactly seqlen tokens; `>`
   draws the identical stream whenever theirs does not crash.)
3. Perplexity (the `c4` entry of `duquant.eval.registry`): the windows are concatenated and scored by
   `duquant.eval.perplexity.perplexity` with the same seqlen: one forward per window, mean next-token
   NLL over its seqlen - 1 predictions, exp.
   `max_windows` scores only the first N of the 256 windows (quick runs; the drawn windows do not change).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import duquant.data as dqdata
from duquant.data import DataNotFoundError, TextSource, data_dir, file_sha256

log = logging.getLogger(__name__)

C4_FILE = "c4-validation.00000-of-00008.json.gz"
C4_HUB_PATH = "allenai/c4"
C4_HUB_FILE = f"en/{C4_FILE}"
C4_LOCAL = f"c4/{C4_FILE}"


@dataclass(frozen=True)
class C4Info:
    """How the C4 windows were drawn, recorded with every C4 result."""

    source: TextSource
    documents: int
    nwindows: int
    seqlen: int
    seed: int
    documents_tokenized: int


def local_c4_path() -> Path | None:
    """The local C4 validation shard, if the data directory has it."""
    root = data_dir()
    if root is not None and (root / C4_LOCAL).is_file():
        return root / C4_LOCAL
    return None


def c4_mode() -> str:
    """Where C4 would be read from now: 'local', 'hub' or 'missing' (cheap: reads no data)."""
    local = local_c4_path()
    if local is not None and os.environ.get("DUQUANT_DATA_DIR"):
        return "local"
    if dqdata.hub_reachable():
        return "hub"
    return "local" if local is not None else "missing"


def read_c4_file(path: Path) -> list[str]:
    """The `text` of every document of a gzip JSON-lines C4 shard, in file order."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _hub_c4() -> list[str] | None:
    """C4 validation documents from the hub, or None when unavailable."""
    try:
        import datasets

        ds = datasets.load_dataset(
            C4_HUB_PATH, data_files={"validation": C4_HUB_FILE}, split="validation"
        )
        return list(ds["text"])
    except Exception as exc:  # no datasets, offline, blocked: fall back to the local file
        log.info("C4 not available from the hub (%s: %s)", type(exc).__name__, exc)
        return None


def c4_documents() -> tuple[list[str], TextSource]:
    """C4 `en` validation shard 0 documents and where they came from."""
    mode = c4_mode()
    if mode == "hub":
        docs = _hub_c4()
        if docs is not None:
            sha = hashlib.sha256("\n".join(docs).encode()).hexdigest()
            return docs, TextSource("c4", "validation", f"hub:{C4_HUB_PATH}/{C4_HUB_FILE}", sha)
    local = local_c4_path()
    if local is not None:
        return read_c4_file(local), TextSource("c4", "validation", str(local), file_sha256(local))
    where = (
        f"{data_dir()}/{C4_LOCAL}" if data_dir() is not None else f"$DUQUANT_DATA_DIR/{C4_LOCAL}"
    )
    raise DataNotFoundError(
        f"C4 validation is not reachable on the Hugging Face hub and no local copy was found at {where}. "
        f"It needs {C4_FILE} (allenai/c4, {C4_HUB_FILE}) saved as {C4_LOCAL} under DUQUANT_DATA_DIR."
    )


def sample_windows(
    docs: list[str], tokenizer, seqlen: int = 2048, nwindows: int = 256, seed: int = 0
) -> tuple[torch.Tensor, int]:
    """The protocol's random windows, [nwindows, seqlen], and how many distinct documents were tokenized."""
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}
    longest = 0
    windows = []
    for _ in tqdm(range(nwindows), desc="c4 windows", leave=False):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i not in cache:
                cache[i] = tokenizer(docs[i]).input_ids
                longest = max(longest, len(cache[i]))
            if len(cache[i]) > seqlen:
                break
            if len(cache) == len(docs) and longest <= seqlen:
                raise ValueError(f"no C4 document is longer than seqlen={seqlen} tokens")
        ids = cache[i]
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(torch.tensor(ids[start : start + seqlen], dtype=torch.long))
    return torch.stack(windows), len(cache)


def c4_windows(
    tokenizer, seqlen: int = 2048, nwindows: int = 256, seed: int = 0
) -> tuple[torch.Tensor, C4Info]:
    """Load C4 and draw its evaluation windows."""
    docs, src = c4_documents()
    if not docs:
        raise ValueError(f"{src.origin} holds no C4 documents")
    windows, ntok = sample_windows(docs, tokenizer, seqlen, nwindows, seed)
    return windows, C4Info(src, len(docs), nwindows, seqlen, seed, ntok)
