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
from .convert import (
    check_model_fits_config,
    finish_packed_model,
    prepare_model,
    prepare_skeleton_for_checkpoint,
)
from .export.checkpoint import check_packed_values, checkpoint_metadata, packed_state_dict, verify_checkpoint
from .io import install_atomic_save
from .state import get_state

logger = logging.get_logger(__name__)


class RoSTEHfQuantizer(HfQuantizer):
    """transformers quantizer for RoSTE QAT models (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: RoSTEConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, RoSTEConfig):
            raise TypeError(f"RoSTEHfQuantizer needs a RoSTEConfig, got {type(quantization_config).__name__}.")
        try:  # the fields are checked in RoSTEConfig.__init__; a field set afterwards (or via .update()) is not
            RoSTEConfig.from_dict(quantization_config.to_dict())
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(
                f"Invalid RoSTEConfig (was a field changed after it was built?): {exc} Build a new RoSTEConfig(...) "
                "with the values you want instead of assigning to its attributes."
            ) from exc
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

    def update_attn_implementation(self, config):
        """Lift the load guard of RoSTE checkpoints (see :mod:`hf_roste.export.load_guard`) before files resolve."""
        from .export.load_guard import remove_load_guard

        return remove_load_guard(super().update_attn_implementation(config))

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        # unsupported families, rotation sizes without a Hadamard construction and group sizes that do not
        # divide a layer fail here, before any weight is read
        check_model_fits_config(model, self.quantization_config, get_adapter(model))
        if self.load_format in ("master", "packed"):
            prepare_skeleton_for_checkpoint(model, self.quantization_config, self.load_format)
            verify_checkpoint(model, checkpoint_files, self.load_format, self)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if self.load_format == "packed":
            check_packed_values(model)
            finish_packed_model(model, self.quantization_config)
        else:
            prepare_model(model, self.quantization_config, weights_are_rotated=self.load_format == "master")
        from .export.hub import install_push_to_hub
        from .hub_kernels import install_kernelize_guard

        install_kernelize_guard(model)  # hub kernels (use_kernels) must not replace modules holding RoSTE code
        install_push_to_hub(model)  # push_to_hub uploads the packed model with the RoSTE card (one commit)
        from .export.load_guard import write_load_guard

        install_atomic_save(model, after_save=write_load_guard)  # save_pretrained: temporary sibling folder, then an atomic swap
        return model

    def get_state_dict_and_metadata(self, model):
        """Packed (default) or master state dict, with per-tensor digests; records the format and rotations."""
        state = get_state(model)
        rc = dict(state.applied)
        rc["layers"] = [dict(f) for f in rc["layers"]]
        recorded = state.config.rotation_config or {}
        for key in ("errors", "criterion", "strategy"):
            if key in recorded:
                rc[key] = recorded[key]
        if not state.searched:
            rc["strategy"] = "default"
        self.quantization_config.rotation_config = rc
        if state.packed:
            fmt, sd = "packed", model.state_dict()
        elif state.save_format == "packed" and self.quantization_config.weight_bits < 16:
            fmt, sd = "packed", packed_state_dict(model)
        else:
            fmt, sd = "master", model.state_dict()
        self.quantization_config.checkpoint_format = fmt
        return sd, checkpoint_metadata(model, sd, fmt, self.quantization_config)

    def _dequantize(self, model, dtype=None):
        """An ordinary transformers model (see `hf_roste.export.dequantize`)."""
        from .export.dequantize import dequantize_model

        return dequantize_model(model, dtype)

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
        """QAT models compile without graph breaks (tests/test_compile.py); packed models compile too, with graph
        breaks in the packed linear's CPU kernels selection."""
        return True
