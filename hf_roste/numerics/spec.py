"""Quantization specification shared by training (fake-quant) and inference (packed int kernels).

A :class:`QuantSpec` is a small immutable value describing *how* a tensor is quantized:
bit width, symmetric or asymmetric grid, clip ratio and the granularity at which the
dynamic scale / zero point are computed.  The maths lives in :mod:`hf_roste.numerics.quantize`.

Granularities (all row-wise ones reduce over the LAST dim; the caller arranges the layout):

``"tensor"``      one scale / zero for the whole tensor.
``"channel"``     one per row of the last dim (weights ``[out, in]`` -> per output channel).
``"token"``       one per row of the last dim (activations ``[..., in]`` -> per token).
``"token_head"``  one per row of the last dim (K/V ``[batch, heads, seq, head_dim]``).
``"group"``       one per contiguous block of ``group_size`` elements of the last dim.

``scale_dtype="float16"`` rounds every computed scale to the nearest fp16 value (at least the
smallest fp16 subnormal) BEFORE the codes are computed, so a format that stores fp16 scales (GGUF
``Q4_0`` / ``Q8_0``) holds exactly the trained quantizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8, 16)
"""Accepted bit widths; 16 means "not quantized" (identity)."""

GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group", "token", "token_head")
"""Accepted granularity names."""

SCALE_DTYPES: tuple[str, ...] = ("float32", "float16")
"""Accepted scale precisions (the stored scale of a format; codes are computed with it)."""

ROW_GRANULARITIES: frozenset[str] = frozenset({"channel", "token", "token_head"})
"""Granularities that use one scale per row of the last dim."""


@dataclass(frozen=True)
class QuantSpec:
    """Immutable description of a b-bit uniform quantizer.

    Args:
        bits: 2, 3, 4, 8, or 16 (16 = quantization disabled, identity).
        symmetric: symmetric grid (``z = 0``, signed codes, int8 storage) if True, else
            asymmetric (integer zero point, unsigned codes, uint8 storage).
        clip_ratio: ``c`` in ``(0, 1]``; the scale is computed from ``c * range``.
        granularity: one of ``"tensor"``, ``"channel"``, ``"group"``, ``"token"``, ``"token_head"``.
        group_size: number of last-dim elements sharing a scale; required iff
            ``granularity == "group"`` (divisibility of the last dim is checked at call time).
        scale_dtype: ``"float32"`` (default) or ``"float16"``: scales rounded to fp16 (see module doc).

    Raises:
        TypeError: a field has the wrong Python type.
        ValueError: a field has an unsupported value.
    """

    bits: int
    symmetric: bool = False
    clip_ratio: float = 1.0
    granularity: str = "token"
    group_size: int | None = None
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"QuantSpec.scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"QuantSpec.bits must be an int, got {type(self.bits).__name__} {self.bits!r}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"QuantSpec.bits must be one of {SUPPORTED_BITS} (16 = disabled), got {self.bits!r}"
            )
        if not isinstance(self.symmetric, bool):
            raise TypeError(
                f"QuantSpec.symmetric must be a bool, got {type(self.symmetric).__name__} {self.symmetric!r}"
            )
        if isinstance(self.clip_ratio, bool) or not isinstance(self.clip_ratio, (int, float)):
            raise TypeError(
                f"QuantSpec.clip_ratio must be a float in (0, 1], got "
                f"{type(self.clip_ratio).__name__} {self.clip_ratio!r}"
            )
        if not (math.isfinite(self.clip_ratio) and 0.0 < self.clip_ratio <= 1.0):
            raise ValueError(f"QuantSpec.clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        if not isinstance(self.granularity, str):
            raise TypeError(
                f"QuantSpec.granularity must be a str, got "
                f"{type(self.granularity).__name__} {self.granularity!r}"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.granularity == "group":
            if self.group_size is None:
                raise ValueError("QuantSpec.group_size is required when granularity='group', got None")
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise TypeError(
                    f"QuantSpec.group_size must be a positive int, got "
                    f"{type(self.group_size).__name__} {self.group_size!r}"
                )
            if self.group_size <= 0:
                raise ValueError(f"QuantSpec.group_size must be a positive int, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(
                f"QuantSpec.group_size must be None unless granularity='group' "
                f"(granularity={self.granularity!r}), got {self.group_size!r}"
            )

    @property
    def enabled(self) -> bool:
        """True when the spec actually quantizes (``bits < 16``)."""
        return self.bits < 16

    @property
    def qmin(self) -> int:
        """Smallest integer code: ``0`` (asymmetric) or ``-2^(b-1)`` (symmetric)."""
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer code: ``2^b - 1`` (asymmetric) or ``2^(b-1) - 1`` (symmetric)."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def row_wise(self) -> bool:
        """True for ``"channel"``, ``"token"`` and ``"token_head"`` (one scale per last-dim row)."""
        return self.granularity in ROW_GRANULARITIES

    def num_groups(self, last_dim: int) -> int:
        """Number of scales along the last dim for a tensor whose last dim is ``last_dim``.

        Raises:
            ValueError: granularity is ``"group"`` and ``group_size`` does not divide ``last_dim``.
        """
        if self.granularity == "group":
            assert self.group_size is not None
            if last_dim % self.group_size != 0:
                raise ValueError(
                    f"QuantSpec.group_size={self.group_size} must divide the last dim of the tensor, "
                    f"got last dim {last_dim}"
                )
            return last_dim // self.group_size
        return 1
