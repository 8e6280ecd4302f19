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

__all__ = [
    "base_hadamard_matrix",
    "hadamard_base_source",
    "hadamard_factorization",
    "hadamard_matrix",
    "hadamard_transform",
    "is_hadamard_size",
    "paley_hadamard_matrix",
    "random_signs",
]
