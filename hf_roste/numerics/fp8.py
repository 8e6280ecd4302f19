"""FP8 (e4m3) fake quantization with a static scale: the K/V cache numerics of vLLM's fp8 KV cache.

vLLM stores K and V as ``float8_e4m3fn`` values ``fp8(x / s)`` and reads them back as ``fp8 * s``,
with ``s`` a STATIC scale (per tensor, or per KV head with compressed-tensors' ``attn_head``
strategy; 1.0 when the checkpoint carries none). :class:`Fp8Spec` describes that quantizer and
:func:`fp8_fake_quantize_fp32` computes it; :func:`hf_roste.numerics.fake_quantize` (with its
straight-through backward) and :func:`hf_roste.numerics.quantization_error` dispatch here when given an
:class:`Fp8Spec`, so the
attention wrapper and the rotation search train and measure exactly what the engine stores.

Rule (fp32): ``y = float(fp8_e4m3fn(clamp(x / s, -448, 448))) * s`` with torch's round-to-nearest-even
conversion; values beyond the e4m3 range saturate at +-448 (the ``fn`` format has no infinities).
NaN stays NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .spec import QuantSpec

__all__ = ["FP8_E4M3_MAX", "Fp8Spec", "fp8_fake_quantize_fp32"]

FP8_E4M3_MAX = 448.0
"""Largest finite ``float8_e4m3fn`` magnitude."""


@dataclass(frozen=True)
class Fp8Spec(QuantSpec):
    """FP8 e4m3 quantizer with a static scale (a :class:`QuantSpec` so every K/V code path accepts it).

    Args:
        scale: the static scale ``s`` (positive, finite); the engine default 1.0 when no scale is stored.
        granularity: where one scale applies; ``"token_head"`` documents that the exported scale is
            written per KV head (compressed-tensors ``attn_head``), all heads holding ``scale``.

    ``bits`` is 8 and ``symmetric`` True by construction; there are no integer codes, so
    :func:`hf_roste.numerics.quantize` / ``dequantize`` refuse this spec.
    """

    bits: int = 8
    symmetric: bool = True
    clip_ratio: float = 1.0
    granularity: str = "token_head"
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits != 8 or not self.symmetric or self.clip_ratio != 1.0 or self.scale_dtype != "float32":
            raise ValueError(
                "Fp8Spec is the e4m3 format: bits=8, symmetric=True, clip_ratio=1.0, scale_dtype='float32'; got "
                f"bits={self.bits}, symmetric={self.symmetric}, clip_ratio={self.clip_ratio}, "
                f"scale_dtype={self.scale_dtype!r}."
            )
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not (
            math.isfinite(self.scale) and self.scale > 0
        ):
            raise ValueError(f"Fp8Spec.scale must be a positive finite float, got {self.scale!r}")


def fp8_fake_quantize_fp32(x: Tensor, spec: Fp8Spec) -> Tensor:
    """fp32 ``fp8(x / s) * s`` (no autograd, no cast back)."""
    y = x.float() / spec.scale
    y = y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    return y.mul_(spec.scale)
