"""RoSTE folders on disk: the one reader for "is this folder a RoSTE checkpoint, and which kind?".

hf_roste writes three kinds of folders:

* ``"master"``: `save_pretrained` in master format or a trainer ``checkpoint-*`` folder
  (full-precision rotated weights; ``config.json`` has ``quantization_config.quant_method == "roste"``);
* ``"packed"``: the default `save_pretrained` / final save (integer codes;
  ``quantization_config.checkpoint_format == "packed"``);
* ``"adapter"``: LoRA adapters saved by `RoSTESFTTrainer` (``adapter_config.json`` next to the
  trainer's ``roste_state.json``).

The CLI, the trainer, the Hub push and the compressed-tensors export all ask this module. It
depends on nothing else in hf_roste (it sits at the bottom of the layering, next to `io.py`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

#: The trainer's record of the rotation configuration and quantizer settings (see `training.state`).
STATE_FILE = "roste_state.json"
#: PEFT's adapter configuration file.
ADAPTER_CONFIG = "adapter_config.json"

FolderKind = Literal["master", "packed", "adapter"]


def read_json_file(path: str, fix: str) -> Any:
    """The JSON content of `path`; a `ValueError` naming the file, the problem and `fix` when it is unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); {fix}") from exc


def read_roste_quantization_config(path: str, *, hub: bool = False) -> dict[str, Any] | None:
    """The ``quantization_config`` of the RoSTE checkpoint at `path`, or None when it is not one.

    A local folder is read directly (``config.json``; None when it has none). With ``hub=True`` a
    path that is not a local folder is resolved through `transformers.AutoConfig` (Hub cache or
    download); a repository that cannot be read gives None.

    Raises:
        ValueError: a local ``config.json`` that is not readable JSON (the message names the file).
    """
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            return None
        cfg = read_json_file(cfg_path, "save the model again.")
        qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    elif hub:
        from transformers import AutoConfig

        try:
            qc = getattr(AutoConfig.from_pretrained(path), "quantization_config", None)
        except (OSError, ValueError):
            return None
        if qc is not None and not isinstance(qc, dict):
            qc = qc.to_dict()
    else:
        return None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "roste" else None


def is_adapter_folder(path: str) -> bool:
    """A local folder of PEFT adapters (``adapter_config.json``), RoSTE or not."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def roste_folder_kind(path: str, *, hub: bool = False) -> FolderKind | None:
    """``"adapter"``, ``"packed"`` or ``"master"`` for a folder hf_roste wrote (see the module docstring); else None.

    A checkpoint that does not record ``checkpoint_format`` is a master checkpoint (packed saves
    always record it). `hub` is passed to :func:`read_roste_quantization_config`.
    """
    if is_adapter_folder(path) and os.path.isfile(os.path.join(path, STATE_FILE)):
        return "adapter"
    qc = read_roste_quantization_config(path, hub=hub)
    if qc is None:
        return None
    return "packed" if qc.get("checkpoint_format") == "packed" else "master"


def is_roste_checkpoint(path: str, *, hub: bool = False) -> bool:
    """True when `path` holds a RoSTE model checkpoint (master or packed): its config has quant_method "roste"."""
    return read_roste_quantization_config(path, hub=hub) is not None
