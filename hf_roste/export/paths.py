"""Output-folder checks shared by the exporters."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["OutputIsSourceError", "check_output_is_not_source", "source_dir_of"]


class OutputIsSourceError(ValueError):
    """An export was asked to write into the folder it reads from (the source would be overwritten)."""


def source_dir_of(model_or_dir: Any) -> str | None:
    """The folder a model was loaded from (``name_or_path`` when it is a local folder), or the path given."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        return os.fspath(model_or_dir)
    path = getattr(model_or_dir, "name_or_path", None) or getattr(getattr(model_or_dir, "config", None),
                                                                  "_name_or_path", None)
    return path if isinstance(path, str) and path and os.path.isdir(path) else None


def _same_folder(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_is_not_source(model_or_dir: Any, out_dir: str | os.PathLike, what: str = "export") -> None:
    """Refuse an output folder that is the source folder, after resolving ``..``, ``~`` and symbolic links.

    Raises:
        OutputIsSourceError: writing there would overwrite the checkpoint being read.
    """
    src = source_dir_of(model_or_dir)
    if src is None:
        return
    src_path = os.path.expanduser(src)
    out_path = os.path.expanduser(os.fspath(out_dir))
    if _same_folder(src_path, out_path):
        raise OutputIsSourceError(
            f"{what}: the output folder {os.fspath(out_dir)!r} is the source folder {src!r} "
            f"(both resolve to {os.path.realpath(src_path)!r}); writing there would overwrite the RoSTE "
            "checkpoint being exported. Pass a different output folder, e.g. "
            f"{os.path.realpath(src_path).rstrip(os.sep) + '-ct'!r}."
        )
