"""Load a causal LM and its tokenizer from a Hugging Face id, a local directory or a .gguf file."""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from duquant.models.adapters import UnsupportedArchitectureError, adapter_for_names

log = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_MAGIC = b"GGUF"
# a Hugging Face repo id: `name` or `org/name`
HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")


class ModelSourceError(ValueError):
    """A model argument that cannot be loaded: the message says what and how to fix it."""


def check_model_source(source: str) -> None:
    """Refuse, before anything is loaded, a model argument that cannot load: one clear line."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise ModelSourceError(f"model {source}: GGUF file does not exist")
        if not path.is_file():
            raise ModelSourceError(f"model {source}: is not a file; give a .gguf file")
        with open(path, "rb") as f:
            head = f.read(4)
        if not head:
            raise ModelSourceError(
                f"model {source}: the GGUF file is empty (0 bytes); fetch it again"
            )
        if head != GGUF_MAGIC:
            raise ModelSourceError(
                f"model {source}: not a GGUF file (it starts with {head!r}, not b'GGUF'); "
                "give a .gguf file, a Hugging Face model folder or id"
            )
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"model {source}: the folder has no config.json, so it is not a Hugging Face model "
                "folder; give the folder holding config.json and the weights, or a .gguf file"
            )
        check_architecture(str(path))
    elif source.startswith((".", "/", "~")) or not HF_ID.match(source):
        raise ModelSourceError(
            f"model {source}: no such file or folder, and not a Hugging Face id (org/name); "
            "check the path"
        )


def user_cache_dir() -> Path:
    """duquant's per-user cache (models fetched by the set-up, converted checkpoints)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "duquant"


def _shared_candidates() -> list[Path]:
    """Places a checkout keeps the shared models folder: beside the repo and beside the cwd."""
    repo = Path(__file__).resolve().parents[3]
    return [repo.parent / "shared" / "models", Path.cwd().parent / "shared" / "models"]


def default_model() -> str:
    """The default model: $DUQUANT_MODEL, else the user cache, else ../shared/models, else an error."""
    env = os.environ.get("DUQUANT_MODEL")
    if env:
        return env
    places = [user_cache_dir() / "models", *_shared_candidates()]
    for place in places:
        if (place / DEFAULT_MODEL_FILE).is_file():
            return str(place / DEFAULT_MODEL_FILE)
    raise FileNotFoundError(
        f"default model {DEFAULT_MODEL_FILE} not found in {[str(p) for p in places]}. "
        "Set DUQUANT_MODEL to a model path or id, or run scripts/setup.sh, which fetches it."
    )


@dataclass
class LoadedModel:
    """A model, its tokenizer and the string it was loaded from."""

    model: nn.Module
    tokenizer: object
    source: str


def load_model(
    source: str | None = None, dtype: str = "float32", device: str = "cpu"
) -> LoadedModel:
    """Load `source` (HF id, local HF dir or .gguf file; None = the default model) in eval mode."""
    source = source or default_model()
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {tuple(DTYPES)}")
    check_model_source(source)
    path = Path(source).expanduser()
    if path.is_dir() and _quantization_config(path):
        raise ModelSourceError(
            f"model {source}: a quantized checkpoint (its config.json has a quantization_config); "
            "load it with duquant.api.load_model, which applies its online transforms"
        )
    if path.suffix == ".gguf":
        tokenizer, model = _load_gguf(path, source, DTYPES[dtype], device)
    else:
        if path.is_dir():
            where = str(path)
        else:
            where = source
            _check_hub_for(source)
        check_architecture(where)
        log.info("loading %s (%s on %s)", source, dtype, device)
        tokenizer, model = _from_pretrained(where, source, DTYPES[dtype])
    model.to(device).eval()
    check_finite_weights(model)
    check_vocabulary(model, tokenizer, source)
    return LoadedModel(model, tokenizer, source)


def _quantization_config(folder: Path) -> dict | None:
    """The `quantization_config` of a model folder's config.json, if any."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("quantization_config") if isinstance(cfg, dict) else None


def _load_gguf(
    path: Path, source: str, dtype: torch.dtype, device: str
) -> tuple[object, nn.Module]:
    """(tokenizer, model) of a GGUF file, through the converted-GGUF cache (models.gguf_cache)
    when it is on: converted once at float32, then read from the cache folder at `dtype`."""
    from duquant.models import gguf_cache

    check_architecture(str(path.parent))
    entry = gguf_cache.entry_for(path)
    if entry is not None and entry.is_dir():
        log.info("loading %s (%s on %s) from its converted copy %s", source, dtype, device, entry)
        try:
            return _from_pretrained(str(entry), source, dtype)
        except ModelSourceError as exc:  # a damaged entry: ours to rebuild
            gguf_cache.drop_entry(entry, str(exc))
    log.info("loading %s (%s on %s): converting the GGUF", source, dtype, device)
    gguf = {"gguf_file": path.name}
    if entry is None:
        return _from_pretrained(str(path.parent), source, dtype, gguf)
    tokenizer, model = _from_pretrained(str(path.parent), source, torch.float32, gguf)
    if not gguf_cache.write_entry(entry, model, tokenizer):
        return tokenizer, model.to(dtype)
    del model
    return _from_pretrained(str(entry), source, dtype)


def _from_pretrained(
    where: str, source: str, dtype: torch.dtype, gguf: dict | None = None
) -> tuple[object, nn.Module]:
    """(tokenizer, model) through transformers, its load errors as one-line ModelSourceErrors."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf or {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **gguf)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **gguf)
    except (struct.error, EOFError, IndexError) as exc:  # the GGUF reader on a cut-off file
        raise ModelSourceError(
            f"model {source}: the file is truncated or corrupt ({type(exc).__name__}: {exc}); "
            "fetch it again"
        ) from None
    except SafetensorError as exc:  # a damaged weights file in a folder
        raise ModelSourceError(
            f"model {source}: a safetensors file is damaged ({exc}); fetch or write it again"
        ) from None
    except (ValueError, OSError) as exc:
        if gguf and not isinstance(exc, ModelSourceError):
            raise ModelSourceError(
                f"model {source}: the GGUF file could not be read ({str(exc).splitlines()[0]}); "
                "it may be truncated or of an architecture transformers cannot load"
            ) from None
        raise ModelSourceError(f"model {source}: {str(exc).splitlines()[0]}") from None
    return tokenizer, model


def _check_hub_for(source: str) -> None:
    """A Hugging Face id needs the hub (or its local cache): say so instead of a long network error."""
    from duquant.data import hub_reachable

    if hub_reachable() or os.environ.get("HF_HUB_OFFLINE") == "1":
        return  # online, or offline on purpose: transformers reads its cache
    raise ModelSourceError(
        f"model {source}: not a local file or folder, and the Hugging Face hub is not reachable; "
        "give a local .gguf file or model folder"
    )


def check_vocabulary(model: nn.Module, tokenizer, source: str) -> None:
    """Refuse a tokenizer that emits ids the model's embedding has no row for."""
    rows = model.get_input_embeddings().num_embeddings
    n = len(tokenizer)
    if n > rows:
        raise ModelSourceError(
            f"model {source}: the tokenizer has {n} tokens but the embedding only {rows} rows, so "
            "some token ids have no embedding; use the tokenizer that belongs to this model"
        )


def architectures_of(source: str) -> tuple[str, ...]:
    """The architecture names a local model declares without loading it: config.json's
    `architectures` for a folder, `general.architecture` for a GGUF; () when unknown."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return tuple(json.loads((path / "config.json").read_text()).get("architectures") or ())
    if path.suffix == ".gguf" and path.is_file():
        arch = gguf_architecture(path)
        return (arch,) if arch else ()
    return ()


def gguf_architecture(path: Path) -> str | None:
    """`general.architecture` of a GGUF file, read from its first metadata entries (no tensors)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return None
            _version, _tensors, n_kv = struct.unpack("<IQQ", f.read(20))
            for _ in range(min(n_kv, 8)):
                (klen,) = struct.unpack("<Q", f.read(8))
                key = f.read(klen).decode("utf-8", "replace")
                (vtype,) = struct.unpack("<I", f.read(4))
                if vtype != 8:  # only string values are read; the architecture comes first
                    return None
                (vlen,) = struct.unpack("<Q", f.read(8))
                value = f.read(vlen).decode("utf-8", "replace")
                if key == "general.architecture":
                    return value
    except (OSError, struct.error):
        return None
    return None


def refuse_method(source: str, method) -> None:
    """Refuse, before loading, a method that cannot apply to the model's family (adapter.refuse)."""
    from duquant.models.adapters import GGUF_ARCHITECTURES, adapter_for_names

    archs = architectures_of(source)
    adapter = next((GGUF_ARCHITECTURES[a] for a in archs if a in GGUF_ARCHITECTURES), None)
    if adapter is None and archs:
        try:
            adapter = adapter_for_names(*archs)
        except UnsupportedArchitectureError:
            return  # reported by check_architecture / adapter_for with the supported list
    if adapter is None:
        return
    why = adapter.refuse(method)
    if why:
        raise ModelSourceError(why)


def check_architecture(where: str) -> None:
    """Refuse a local checkpoint folder of an unsupported architecture before any weight loads."""
    config = Path(where) / "config.json"
    if not config.is_file():
        return  # a hub id or a GGUF file: checked once the model is built
    archs = json.loads(config.read_text()).get("architectures") or []
    if archs:
        adapter_for_names(*archs)


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with NaN/Inf weights: nothing downstream can quantize it meaningfully."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name} of the model holds NaN or Inf values")
