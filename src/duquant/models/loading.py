"""Load a causal LM and its tokenizer from a Hugging Face id, a local directory or a .gguf file."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = source or default_model()
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {tuple(DTYPES)}")
    kwargs: dict = {"dtype": DTYPES[dtype]}
    path = Path(source)
    from duquant.export import find_loader

    exported = find_loader(path)
    if exported is not None:  # through its own loader, which applies the online transforms
        model, tokenizer = exported.load(path, DTYPES[dtype], device)
        return LoadedModel(model, tokenizer, source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {source} does not exist")
        where, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        where = source
    log.info("loading %s (%s on %s)", source, dtype, device)
    tok_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
    tokenizer = AutoTokenizer.from_pretrained(where, **tok_kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    model.to(device).eval()
    check_finite_weights(model)
    return LoadedModel(model, tokenizer, source)


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with NaN/Inf weights: nothing downstream can quantize it meaningfully."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name} of the model holds NaN or Inf values")
