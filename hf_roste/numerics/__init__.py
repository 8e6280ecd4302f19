"""Numerics of RoSTE: the single quantizer definition and code packing.

Public API::

    QuantSpec                                   # quantizer description (bits, symmetric, clip, granularity)
    compute_qparams, quantize, dequantize       # integer form
    fake_quantize                               # quantize-dequantize with STE backward (training)
    quantization_error                          # ||Q(x) - x||^2 (rotation search)
    pack_codes, unpack_codes, packed_length     # bit packing along the last dim
    to_unsigned, from_unsigned                  # signed <-> unsigned storage codes
    Fp8Spec, fp8_fake_quantize                  # fp8 e4m3 with a static scale (vLLM's fp8 KV cache)
"""

from .fp8 import FP8_E4M3_MAX, Fp8Spec, fp8_fake_quantize
from .packing import from_unsigned, pack_codes, packed_length, to_unsigned, unpack_codes
from .quantize import compute_qparams, dequantize, fake_quantize, quantization_error, quantize
from .spec import GRANULARITIES, SUPPORTED_BITS, QuantSpec

__all__ = [
    "FP8_E4M3_MAX",
    "Fp8Spec",
    "fp8_fake_quantize",
    "GRANULARITIES",
    "SUPPORTED_BITS",
    "QuantSpec",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "from_unsigned",
    "pack_codes",
    "packed_length",
    "quantization_error",
    "quantize",
    "to_unsigned",
    "unpack_codes",
]
