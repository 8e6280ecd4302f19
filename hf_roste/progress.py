"""Progress bars of hf_roste's long steps (rotation search passes, packing, export), as the ecosystem does.

Bars are tqdm bars that stay off when any of the usual switches says so:

* ``HF_HUB_DISABLE_PROGRESS_BARS=1`` / ``huggingface_hub.utils.disable_progress_bars()``;
* ``transformers.utils.logging.disable_progress_bar()``;
* a Trainer's ``disable_tqdm=True`` (``RoSTESFTTrainer`` runs its search inside :func:`progress_bars`);
* processes other than rank 0 under torch.distributed.

Otherwise tqdm's own rule applies (``disable=None``: off when the output is not a terminal).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["progress", "progress_bars", "progress_disabled"]

_ENABLED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("hf_roste_progress", default=None)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Within the block, hf_roste's bars follow ``enabled`` (e.g. ``not args.disable_tqdm``)."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def progress_disabled() -> bool:
    """True when a switch listed in the module docstring turns hf_roste's bars off."""
    if _ENABLED.get() is False or _rank() != 0:
        return True
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().upper() in ("1", "TRUE", "YES", "ON"):
        return True
    try:
        from huggingface_hub.utils import are_progress_bars_disabled

        if are_progress_bars_disabled():
            return True
    except ImportError:
        pass
    from transformers.utils import logging as hf_logging

    return not hf_logging.is_progress_bar_enabled()


def progress(iterable: Iterable[Any], desc: str, total: int | None = None, unit: str = "it", **kwargs: Any):
    """``tqdm(iterable, desc=...)`` that honours the switches of the module docstring."""
    from tqdm.auto import tqdm

    disable = True if progress_disabled() else (None if _ENABLED.get() is None else False)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=False, **kwargs)
