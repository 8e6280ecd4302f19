"""Trainer checkpoints on disk: finding the last complete one and loading its master weights back.

`RoSTESFTTrainer` resumes and loads its best model through `load_master_weights` instead of
transformers' direct non-strict file read: tensor digests are verified, keys are renamed as
`from_pretrained` renames them (GPT-NeoX saves `lm_head` as `embed_out`) and the load is strict.
"""

from __future__ import annotations

import glob
import json
import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..folders import STATE_FILE, read_roste_quantization_config


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` folder of `output_dir` that holds `roste_state.json` (None if none)."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        prefix, _, step = name.rpartition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(step), os.path.join(output_dir, name)))
    return max(found)[1] if found else None


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(getattr(model, "module", model), PeftModel)


def has_adapter_weights(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("adapter_model.safetensors", "adapter_model.bin"))


def refuse_packed_folder(folder: str) -> None:
    try:
        qc = read_roste_quantization_config(folder)
        packed = qc is not None and qc.get("checkpoint_format") == "packed"
    except ValueError:  # unreadable config.json: the state-file checks report the folder
        return
    if packed:
        raise ValueError(
            f"{folder} is a packed final save (integer codes, written by save_model() / save_pretrained), not a "
            "training checkpoint: training cannot resume from it. Resume from one of the checkpoint-* folders "
            "written during training (resume_from_checkpoint=True picks the newest complete one)."
        )


def load_master_weights(model, folder: str) -> None:
    """Load a trainer checkpoint's master weights into `model` after verifying every tensor's digest.

    Callers run `refuse_packed_folder` first (with the `roste_state.json` checks); a packed folder
    that reaches here still fails `verify_checkpoint`'s format check.
    """
    from ..export.checkpoint import _model_key_mapper, verify_checkpoint

    model = getattr(model, "module", model)
    single, index = os.path.join(folder, SAFE_WEIGHTS_NAME), os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted({os.path.join(folder, name) for name in json.load(f)["weight_map"].values()})
    elif has_adapter_weights(folder):
        raise ValueError(
            f"{folder} is a LoRA adapter checkpoint (adapter weights only) but this trainer fine-tunes the full model. "
            "Resume it with the same peft_config it was trained with."
        )
    else:
        other = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.bin")))
        raise ValueError(
            f"{folder} holds no safetensors weights"
            + (f" (found {other}: RoSTE loads checkpoints from safetensors only)" if other else "")
            + ". Resume from a checkpoint-* folder written by RoSTESFTTrainer."
        )
    hf_quantizer = getattr(model, "hf_quantizer", None)
    # the quantizer settings were compared with roste_state.json already; the digests are checked here
    verify_checkpoint(model, files, "master", hf_quantizer=hf_quantizer, check_config=False)
    to_model_key = _model_key_mapper(model, hf_quantizer)
    from safetensors import safe_open

    state = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                state[to_model_key(key)] = f.get_tensor(key)
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder} does not match this model: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}. "
            "Resume with the model (architecture and RoSTEConfig) the checkpoint was trained with."
        )
    if tied and result.missing_keys:
        model.tie_weights()
