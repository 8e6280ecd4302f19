"""Numerics of RoSTE: the single quantizer definition and code packing.

Public API::

    QuantSpec                                   # quantizer description (bits, symmetric, clip, granularity)
    compute_qparams, quantize, dequantize       # integer form
    fake_quantize                               # quantize-dequantize with STE backward (training)
    quantization_error                          # ||Q(x) - x||^2 (rotation search)
    pack_codes, unpack_codes, packed_length     # bit packing along the last dim
    to_unsigned, from_unsigned, unsigned_offset # signed <-> unsigned storage codes
    quantize_fp32, rowwise_qparams, codes_from_qparams   # the same rule on fp32 codes (storage codecs, kernels)
    hadamard (module)                           # Walsh-Hadamard rotations (factors from compressed-tensors)
"""

from .packing import from_unsigned, pack_codes, packed_length, to_unsigned, unpack_codes, unsigned_offset
from .quantize import (
    codes_from_qparams,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantization_error,
    quantize,
    quantize_fp32,
    rowwise_qparams,
)
from .spec import GRANULARITIES, SUPPORTED_BITS, QuantSpec

__all__ = [
    "GRANULARITIES",
    "SUPPORTED_BITS",
    "QuantSpec",
    "codes_from_qparams",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "from_unsigned",
    "pack_codes",
    "packed_length",
    "quantization_error",
    "quantize",
    "quantize_fp32",
    "rowwise_qparams",
    "to_unsigned",
    "unpack_codes",
    "unsigned_offset",
]
