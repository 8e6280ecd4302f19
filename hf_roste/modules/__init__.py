"""Deploy-time modules of hf_roste.

:mod:`hf_roste.modules.packed_linear` holds :class:`PackedLinear`, a linear layer whose weight is
stored as packed low-bit integer codes and which computes with the integer kernel of
:mod:`hf_roste.numerics.int_matmul` (per-token activation quantization at run time).
"""
