"""duquant: MXFP4 / NVFP4 W4A4 post-training quantization with DuQuant++ and its baselines.

`duquant.quantize(...)` is the one-call library API (duquant.api.quantize), imported on first use so
that `import duquant` stays light.
"""

from duquant._version import __version__


def __getattr__(name: str):
    """`duquant.quantize` and `duquant.api`, loaded lazily (they import torch and transformers)."""
    if name in ("quantize", "api"):
        import importlib

        api = importlib.import_module("duquant.api")
        return api if name == "api" else api.quantize
    raise AttributeError(f"module 'duquant' has no attribute {name!r}")


__all__ = ["__version__", "quantize"]
