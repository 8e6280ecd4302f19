"""A RoSTE checkpoint refuses to load without ``import hf_roste``, whatever ``from_pretrained`` flags are passed.

Without hf_roste imported, transformers does not know ``quant_method="roste"``: it warns, skips the
quantizer and loads the packed tensors into plain ``nn.Linear`` layers.  Their shapes differ, so
the load fails, but with a hint to pass ``ignore_mismatched_sizes=True``, which then "works" and
leaves every quantized linear freshly initialised (a model of noise).

The guard: ``save_pretrained`` of a RoSTE model writes ``"transformers_weights": LOAD_GUARD_FILE``
into config.json.  transformers reads that field as the explicit weights file *after* it has built
the quantizer; the file does not exist and its name is the fix, so a plain load always stops with
``No such file or directory: .../<LOAD_GUARD_FILE>`` (local folder) or ``... does not appear to
have a file named <LOAD_GUARD_FILE>`` (Hub repository), with or without
``ignore_mismatched_sizes``.  With hf_roste imported, :class:`~hf_roste.quantizer.RoSTEHfQuantizer`
removes the field in ``update_attn_implementation`` (transformers' quantizer hook that receives the
model config before checkpoint files are resolved) and the usual ``model.safetensors`` loads.

The guard is written only when the running transformers has that hook (``HfQuantizer.
update_attn_implementation``); with an older transformers the checkpoint is written without it.
hf_roste's own readers of a RoSTE folder (config.json, model.safetensors) ignore the field, and
transformers' ``PretrainedConfig.save_pretrained`` drops it, so exports never carry it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..io import atomic_write_text

__all__ = ["LOAD_GUARD_FILE", "guard_supported", "remove_load_guard", "write_load_guard"]

#: A file that never exists; its name is what a user sees when loading without hf_roste.
LOAD_GUARD_FILE = "REQUIRES-hf_roste--run-import-hf_roste-before-from_pretrained--pip-install-hf-roste.safetensors"
_FIELD = "transformers_weights"


def guard_supported() -> bool:
    """Whether this transformers lets the RoSTE quantizer lift the guard before weights are resolved."""
    from transformers.quantizers.base import HfQuantizer

    return hasattr(HfQuantizer, "update_attn_implementation")


def write_load_guard(folder: str | os.PathLike) -> bool:
    """Add the guard to ``folder/config.json`` of a RoSTE checkpoint; True when written.

    Folders without a RoSTE ``quantization_config`` (or an explicit ``transformers_weights`` of their own)
    are left unchanged.
    """
    path = os.path.join(os.fspath(folder), "config.json")
    if not guard_supported() or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "roste":
        return False
    if config.get(_FIELD) not in (None, LOAD_GUARD_FILE):
        return False
    config[_FIELD] = LOAD_GUARD_FILE
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def remove_load_guard(config: Any) -> Any:
    """Drop the guard from a loaded ``PretrainedConfig`` (the RoSTE quantizer calls this while loading)."""
    if getattr(config, _FIELD, None) == LOAD_GUARD_FILE:
        delattr(config, _FIELD)
    return config
