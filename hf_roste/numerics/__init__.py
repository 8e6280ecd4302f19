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
    Fp8Spec                                     # fp8 e4m3 with a static scale (vLLM's fp8 KV cache), via fake_quantize
    block_hadamard (module)                     # the online R4 as a block-diagonal Hadamard
    FP4Spec, quantize_fp4, dequantize_fp4       # NVFP4 / MXFP4 block formats (numerics.fp4); fake_quantize
                                                # and quantization_error accept an FP4Spec too
"""

from .fp4 import FP4_FORMATS, NUMBER_FORMATS, FP4Spec, dequantize_fp4, quantize_fp4
from .fp8 import FP8_E4M3_MAX, Fp8Spec
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
    "FP4_FORMATS",
    "FP4Spec",
    "FP8_E4M3_MAX",
    "Fp8Spec",
    "NUMBER_FORMATS",
    "dequantize_fp4",
    "quantize_fp4",
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
