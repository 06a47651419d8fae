"""Load a causal LM and its tokenizer from a Hugging Face id, a local directory or a .gguf file."""

from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from duquant.jsonio import JSONFileError, read_json_object
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
        read_config(path)
        check_weight_files(path)
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
    check_finite_weights(model, source)
    check_vocabulary(model, tokenizer, source)
    return LoadedModel(model, tokenizer, source)


def _quantization_config(folder: Path) -> dict | None:
    """The `quantization_config` of a model folder's config.json, if any."""
    try:
        cfg = read_config(folder)
    except (OSError, ValueError):
        return None
    return cfg.get("quantization_config")


MAX_JSON_BYTES = 64 << 20  # config.json and the safetensors index: far under this
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _read_json_object(file: Path, what: str) -> dict:
    """`file` parsed as a JSON object (bounded in size), else one ModelSourceError naming it."""
    try:
        return read_json_object(file, MAX_JSON_BYTES)
    except JSONFileError as exc:
        raise ModelSourceError(f"{file}: not a valid {what} ({exc})") from None


def read_config(folder: str | Path) -> dict:
    """A model folder's config.json as a dict; an unreadable or invalid one is refused in one line
    naming it."""
    file = Path(folder) / "config.json"
    cfg = _read_json_object(file, "config.json")
    for key in ("architectures",):
        if key in cfg and not (
            isinstance(cfg[key], list) and all(isinstance(a, str) for a in cfg[key])
        ):
            raise ModelSourceError(
                f"{file}: not a valid config.json ({key} is not a list of names)"
            )
    if "model_type" in cfg and not isinstance(cfg["model_type"], str):
        raise ModelSourceError(f"{file}: not a valid config.json (model_type is not a name)")
    return cfg


def load_config(folder: str | Path):
    """The transformers config of a model folder; a config.json it cannot take (a field of the
    wrong type, an unknown model_type) is one ModelSourceError naming the file."""
    from transformers import AutoConfig

    file = Path(folder) / "config.json"
    read_config(folder)
    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise many kinds
        why = " ".join(" ".join(str(exc).splitlines()[:2]).split()) or type(exc).__name__
        raise ModelSourceError(f"{file}: {why[:300]}") from None


def safetensors_index(folder: str | Path) -> dict[str, str] | None:
    """The weight map (tensor -> shard file) of a folder's model.safetensors.index.json, checked:
    a JSON object whose weight_map names shards of this folder; None when it has no index."""
    folder = Path(folder)
    file = folder / "model.safetensors.index.json"
    if not file.is_file():
        return None
    data = _read_json_object(file, "safetensors index")
    wmap = data.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise ModelSourceError(f"{file}: not a valid safetensors index (no weight_map)")
    for name, shard in wmap.items():
        if (
            not isinstance(shard, str)
            or Path(shard).name != shard
            or not shard.endswith(".safetensors")
        ):
            raise ModelSourceError(
                f"{file}: not a valid safetensors index (tensor {name} maps to {str(shard)[:60]!r})"
            )
        if not (folder / shard).is_file():
            raise ModelSourceError(f"{file}: tensor {name} is in {shard}, which is missing")
    return wmap


def check_weight_files(folder: str | Path) -> None:
    """Refuse a model folder whose weights cannot be trusted, before anything loads: pickle
    weights only (never unpickled), a damaged safetensors shard (its header does not parse or does
    not cover the file: truncated), an index naming tensors its shards lack. One line, the file."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelSourceError(
                f"{folder / pickles[0]}: pickle weights, which duquant never loads (they can run "
                "code); give the model with safetensors weights"
            )
        return
    wmap = safetensors_index(folder)
    held: dict[str, set[str]] = {}
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as f:
                held[shard.name] = set(f.keys())
        except (SafetensorError, OSError) as exc:
            raise ModelSourceError(
                f"{shard}: the safetensors file is damaged ({' '.join(str(exc).split())}); fetch or "
                "write it again"
            ) from None
    if wmap is not None:
        for name, shard in wmap.items():
            if name not in held.get(shard, ()):
                raise ModelSourceError(
                    f"{folder / shard}: holds no tensor {name}, which "
                    "model.safetensors.index.json places there"
                )


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
            tokenizer, model = _from_pretrained(str(entry), source, dtype)
            check_finite_weights(model, str(entry))  # a damaged entry, not a damaged GGUF
            return tokenizer, model
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
    # safetensors only: a folder's pickle weights are never read (check_weight_files refuses them)
    # and a tensor of the wrong shape reported in the loading info (check_loading_info refuses it)
    safe = {} if gguf else {"use_safetensors": True, "ignore_mismatched_sizes": True}
    from transformers.utils import logging as hf_logging

    if not gguf and Path(where).is_dir():
        load_config(where)  # config.json that transformers cannot take: one line naming it
    verbosity = hf_logging.get_verbosity()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **gguf)
        # its load report (missing / unexpected tensors) is check_loading_info's one line instead
        hf_logging.set_verbosity_error()
        model, info = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, output_loading_info=True, **gguf, **safe
        )
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
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loading_info(info, where if not gguf else source)
    if not gguf:
        check_file_dtypes(Path(where), model)
    return tokenizer, model


def check_file_dtypes(folder: Path, model: nn.Module) -> None:
    """Refuse integer tensors in a folder's safetensors where the model holds floating-point
    weights (transformers would cast them silently), naming the file and the tensor."""
    from safetensors import safe_open

    if not folder.is_dir():
        return
    state = model.state_dict()
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                dtype = f.get_slice(name).get_dtype()
                t = state.get(name)
                if t is not None and t.is_floating_point() and not dtype.startswith(("F", "BF")):
                    raise ModelSourceError(
                        f"{shard}: tensor {name} is {dtype}, the model expects floating-point "
                        "weights; the weights do not match config.json"
                    )


def check_loading_info(info: dict, where: str) -> None:
    """Refuse a model whose weights file did not fill it (a weight left randomly initialised) or
    held tensors it has no place for (an export stripped of its quantization_config, a checkpoint
    of another layout); tied weights the config declares are not reported by transformers."""
    files = "the weights"
    folder = Path(where)
    if folder.is_dir():
        names = sorted(p.name for p in folder.glob("*.safetensors"))
        files = str(folder / names[0]) if len(names) == 1 else f"the safetensors files of {folder}"
    for key, what in (
        ("missing_keys", "lacks tensor"),
        ("mismatched_keys", "holds a tensor of the wrong shape:"),
        ("unexpected_keys", "holds tensor"),
    ):
        keys = sorted(info.get(key) or [])
        if keys:
            first = keys[0] if isinstance(keys[0], str) else keys[0][0]
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            tail = " that the model has no place for" if key == "unexpected_keys" else ""
            raise ModelSourceError(
                f"{files}: {what} {first}{tail}{more}; the weights do not match config.json"
            )
    errors = info.get("error_msgs") or []
    if errors:
        raise ModelSourceError(f"{files}: {' '.join(str(errors[0]).split())[:300]}")


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
        return tuple(read_config(path).get("architectures") or ())
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
    archs = read_config(config.parent).get("architectures") or []
    if archs:
        adapter_for_names(*archs)


def check_finite_weights(model: nn.Module, source: str | None = None) -> None:
    """Refuse a model with NaN/Inf weights: nothing downstream can quantize it meaningfully.
    With `source` (the model argument), the message names it and, for a folder, the file."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            where = "of the model"
            if source is not None:
                where = f"of model {source}"
                folder = Path(source).expanduser()
                if folder.is_dir():
                    wmap = safetensors_index(folder) or {}
                    where = f"of {folder / wmap.get(name, 'model.safetensors')}"
            raise ModelSourceError(f"parameter {name} {where} holds NaN or Inf values")
