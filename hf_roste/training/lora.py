"""LoRA on RoSTE models: the adapter update goes inside the weight quantizer.

A plain LoRA layer around a fake-quantized linear computes `Q(x) Q(W)^T + s B A x`, but after
`merge_and_unload()` the deployed model computes `Q(x) Q(W + s B A)^T`: the two differ. Here the
training forward already computes the merged form, `Q_a(x R4?) Q_w(W + s B A)^T + b`, so merging
and packing reproduce the trained model exactly. Gradients reach A and B through the
straight-through estimator.

Constraints (checked): `lora_dropout` must be 0 (dropout on the LoRA input has no merged
equivalent), no LoRA variants (DoRA, ...), no mixed-adapter batches.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from transformers.utils import logging

from ..folders import ADAPTER_CONFIG, is_roste_checkpoint, read_json_file
from ..modules.qat_linear import QATLinear
from ..numerics import fake_quantize
from .state import STATE_FILE, check_saved_quantization_config, read_state_file

logger = logging.get_logger(__name__)


def check_lora_config(config: LoraConfig) -> None:
    """Raise a clear error for LoRA options that have no exact quantized merge."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"RoSTE supports LoRA adapters (peft.LoraConfig); got {type(config).__name__}.")
    if config.lora_dropout:
        raise ValueError(
            f"LoraConfig.lora_dropout={config.lora_dropout} is not supported with RoSTE: the LoRA update is merged into "
            "the quantized weight during training so that the exported model equals the trained one. Set lora_dropout=0."
        )
    for flag in ("use_dora", "use_rslora_variant"):
        if getattr(config, flag, False):
            raise ValueError(f"LoraConfig.{flag}=True is not supported with RoSTE; use plain LoRA.")


class QATLoraLinear(LoraLinear):
    """LoRA layer for `QATLinear` computing `Q_a(x) Q_w(W + sum_i s_i B_i A_i)^T + b`."""

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        check_lora_config(config)
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("Mixed-adapter batches (adapter_names=...) are not supported by RoSTE LoRA layers.")
        base: QATLinear = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x)
        if self.merged:
            return base(x)
        weight = base.weight
        for name in self.active_adapters:
            if name not in self.lora_A.keys():
                continue
            if name in self.lora_variant:
                raise ValueError(f"LoRA variant of adapter {name!r} is not supported by RoSTE.")
            weight = weight + self.get_delta_weight(name).to(weight.dtype)
        if base.quant_enabled and base.weight_spec.enabled:
            weight = fake_quantize(weight, base.weight_spec)
        return F.linear(base.quantize_input(x), weight, base.bias)

    def __repr__(self) -> str:
        return "roste." + super().__repr__()


def register_roste_lora(config: LoraConfig) -> LoraConfig:
    """Make `config` wrap `QATLinear` modules with `QATLoraLinear` (returns the same config)."""
    check_lora_config(config)
    config._register_custom_module({QATLinear: QATLoraLinear})
    return config


def check_no_foreign_lora(model) -> None:
    """Refuse plain PEFT LoRA layers around `QATLinear`s (a model built with `get_peft_model` directly).

    Such a layer adds the adapter outside the weight quantizer, so the trained model is not the
    one `merge_and_unload()` and packing produce.
    """
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, QATLoraLinear):
            if isinstance(module.get_base_layer(), QATLinear):
                raise ValueError(
                    f"{name} is a plain PEFT LoRA layer around a RoSTE QATLinear: its update would bypass the weight "
                    "quantizer and the merged, packed model would differ from the trained one. Pass the LoRA "
                    "settings as RoSTESFTTrainer(peft_config=LoraConfig(...)) on the un-wrapped model, or call "
                    "register_roste_lora(config) before get_peft_model(model, config)."
                )


def _saved_state(adapter_path: str) -> dict | None:
    if os.path.isdir(adapter_path):
        if os.path.isfile(os.path.join(adapter_path, STATE_FILE)):
            return read_state_file(adapter_path)
        return None
    try:  # a Hub repository
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(adapter_path, STATE_FILE)
    except Exception:  # no such file in the repo, or offline
        return None
    return read_state_file(os.path.dirname(local))


def load_roste_adapter(model, adapter_path: str, adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """Load LoRA adapters trained with RoSTE onto a RoSTE base model (the one documented call).

    The base must be prepared with the same `RoSTEConfig` the adapters were trained with, e.g.
    loaded from the same full-precision checkpoint and configuration. When the adapter folder
    holds the trainer's `roste_state.json`, its quantizer settings are checked against the base
    (a mismatch is an error) and its rotation configuration (the search's choice) is applied to
    the base before the adapters are attached.
    """
    from ..rotation.fusion import set_rotation_config
    from ..state import get_state

    saved = _saved_state(adapter_path)
    state = get_state(model)
    if saved is None:
        logger.warning(
            "No %s found for %s: the base model's rotation configuration and quantizer settings cannot be checked "
            "against the ones the adapters were trained with.", STATE_FILE, adapter_path,
        )
    else:
        check_saved_quantization_config(saved, state.config, adapter_path)
        if saved["rotation_config"] != {"R1": state.applied["R1"], "layers": state.applied["layers"]}:
            set_rotation_config(model, saved["rotation_config"], record=True)
            state.searched = True
    config = LoraConfig.from_pretrained(adapter_path)
    register_roste_lora(config)
    config.inference_mode = not is_trainable
    return PeftModel.from_pretrained(model, adapter_path, adapter_name=adapter_name, config=config,
                                     is_trainable=is_trainable)


def adapter_base_model(path: str) -> tuple[str, str | None]:
    """(base_model_name_or_path, revision) recorded in the adapter folder's `adapter_config.json`."""
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    cfg = read_json_file(cfg_path, "save the adapters again.")
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not base or not isinstance(base, str):
        raise ValueError(
            f"{cfg_path} does not name its base model (base_model_name_or_path): set it to the model the adapters "
            "were trained on."
        )
    return base, cfg.get("revision") or None


def load_roste_lora_model(path: str, *, dtype: Any = None) -> PeftModel:
    """The RoSTE + LoRA model that `RoSTESFTTrainer` (`hf-roste sft --use_peft true`) trained and saved in `path`.

    The base named in `adapter_config.json` is loaded with the `RoSTEConfig` and rotation
    configuration of `roste_state.json` (so its weights are rotated and fake-quantized exactly as
    during training), then the adapters go inside the weight quantizers with `load_roste_adapter`.

    Args:
        path: the adapter folder.
        dtype: passed to `from_pretrained` for the base model (a `torch.dtype`, ``"auto"``, or None).
    """
    from ..config import RoSTEConfig
    from ..state import get_state

    base, revision = adapter_base_model(path)
    saved = read_state_file(path)  # validated: a damaged file is a clear ValueError
    qc_dict = saved.get("quantization_config")
    if not isinstance(qc_dict, dict):
        raise ValueError(
            f"{os.path.join(path, STATE_FILE)} lacks 'quantization_config': the adapter folder is damaged or was not "
            "written by RoSTESFTTrainer."
        )
    if base.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(base)):
        raise ValueError(
            f"{path!r} holds LoRA adapters for the base model {base!r}, which does not exist here. Put the "
            f"base model there, or set base_model_name_or_path in {os.path.join(path, ADAPTER_CONFIG)} to where it is."
        )
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    rc = saved["rotation_config"]
    if is_roste_checkpoint(base):
        model = _load_base(base, path, **kwargs)
        if get_state(model).packed:
            raise ValueError(
                f"{path!r}: the base model {base!r} is a packed RoSTE checkpoint, whose rotations cannot be "
                "set to the ones the adapters were trained with; point base_model_name_or_path at its master checkpoint."
            )
    else:
        fields = {k: v for k, v in qc_dict.items() if k not in ("rotation_config", "checkpoint_format")}
        qc = RoSTEConfig.from_dict({**fields, "rotation_config": {"R1": rc["R1"], "layers": rc["layers"]}})
        model = _load_base(base, path, quantization_config=qc, **kwargs)
    # load_roste_adapter checks the base's settings against roste_state.json and applies its rotations
    return load_roste_adapter(model, path)


def _load_base(base: str, adapter_path: str, **kwargs: Any):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"{adapter_path!r}: cannot load its base model {base!r} ({first}). Pass a folder written by save_pretrained "
            "or a Hub id that is reachable (or already in the cache when HF_HUB_OFFLINE=1)."
        ) from exc
