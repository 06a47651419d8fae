"""The installed package version (one place, importable from any layer)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("duquant")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
