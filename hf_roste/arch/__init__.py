"""Per-family adapters: which modules play which role in the RoSTE transformation."""

from __future__ import annotations

from torch import nn

from .base import ArchAdapter
from .families import ADAPTERS, GPT_NEOX, LLAMA_LIKE

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model_or_type: nn.Module | str) -> ArchAdapter:
    """The adapter of a model (or a `model_type` string); ValueError listing supported types otherwise."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(
        f"RoSTE does not support model_type={model_type!r}. Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "Adding one is a small declarative adapter in hf_roste/arch/families.py."
    )


__all__ = ["ArchAdapter", "get_adapter", "SUPPORTED_MODEL_TYPES", "LLAMA_LIKE", "GPT_NEOX"]
