"""The installed hf-roste version, read once from the package metadata (pyproject.toml is the only place it is written)."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("hf-roste")
except metadata.PackageNotFoundError:  # a source tree that was never installed: no version to report
    __version__ = "0+unknown"
