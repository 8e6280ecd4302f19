"""Rotations for RoSTE: random-sign Walsh-Hadamard matrices (SpinQuant R1..R4)."""

from hf_roste.rotation.hadamard import (
    base_hadamard_matrix,
    hadamard_factorization,
    hadamard_matrix,
    hadamard_transform,
    is_hadamard_size,
    random_signs,
)
from hf_roste.rotation.hadamard_factors import hadamard_base_source, paley_hadamard_matrix


def __getattr__(name: str):
    # the search imports the model-level modules, which import this package: load it lazily
    if name in ("search_rotation_config", "RotationSearchResult"):
        from hf_roste.rotation import search

        return getattr(search, name)
    if name == "sample_calibration_batches":
        from hf_roste.rotation.calibration import sample_calibration_batches

        return sample_calibration_batches
    if name == "rotate_optimizer_state":
        from hf_roste.rotation.optim_state import rotate_optimizer_state

        return rotate_optimizer_state
    raise AttributeError(f"module 'hf_roste.rotation' has no attribute {name!r}")


__all__ = [
    "RotationSearchResult",
    "base_hadamard_matrix",
    "hadamard_base_source",
    "hadamard_factorization",
    "hadamard_matrix",
    "hadamard_transform",
    "is_hadamard_size",
    "paley_hadamard_matrix",
    "random_signs",
    "rotate_optimizer_state",
    "sample_calibration_batches",
    "search_rotation_config",
]
