"""Fused kernels (Triton) for the hot paths of training and packed inference.

Every kernel here has a reference in PyTorch elsewhere in :mod:`hf_roste.numerics` and must
compute the same codes, scales and zero points; the PyTorch code stays the CPU path. Whether a
kernel runs is decided by :func:`use_triton` in :mod:`._triton`.
"""

from ._triton import triton_available, triton_mode, use_triton

__all__ = ["triton_available", "triton_mode", "use_triton"]
