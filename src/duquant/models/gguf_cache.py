"""A converted GGUF kept as a Hugging Face folder, so that later loads skip the conversion.

transformers dequantizes every GGUF tensor and parses the tokenizer out of the GGUF metadata on each
load (about 30 s for SmolLM2-135M on a 2-core machine); the folder it is saved to here reloads in
under a second, with the same float32 weights and the same tokenizer (tests/test_gguf_cache.py
checks both against a direct GGUF load). Entries are keyed by the file's content and the
transformers version that converted it, so an edited file or a new converter never reads a stale
entry. `DUQUANT_CACHE_DIR` moves the cache (default `~/.cache/duquant`), `DUQUANT_NO_GGUF_CACHE=1`
switches it off.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

# bumped when what an entry holds changes, so that older entries are not read
ENTRY_FORMAT = "1"


def cache_root() -> Path | None:
    """The folder converted GGUF files are kept in (None: caching switched off)."""
    if os.environ.get("DUQUANT_NO_GGUF_CACHE") == "1":
        return None
    root = os.environ.get("DUQUANT_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "duquant"
    return Path(root).expanduser() / "gguf"


def entry_for(path: Path) -> Path | None:
    """The cache folder of GGUF file `path` (None: caching switched off)."""
    import transformers

    from duquant.data import file_sha256

    root = cache_root()
    if root is None:
        return None
    key = f"{file_sha256(path)}|transformers {transformers.__version__}|{ENTRY_FORMAT}"
    return root / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def plain_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of a GGUF-loaded model's config without the GGUF reader's quantization marker."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):  # the weights are plain float tensors now
        del config.quantization_config
    return config


def write_entry(entry: Path, model: nn.Module, tokenizer) -> bool:
    """Save a float32 model converted from a GGUF and its tokenizer as a Hugging Face folder at
    `entry`, all or nothing (written aside, then renamed); False when it could not be written."""
    from safetensors.torch import save_model

    tmp = entry.parent / f".{entry.name}.{os.getpid()}.tmp"
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        # save_model writes a tied head once; the config's tie_word_embeddings ties it on reload
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        plain_config(model.config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(entry)
    except OSError as exc:
        if entry.is_dir():  # another process wrote it first
            return True
        log.warning(
            "could not keep the converted GGUF in %s (%s); each load converts it again "
            "(DUQUANT_CACHE_DIR moves the cache, DUQUANT_NO_GGUF_CACHE=1 switches it off)",
            entry.parent,
            exc,
        )
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in entry.iterdir()) / 2**20
    log.info("kept the converted GGUF in %s (%.0f MiB): later loads read it", entry, size)
    return True


def drop_entry(entry: Path, why: str) -> None:
    """Remove an unreadable cache entry (ours, rebuilt on the next load)."""
    log.warning("dropping the cached GGUF conversion %s (%s); converting again", entry, why)
    shutil.rmtree(entry, ignore_errors=True)


__all__ = ["cache_root", "drop_entry", "entry_for", "plain_config", "write_entry"]
