"""Rotations of RoSTE at the model level: fusing R1..R4 into weights and switching them
(`fusion`), the per-layer rotation search (`search`, `search_stats`, `search_result`), calibration
batches for it (`calibration`) and rotating optimizer state after a switch (`optim_state`).

The Hadamard transform itself is numerics: :mod:`hf_roste.numerics.hadamard`.
"""

from .calibration import sample_calibration_batches
from .fusion import set_rotation_config
from .optim_state import rotate_optimizer_state
from .search import RotationSearchResult, search_rotation_config

__all__ = [
    "RotationSearchResult",
    "rotate_optimizer_state",
    "sample_calibration_batches",
    "search_rotation_config",
    "set_rotation_config",
]
