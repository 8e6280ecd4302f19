"""`roste_state.json`: the rotation configuration and quantizer settings saved next to trainer outputs.

Every trainer checkpoint, final save and LoRA adapter folder written by `RoSTESFTTrainer` holds
this file. Whatever loads weights back (resume, `load_best_model_at_end`, `load_roste_adapter`)
reads it through `read_state_file` and checks it with `check_saved_quantization_config`, because
weights trained under one rotation configuration or quantizer compute a different function under
another, with no error from the tensor shapes.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..config import RoSTEConfig
from ..folders import STATE_FILE

#: RoSTEConfig fields that may differ between a checkpoint and the model it is loaded into: they
#: choose *how* a rotation configuration is found or how files are written, not what the weights mean.
_FREE_FIELDS = frozenset({"rotation_search", "rotation_config", "checkpoint_format", "format_version"})
_NEVER_CONVERTED = frozenset({"lm_head"})


def read_state_file(folder: str) -> dict[str, Any]:
    """Read and validate `folder/roste_state.json`; raise a `ValueError` naming the problem."""
    if not os.path.isdir(folder):
        raise ValueError(f"Checkpoint folder {folder} does not exist.")
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"{folder} has no {STATE_FILE}: it was not written by RoSTESFTTrainer (or its save was interrupted), so "
            "its rotation configuration is unknown and loading it would give a different model than was trained. "
            "Resume from a complete checkpoint-* folder (resume_from_checkpoint=True picks the newest complete one)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); the file is damaged. Use another checkpoint.") from exc
    problems = []
    if not isinstance(saved, dict):
        problems.append("it is not a JSON object")
    else:
        rc = saved.get("rotation_config")
        if not isinstance(rc, dict) or not isinstance(rc.get("layers"), list) or "R1" not in rc:
            problems.append("'rotation_config' must be an object with 'R1' and a 'layers' list")
        qc = saved.get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            problems.append("'quantization_config' must be an object")
        if "searched" in saved and not isinstance(saved["searched"], bool):
            problems.append("'searched' must be true or false")
    if problems:
        raise ValueError(f"{path} is malformed: {'; '.join(problems)}. The file is damaged; use another checkpoint.")
    return saved


def check_saved_quantization_config(saved: dict[str, Any], config: RoSTEConfig, where: str) -> None:
    """Raise if the quantizer settings saved in `where` differ from `config` (the model's RoSTEConfig).

    Bits, symmetry, clipping, group size, allowed rotations, rotation seed and excluded modules
    must agree; the search strategy and the recorded rotation configuration may differ (the
    saved rotation configuration is applied separately).
    """
    qc = saved.get("quantization_config")
    if qc is None:
        return
    current = config.to_dict()
    diffs = []
    for key in sorted(set(qc) | set(current)):
        if key in _FREE_FIELDS:
            continue
        a, b = qc.get(key), current.get(key)
        if key == "modules_to_not_convert":  # lm_head is never converted (None = default); order is irrelevant
            a, b = (sorted(set(v or ()) - _NEVER_CONVERTED) for v in (a, b))
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            diffs.append(f"{key}={a!r} in the checkpoint, {b!r} in the model")
    if diffs:
        raise ValueError(
            f"{where} was trained with another RoSTE quantization config ({'; '.join(diffs[:8])}). Its weights would "
            "compute a different function under these settings. Load the model with the checkpoint's settings: "
            f"RoSTEConfig.from_dict(json.load(open({os.path.join(where, STATE_FILE)!r}))['quantization_config'])."
        )
