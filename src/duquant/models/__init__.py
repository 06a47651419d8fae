"""Model loading and architecture adapters."""

from duquant.models.adapters import (
    ADAPTERS,
    Adapter,
    InputGroup,
    UnsupportedArchitectureError,
    adapter_for,
)
from duquant.models.loading import LoadedModel, default_model, load_model, user_cache_dir

__all__ = [
    "ADAPTERS",
    "Adapter",
    "InputGroup",
    "LoadedModel",
    "UnsupportedArchitectureError",
    "adapter_for",
    "default_model",
    "load_model",
    "user_cache_dir",
]
