"""`RoSTEHfQuantizer`: the transformers hooks of `quant_method="roste"`, and nothing else.

- Full-precision checkpoint + `RoSTEConfig`: weights load as usual, then norms are folded, R1 and
  the configured R2/R4 are fused, block linears become `QATLinear` and attention goes through
  the RoSTE wrapper (R3, K/V fake quantization).
- Saved RoSTE master checkpoint (`checkpoint_format="master"`): the skeleton is reshaped before
  loading (untied head, RMSNorms, `QATLinear`) so every key matches; weights already hold the
  saved rotation configuration.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging

from .arch import get_adapter
from .config import RoSTEConfig
from .rotation.apply import get_state, prepare_model, prepare_skeleton_for_checkpoint

logger = logging.get_logger(__name__)


class RoSTEHfQuantizer(HfQuantizer):
    """transformers quantizer for RoSTE QAT models (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: RoSTEConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, RoSTEConfig):
            raise TypeError(f"RoSTEHfQuantizer needs a RoSTEConfig, got {type(quantization_config).__name__}.")
        super().__init__(quantization_config, **kwargs)
        fmt = quantization_config.checkpoint_format
        if self.pre_quantized and fmt is None:
            raise ValueError(
                "This checkpoint's quantization_config says quant_method='roste' but has no checkpoint_format; "
                "it was not written by hf_roste's save_pretrained. Re-save it with hf_roste."
            )
        if not self.pre_quantized and fmt is not None:
            raise ValueError(
                f"RoSTEConfig.checkpoint_format={fmt!r} is set by hf_roste when it saves a model; leave it None when "
                "passing a RoSTEConfig to load a full-precision checkpoint."
            )
        # Decided once, here: never from a field that saving changes later.
        self.load_format = fmt if self.pre_quantized else "full_precision"

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.load_format == "packed":
            raise ValueError(
                "This is a packed RoSTE checkpoint (checkpoint_format='packed'); this version of hf_roste only "
                "loads master checkpoints. Upgrade hf_roste."
            )

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        get_adapter(model)  # unsupported families fail here, before any weight is read
        if self.load_format == "master":
            prepare_skeleton_for_checkpoint(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        prepare_model(model, self.quantization_config, weights_are_rotated=self.load_format == "master")
        return model

    def get_state_dict_and_metadata(self, model):
        """Record what the saved weights hold: explicit rotation flags and the master format."""
        state = get_state(model)
        rc = dict(state.applied)
        rc["layers"] = [dict(f) for f in rc["layers"]]
        if state.config.rotation_config and "errors" in state.config.rotation_config:
            rc["errors"] = state.config.rotation_config["errors"]
        if not state.searched:
            rc["strategy"] = "default"
        self.quantization_config.rotation_config = rc
        self.quantization_config.checkpoint_format = "master"
        return None, {"format": "pt", "roste_checkpoint_format": "master"}

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True
