"""duquant: MXFP4 / NVFP4 W4A4 post-training quantization with DuQuant++ and its baselines."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("duquant")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
