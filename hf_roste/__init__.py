"""hf_roste: RoSTE quantization-aware fine-tuning (W4A4KV4) for Hugging Face transformers and TRL.

Importing the package registers `quant_method="roste"` with transformers (safe to import twice).
"""

from __future__ import annotations

from ._version import __version__
from .config import FORMAT_VERSION, RoSTEConfig
from .export.compressed_tensors import export_compressed_tensors
from .export.hub import push_roste_model
from .modules.kv_cache import RoSTEQuantizedCache, cache_bytes_per_token
from .modules.kv_static_cache import RoSTEQuantizedStaticCache
from .quantizer import RoSTEHfQuantizer
from .rotation.calibration import sample_calibration_batches
from .rotation.fusion import set_rotation_config
from .rotation.optim_state import rotate_optimizer_state
from .rotation.search import RotationSearchResult, search_rotation_config
from .state import get_state, save_format, set_quantization_enabled


def _register() -> None:
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get("roste") is not RoSTEConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop("roste", None)
        register_quantization_config("roste")(RoSTEConfig)
    if AUTO_QUANTIZER_MAPPING.get("roste") is not RoSTEHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop("roste", None)
        register_quantizer("roste")(RoSTEHfQuantizer)


_register()

_LAZY = {
    "RoSTESFTConfig": "hf_roste.training",
    "RoSTESFTTrainer": "hf_roste.training",
    "load_roste_adapter": "hf_roste.training",
}


def __getattr__(name: str):
    # the trainer pulls in TRL; import it only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_roste' has no attribute {name!r}")

__all__ = [
    "RoSTEQuantizedCache",
    "RoSTEQuantizedStaticCache",
    "cache_bytes_per_token",
    "RoSTESFTConfig",
    "RoSTESFTTrainer",
    "load_roste_adapter",
    "FORMAT_VERSION",
    "RoSTEConfig",
    "RoSTEHfQuantizer",
    "RotationSearchResult",
    "export_compressed_tensors",
    "get_state",
    "push_roste_model",
    "save_format",
    "rotate_optimizer_state",
    "sample_calibration_batches",
    "search_rotation_config",
    "set_quantization_enabled",
    "set_rotation_config",
    "__version__",
]
