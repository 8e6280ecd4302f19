"""FP4 (e2m1) block quantizers: NVFP4 and MXFP4, the 4-bit float formats engines serve for W4A4.

Both store each value as an e2m1 code (1 sign bit, 2 exponent bits, 1 mantissa bit; magnitudes
``0, 0.5, 1, 1.5, 2, 3, 4, 6``) times a scale shared by a block of consecutive values along the
last dim. They differ in the block size and in how the block scale is encoded:

``"nvfp4"``  blocks of 16; block scale stored as float8 e4m3 (``torch.float8_e4m3fn``) and divided
             by one fp32 *global scale* per tensor (weights) or per row (activations, see
             :attr:`FP4Spec.global_scale`).
``"mxfp4"``  blocks of 32; block scale a power of two stored as an e8m0 biased exponent (uint8,
             ``2^(e - 127)``), no global scale.

Exact rule (fp32 throughout, whatever the input dtype; ``amax_b`` = max |x| over a block,
``amax_g`` = max |x| over the global-scale domain; ``round_e2m1`` = round to the nearest e2m1
magnitude, ties to the even mantissa, i.e. 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4,
5->4)::

    nvfp4:  g     = 2688 / max(amax_g, FLT_MIN)          # 2688 = 448 * 6; g = 1 if not finite
            s8    = e4m3(clamp(g * (amax_b / 6), -448, 448))   # round-to-nearest-even cast
            s8    = 0.125 if s8 == 0                      # all-zero (or vanishing) block
            s     = s8 / g
    mxfp4:  p     = amax_b rounded to a power of two (mantissa >= 1.75 rounds up: fp32 bits
                    + 2^21, then the mantissa is cleared)
            e     = clamp(floor(log2 p) - 2 + 127, 0, 254)    # e8m0 code; 255 (NaN) if amax_b is not finite
            s     = 2^(e - 127)
    both:   q     = sign(x) * round_e2m1(min(|x| / s, 6))     # saturating
            x_hat = q * s

This is compressed-tensors' NVFP4 (``tensor_group`` strategy, fp8 scales, the same
``generate_gparam`` / ``calculate_qparams`` operations in the same order) and its MXFP4 (whose
scale rule is torchao's ``ScaleCalculationMode.EVEN``): the tests compare codes, scales and values
bit for bit against the installed compressed-tensors. Consequences:

* a block whose scale would be an fp8 subnormal keeps it (e4m3 subnormals go down to 2^-9); a block
  far smaller than the largest one (ratio below about 2^-9 / 448) gets scale 0 -> 0.125, and its
  values all round to 0 (exactly what the serving kernels compute from the same stored scales);
* MXFP4 block maxima above ``1.75 * 2^127`` (within 15% of the fp32 maximum) get the e8m0 code 253
  where compressed-tensors' power-of-two rounding overflows to an infinite scale (the only input
  range where the two differ); there the top grid point itself overflows fp32, as in any format;
* all-zero blocks and tensors give exact zeros; a NaN / Inf in a block makes that block's output NaN
  (its codes are 0 and, for MXFP4, its scale code is 255).

:func:`fake_quantize` has the integer quantizer's straight-through backward: the gradient w.r.t.
``x`` is ``grad_output`` unchanged (also for the few values above the block's top grid point,
which dynamic absmax scales only produce through the rounding of the scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "FP4_BLOCK_SIZES",
    "FP4_FORMATS",
    "FP4Spec",
    "NUMBER_FORMATS",
    "FP4Quantized",
    "dequantize_fp4",
    "e2m1_codes",
    "e2m1_from_codes",
    "fake_quantize_fp4",
    "pack_fp4",
    "quantize_fp4",
    "round_to_e2m1",
    "unpack_fp4",
]

FP4_FORMATS: tuple[str, ...] = ("nvfp4", "mxfp4")
"""Accepted FP4 format names."""

NUMBER_FORMATS: tuple[str, ...] = ("int", *FP4_FORMATS)
"""Number formats of linear weights and inputs (`RoSTEConfig.weight_format` / `activation_format`):
uniform integers (the paper's quantizer, :class:`~hf_roste.numerics.spec.QuantSpec`) or an FP4 block format."""

FP4_BLOCK_SIZES: dict[str, int] = {"nvfp4": 16, "mxfp4": 32}
"""Values sharing one block scale, per format (fixed by the formats)."""

E2M1_MAX = 6.0
"""Largest e2m1 magnitude."""

E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""e2m1 magnitudes indexed by the 3 low bits of a code (bit 3 is the sign)."""

FP8_E4M3_MAX = 448.0
_NV_GLOBAL_NUMERATOR = FP8_E4M3_MAX * E2M1_MAX  # 2688
_NV_ZERO_SCALE = 0.125  # what compressed-tensors puts in place of a zero fp8 scale
_FLT_MIN = torch.finfo(torch.float32).tiny
_ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_GLOBAL_SCALE_DOMAINS = ("tensor", "row")


@dataclass(frozen=True)
class FP4Spec:
    """Immutable description of an FP4 block quantizer (see the module docstring for the rule).

    Args:
        format: ``"nvfp4"`` or ``"mxfp4"``.
        global_scale: NVFP4 only: the domain of the fp32 global scale, ``"tensor"`` (one per tensor,
            what NVFP4 weights use) or ``"row"`` (one per last-dim row, i.e. per token for
            activations, so a token's quantization does not depend on the rest of the batch).
            Must be ``"tensor"`` for MXFP4, which has no global scale.

    Attributes shared with :class:`~hf_roste.numerics.spec.QuantSpec` so generic code (monitors,
    reprs) can read either: ``bits`` (4), ``enabled`` (True), ``symmetric`` (True),
    ``granularity`` (``"group"``), ``group_size`` (the block size).

    Raises:
        TypeError / ValueError: a field with a wrong type or value.
    """

    format: str
    global_scale: str = "tensor"

    def __post_init__(self) -> None:
        if not isinstance(self.format, str) or self.format not in FP4_FORMATS:
            raise ValueError(f"FP4Spec.format must be one of {FP4_FORMATS}, got {self.format!r}")
        if not isinstance(self.global_scale, str) or self.global_scale not in _GLOBAL_SCALE_DOMAINS:
            raise ValueError(f"FP4Spec.global_scale must be one of {_GLOBAL_SCALE_DOMAINS}, got {self.global_scale!r}")
        if self.format == "mxfp4" and self.global_scale != "tensor":
            raise ValueError("FP4Spec.global_scale applies to nvfp4 only (mxfp4 has no global scale); leave it 'tensor'.")

    bits = 4
    enabled = True
    symmetric = True
    granularity = "group"
    clip_ratio = 1.0

    @property
    def block_size(self) -> int:
        """16 (NVFP4) or 32 (MXFP4)."""
        return FP4_BLOCK_SIZES[self.format]

    @property
    def group_size(self) -> int:
        """Alias of :attr:`block_size` (the name generic group-quantization code reads)."""
        return self.block_size

    @property
    def has_global_scale(self) -> bool:
        """True for NVFP4."""
        return self.format == "nvfp4"

    @property
    def scale_dtype(self) -> torch.dtype:
        """Storage dtype of the block scales: float8_e4m3fn (NVFP4) or uint8 e8m0 codes (MXFP4)."""
        return torch.float8_e4m3fn if self.format == "nvfp4" else torch.uint8

    def num_groups(self, last_dim: int) -> int:
        """Number of blocks along a last dim of size ``last_dim``.

        Raises:
            ValueError: the block size does not divide ``last_dim``.
        """
        if last_dim % self.block_size != 0:
            raise ValueError(
                f"{self.format} quantizes blocks of {self.block_size} values along the last dim, which must be a "
                f"multiple of {self.block_size}; got last dim {last_dim}. Exclude that module "
                "(RoSTEConfig.modules_to_not_convert) or use the int format for it."
            )
        return last_dim // self.block_size


@dataclass(frozen=True)
class FP4Quantized:
    """Encoded form of a tensor ``[..., n]``: what a packed checkpoint stores.

    Attributes:
        codes: uint8 ``[..., n]`` e2m1 codes (bit 3 sign, bits 0-2 magnitude index), one per byte.
        block_scale: ``[..., n / block]`` float8_e4m3fn (NVFP4) or uint8 e8m0 codes (MXFP4).
        global_scale: fp32 NVFP4 global scale (``[1]`` per tensor, ``[..., 1]`` per row) or None.
    """

    codes: Tensor
    block_scale: Tensor
    global_scale: Tensor | None


# --------------------------------------------------------------------------- e2m1 grid
def round_to_e2m1(x: Tensor) -> Tensor:
    """Nearest e2m1 value of fp32 ``x`` (ties to even mantissa), saturating at +-6.

    A negative value that rounds to zero gives -0.0 (code 8); an input zero gives +0.0 (code 0), as
    compressed-tensors' ``cast_to_fp4`` does.

    The grid has step 0.5 below 2, 1 in [2, 4) and 2 in [4, 6], so ``torch.round`` (half to even)
    on the value divided by the step gives the even-mantissa tie rule; every operation is exact.
    """
    a = x.abs().clamp_(max=E2M1_MAX)
    fine = torch.round(a * 2.0).mul_(0.5)
    mid = torch.round(a)
    coarse = torch.round(a * 0.5).mul_(2.0)
    q = torch.where(a < 2.0, fine, torch.where(a < 4.0, mid, coarse))
    return q.mul_(torch.sign(x))  # -0.0 for negatives rounding to 0; +0.0 for a zero input of either sign


def e2m1_codes(q: Tensor) -> Tensor:
    """uint8 codes of values already on the e2m1 grid (output of :func:`round_to_e2m1`); NaN -> 0."""
    a = q.abs()
    # magnitude index: 0, .5, 1, 1.5 -> 0..3 (2a); 2, 3 -> 4, 5 (a + 2); 4, 6 -> 6, 7 (a/2 + 4)
    idx = torch.where(a < 2.0, a * 2.0, torch.where(a < 4.0, a + 2.0, a * 0.5 + 4.0))
    idx = torch.nan_to_num(idx, nan=0.0).to(torch.uint8)
    sign = torch.signbit(q).to(torch.uint8) << 3
    return torch.where(torch.isnan(q), torch.zeros_like(idx), idx | sign)


_E2M1_TABLE = torch.tensor([*E2M1_VALUES, *(-v for v in E2M1_VALUES)], dtype=torch.float32)


def e2m1_from_codes(codes: Tensor) -> Tensor:
    """fp32 values of uint8 e2m1 codes (only the low 4 bits are read)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"e2m1 codes must be uint8, got {codes.dtype}")
    return _E2M1_TABLE.to(codes.device)[(codes & 0x0F).long()]


# --------------------------------------------------------------------------- scales
def _check_input(x: object, spec: object) -> tuple[Tensor, FP4Spec]:
    if not isinstance(spec, FP4Spec):
        raise TypeError(f"spec must be an FP4Spec, got {type(spec).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _ACCEPTED_DTYPES:
        raise TypeError(f"x must have dtype in {_ACCEPTED_DTYPES}, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (FP4 blocks run along the last dim), got 0-dim")
    spec.num_groups(x.shape[-1])
    return x, spec


def _blocks(x: Tensor, spec: FP4Spec) -> Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // spec.block_size, spec.block_size)


def nvfp4_global_scale(amax: Tensor) -> Tensor:
    """NVFP4 global scale ``2688 / max(amax, FLT_MIN)`` in fp32 (1 where that is not finite)."""
    g = _NV_GLOBAL_NUMERATOR / amax.float().clamp(min=_FLT_MIN)
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


def _global_scale(xb: Tensor, spec: FP4Spec) -> Tensor:
    """fp32 global scale broadcastable against the blocked view ``[..., G, B]`` (as ``[..., 1, 1]``)."""
    if spec.global_scale == "tensor":
        amax = xb.abs().amax() if xb.numel() else xb.new_zeros(())
        return nvfp4_global_scale(amax).reshape((1,) * xb.dim())
    amax = xb.abs().amax(dim=(-2, -1), keepdim=True)
    return nvfp4_global_scale(amax)


def _mx_exponent(amax_b: Tensor) -> Tensor:
    """e8m0 codes (int32) from fp32 block maxima (see the module docstring)."""
    bits = amax_b.float().contiguous().view(torch.int32)
    rounded = (bits + (1 << 21)) & 0x7F800000  # round the mantissa (>= 1.75 goes up), keep the exponent
    biased = rounded >> 23  # fp32 biased exponent of the rounded power of two (0 for 0 / subnormal)
    e = (biased - 2).clamp(0, 254)  # floor(log2 p) - 2 + 127
    return torch.where(torch.isfinite(amax_b), e, torch.full_like(e, 255))


def _block_scales(xb: Tensor, spec: FP4Spec) -> tuple[Tensor, Tensor, Tensor | None]:
    """(encoded block scale ``[..., G]``, fp32 effective scale ``[..., G, 1]``, global scale or None)."""
    amax_b = xb.abs().amax(dim=-1)
    if spec.format == "mxfp4":
        e = _mx_exponent(amax_b)
        eff = torch.exp2((e - 127).float())
        eff = torch.where(e == 255, float("nan"), eff)
        return e.to(torch.uint8), eff.unsqueeze(-1), None
    g = _global_scale(xb, spec)  # [..., 1, 1]
    g_b = g.squeeze(-1)
    s = g_b * (amax_b / E2M1_MAX)
    s8 = s.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    s8f = s8.float()
    zero = s8f == 0
    if bool(zero.any()):
        s8f = torch.where(zero, _NV_ZERO_SCALE, s8f)
        s8 = s8f.to(torch.float8_e4m3fn)
    eff = (s8f / g_b).unsqueeze(-1)
    glob = g.reshape(1) if spec.global_scale == "tensor" else g.reshape(*xb.shape[:-2], 1)
    return s8, eff, glob


def _quantize_blocks(x: Tensor, spec: FP4Spec) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """THE FP4 quantizer: (grid values q ``[..., G, B]``, effective scale, block scale, global)."""
    xb = _blocks(x.float(), spec)
    enc, eff, glob = _block_scales(xb, spec)
    q = round_to_e2m1(xb / eff)
    return q, eff, enc, glob


def _fake_quant_fp32(x: Tensor, spec: FP4Spec) -> Tensor:
    """fp32 quantize-dequantize with the shape of ``x`` (no autograd, no cast back)."""
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)
    q, eff, _, _ = _quantize_blocks(x, spec)
    return (q * eff).reshape(x.shape)


class _FakeQuantFP4STE(torch.autograd.Function):
    """Quantize-dequantize forward, identity backward; saves nothing."""

    @staticmethod
    def forward(ctx, x: Tensor, spec: FP4Spec) -> Tensor:  # type: ignore[override]
        out = _fake_quant_fp32(x, spec)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad_output, None


# --------------------------------------------------------------------------- public API
def fake_quantize_fp4(x: Tensor, spec: FP4Spec) -> Tensor:
    """FP4 quantize-dequantize of ``x`` (cast back to ``x.dtype``) with a straight-through backward.

    Raises:
        TypeError: ``x`` not a float tensor / ``spec`` not an FP4Spec.
        ValueError: 0-dim ``x`` or a last dim that is not a multiple of the block size.
    """
    x, spec = _check_input(x, spec)
    if x.requires_grad and torch.is_grad_enabled():
        return _FakeQuantFP4STE.apply(x, spec)
    out = _fake_quant_fp32(x, spec)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def quantize_fp4(x: Tensor, spec: FP4Spec) -> FP4Quantized:
    """Encoded form of ``x`` (:class:`FP4Quantized`); :func:`dequantize_fp4` of it equals
    ``fake_quantize_fp4(x.float(), spec)`` bit for bit.

    Raises:
        TypeError / ValueError: as :func:`fake_quantize_fp4`.
    """
    x, spec = _check_input(x, spec)
    with torch.no_grad():
        if x.numel() == 0:
            lead = x.shape[:-1]
            glob = None
            if spec.has_global_scale:
                glob = torch.ones((1,) if spec.global_scale == "tensor" else (*lead, 1), device=x.device)
            return FP4Quantized(torch.empty(x.shape, dtype=torch.uint8, device=x.device),
                                torch.ones((*lead, spec.num_groups(x.shape[-1])), device=x.device).to(spec.scale_dtype),
                                glob)
        q, _, enc, glob = _quantize_blocks(x, spec)
        return FP4Quantized(e2m1_codes(q).reshape(x.shape), enc, glob)


def block_scale_fp32(block_scale: Tensor, global_scale: Tensor | None, spec: FP4Spec) -> Tensor:
    """fp32 effective scale ``[..., G]`` of encoded block scales (NVFP4: ``s8 / global``; MXFP4: ``2^(e-127)``)."""
    if spec.format == "mxfp4":
        if block_scale.dtype != torch.uint8:
            raise TypeError(f"mxfp4 block scales are uint8 e8m0 codes, got {block_scale.dtype}")
        e = block_scale.to(torch.int32)
        return torch.where(e == 255, float("nan"), torch.exp2((e - 127).float()))
    if block_scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"nvfp4 block scales are float8_e4m3fn, got {block_scale.dtype}")
    if global_scale is None or global_scale.dtype != torch.float32:
        raise TypeError("nvfp4 needs its fp32 global scale (got "
                        f"{None if global_scale is None else global_scale.dtype})")
    return block_scale.float() / global_scale


def dequantize_fp4(
    codes: Tensor, block_scale: Tensor, global_scale: Tensor | None, spec: FP4Spec, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Values of an encoded tensor: ``e2m1(codes) * scale`` in fp32, then cast to ``dtype``.

    Args:
        codes: uint8 ``[..., n]`` (one code per byte; see :func:`unpack_fp4`).
        block_scale: ``[..., n / block]`` float8_e4m3fn (NVFP4) or uint8 (MXFP4).
        global_scale: NVFP4: fp32 ``[1]`` or ``[..., 1]``; MXFP4: None.
        spec: the :class:`FP4Spec` used to quantize.
        dtype: floating output dtype.

    Raises:
        TypeError / ValueError: wrong dtypes or shapes (the message names the argument).
    """
    if not isinstance(spec, FP4Spec):
        raise TypeError(f"spec must be an FP4Spec, got {type(spec).__name__}")
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.dim() == 0:
        raise TypeError(f"codes must be a uint8 tensor with at least 1 dim, got {getattr(codes, 'dtype', codes)!r}")
    expected = (*codes.shape[:-1], spec.num_groups(codes.shape[-1]))
    if tuple(block_scale.shape) != expected:
        raise ValueError(f"block_scale must have shape {expected} for codes {tuple(codes.shape)}, "
                         f"got {tuple(block_scale.shape)}")
    if spec.format == "mxfp4" and global_scale is not None:
        raise ValueError("mxfp4 has no global scale; pass global_scale=None.")
    scale = block_scale_fp32(block_scale, global_scale, spec)
    vals = _blocks(e2m1_from_codes(codes), spec) * scale.unsqueeze(-1)
    out = vals.reshape(codes.shape)
    return out if dtype == torch.float32 else out.to(dtype)


def pack_fp4(codes: Tensor) -> Tensor:
    """Two uint8 e2m1 codes per byte along the last dim (even index in the low nibble), as
    compressed-tensors' ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` store them."""
    if codes.dtype != torch.uint8 or codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs uint8 codes with an even last dim, got {codes.dtype} {tuple(codes.shape)}")
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] & 0x0F) | ((pairs[..., 1] & 0x0F) << 4)


def unpack_fp4(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_fp4`: uint8 ``[..., n / 2]`` -> uint8 codes ``[..., n]``."""
    if packed.dtype != torch.uint8 or packed.dim() == 0 or packed.shape[-1] * 2 != n:
        raise ValueError(f"unpack_fp4 needs uint8 bytes [..., {n // 2}], got {packed.dtype} {tuple(packed.shape)}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], n)
