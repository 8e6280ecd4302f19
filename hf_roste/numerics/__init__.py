"""Numerics of RoSTE: the single quantizer definition and code packing.

Public API::

    QuantSpec                                   # quantizer description (bits, symmetric, clip, granularity)
    compute_qparams, quantize, dequantize       # integer form
    fake_quantize                               # quantize-dequantize with STE backward (training)
    quantization_error                          # ||Q(x) - x||^2 (rotation search)
    pack_codes, unpack_codes, packed_length     # bit packing along the last dim
    to_unsigned, from_unsigned                  # signed <-> unsigned storage codes
    FP4Spec, quantize_fp4, dequantize_fp4       # NVFP4 / MXFP4 block formats (numerics.fp4); fake_quantize
                                                # and quantization_error accept an FP4Spec too
"""

from .fp4 import FP4_FORMATS, FP4Spec, dequantize_fp4, quantize_fp4
from .packing import from_unsigned, pack_codes, packed_length, to_unsigned, unpack_codes
from .quantize import compute_qparams, dequantize, fake_quantize, quantization_error, quantize
from .spec import GRANULARITIES, SUPPORTED_BITS, QuantSpec

__all__ = [
    "FP4_FORMATS",
    "FP4Spec",
    "dequantize_fp4",
    "quantize_fp4",
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
