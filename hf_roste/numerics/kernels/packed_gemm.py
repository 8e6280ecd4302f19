"""Triton kernels of packed W4A(b) linears: per-token activation quantization, and an int8 GEMM
that reads 4-bit weights straight from their packed bytes with the rescale fused behind it.

Two launches per linear (one per shared input for q/k/v and gate/up; a down_proj with a recognised
online R4 replaces launch 1 by the fused rotate + quantize kernel of :mod:`.rotate_quant`, which uses the
same row rule and code helpers, :func:`_act_row_params` and :func:`_act_codes`):

1. :func:`quantize_activation_triton`: one program per token row computes the row's scale and zero
   point with the exact rule of :mod:`hf_roste.numerics.quantize` (fp32, same operations in the same
   order, IEEE division ``div_rn``, FMA contraction disabled, half-to-even rounding) and writes int8
   codes.  A row whose centred codes ``c - z`` fit int8 (``|z| + qmax <= 127``: every row whose range
   contains 0) is stored centred with effective zero 0; any other row keeps its codes (8-bit: shifted
   by -128) and its effective zero point, applied after the product (no host sync either way).
2. :func:`packed_linear_triton`: ``T = sum_k a[m, k] * (cw[n, k] - zw[n, g])`` accumulated in int32
   per weight group, the weight nibbles unpacked in registers (byte ``j`` holds codes ``2j`` (low
   nibble) and ``2j + 1``: the even and odd columns of the activation are two int8 products), then
   ``T -= zx[m] * colsum[g, n]`` (int64, rows that were not centred), ``acc += fp32(T) * s_w[n, g]``
   over groups in order, ``y = acc * s_x[m] (+ bias[n])``, cast to the output dtype on store.
   ``M <= 4`` (decode) uses a multiply-and-sum GEMV form instead of ``tl.dot``.

Exactness: codes, zero points and scales are bit-identical to :func:`~hf_roste.numerics.quantize`;
``T`` is the exact integer of :mod:`hf_roste.numerics.int_matmul`; the rescale performs that
module's fp32 operations (``fp32(T) * s_w``, summed over groups in order, ``* s_x``, ``+ bias``), so
the output is bit-identical to :func:`~hf_roste.numerics.int_matmul.int_linear` whenever every
``|T| < 2^24`` (then the reference's fp32 and fp64 assembly routes agree; with 4-bit codes this
holds for ``K * max|a| * 15 < 2^24``).  Bit-identity is what the tests check.

Supported: 4-bit weights (per channel, or per group of a multiple of 32), symmetric or asymmetric,
whose centred codes fit int8 (checked once by :func:`prepare_packed_weight`); activations 2..8 bits
per token.  Other layers keep the PyTorch integer path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..spec import QuantSpec

__all__ = [
    "PackedWeight",
    "TritonActivation",
    "packed_linear_triton",
    "packed_weight_supported",
    "prepare_packed_weight",
    "quantize_activation_triton",
]

_FLT_MIN = float(torch.finfo(torch.float32).tiny)
_MAX_ZERO = 127 - 15  # |zw| bound so that a centred 4-bit weight code fits int8
# (v + 1.5 * 2^23) - 1.5 * 2^23 rounds an fp32 v half to even (torch.round) for |v| <= 2^22; the
# quantizer's relative floor keeps |x / s| <= 2^20 + 1 and |zero| <= 2^20
_RNE: float = 12582912.0

try:  # triton is optional on CPU installs; nothing here is called unless use_triton() said yes
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None


# --------------------------------------------------------------------------- kernels
if triton is not None:

    # a Triton constexpr: a plain float global does not compile (only the interpreter accepts it)
    _RNE_C = tl.constexpr(_RNE)

    @triton.jit
    def _act_row_params(row_max, row_min, has_nan, k_scale, neg_c, qmax,
                        SYMMETRIC: tl.constexpr, BITS: tl.constexpr):
        """Scale, zero point, effective zero, code shift and finiteness of one row from its max / min
        (the rule of :func:`hf_roste.numerics.quantize`, see the module docstring)."""
        amax = tl.maximum(tl.abs(row_min), tl.abs(row_max))
        finite = (amax < float("inf")) & (~has_nan)
        floor = tl.maximum(amax * 9.5367431640625e-07, 1.1754943508222875e-38)  # 2^-20, FLT_MIN
        if SYMMETRIC:
            scale = tl.maximum(amax * k_scale, floor)
            scale = tl.where(amax == 0.0, 1.0, scale)
            zero = tl.where(finite, 0.0, 0.0)
        else:
            scale = tl.maximum(row_max * k_scale - row_min * k_scale, floor)
            zero = (tl.math.div_rn(row_min * neg_c, scale) + _RNE_C) - _RNE_C + 0.0  # round half to even
            constant = row_max == row_min
            const_scale = tl.where(row_min == 0.0, 1.0, tl.abs(row_min))
            const_zero = tl.where(row_min > 0.0, -1.0, tl.where(row_min < 0.0, 1.0, 0.0))
            scale = tl.where(constant, const_scale, scale)
            zero = tl.where(constant, const_zero, zero)
        scale = tl.where(finite, scale, float("nan"))
        zero = tl.where(finite, zero, 0.0)
        # centred storage when every centred code fits int8; else raw codes (8-bit: minus 128)
        if SYMMETRIC:
            zx_eff = tl.where(finite, 0.0, 0.0)  # tensors (not constexprs) for the stores
            sub = zx_eff
        else:
            centred = tl.abs(zero) + qmax <= 127.0
            shift = 128.0 if BITS == 8 else 0.0
            zx_eff = tl.where(centred, 0.0, zero - shift)
            sub = tl.where(centred, zero, shift)
        return scale, zero, zx_eff, sub, finite

    @triton.jit
    def _act_codes(v, scale, zero, sub, finite, qmin, qmax, SYMMETRIC: tl.constexpr):
        """Stored int8 codes of fp32 values ``v`` of a row with the parameters of :func:`_act_row_params`."""
        c = ((tl.math.div_rn(v, scale) + _RNE_C) - _RNE_C) + zero
        c = tl.minimum(tl.maximum(c, qmin), qmax)
        c = tl.where(finite, c, 0.0)  # non-finite rows: code 0 (as quantize)
        if not SYMMETRIC:
            c = c - sub
        return c.to(tl.int8)

    @triton.jit
    def _act_quant_kernel(
        x_ptr, a_ptr, sx_ptr, zx_ptr, K, stride_x,
        k_scale, neg_c, qmin, qmax,
        SYMMETRIC: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        x_row = x_ptr + row.to(tl.int64) * stride_x
        mx = tl.full([BLOCK], float("-inf"), tl.float32)
        mn = tl.full([BLOCK], float("inf"), tl.float32)
        bad = tl.full([BLOCK], 0, tl.int32)
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            v = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
            bad = bad | ((v != v) & m).to(tl.int32)  # NaN: torch's amax/amin propagate it
            mx = tl.where(m, tl.maximum(mx, v), mx)
            mn = tl.where(m, tl.minimum(mn, v), mn)
        scale, zero, zx_eff, sub, finite = _act_row_params(
            tl.max(mx, axis=0), tl.min(mn, axis=0), tl.max(bad, axis=0) > 0, k_scale, neg_c, qmax, SYMMETRIC, BITS)
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            v = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
            c = _act_codes(v, scale, zero, sub, finite, qmin, qmax, SYMMETRIC)
            tl.store(a_ptr + row.to(tl.int64) * K + k0 + offs, c, mask=m)
        tl.store(sx_ptr + row, scale)
        tl.store(zx_ptr + row, zx_eff.to(tl.int32))

    @triton.jit
    def _w4_linear_kernel(
        a_ptr, w_ptr, wz_ptr, sw_ptr, cs_ptr, sx_ptr, zx_ptr, b_ptr, y_ptr,
        M, N, K, KP, GROUP, G,
        HAS_BIAS: tl.constexpr, CORRECT: tl.constexpr, USE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tl.arange(0, BLOCK_K // 2)  # byte index inside a K block
        m_ok = rm < M
        n_ok = rn < N
        a_rows = a_ptr + rm.to(tl.int64)[:, None] * K
        w_cols = w_ptr + rn.to(tl.int64)[None, :] * KP
        if CORRECT:
            zx = tl.load(zx_ptr + rm, mask=m_ok, other=0).to(tl.int64)
        out = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for g in range(0, G):
            wz = tl.load(wz_ptr + rn * G + g, mask=n_ok, other=0).to(tl.int32)
            acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.int32)
            for k0 in range(g * GROUP, g * GROUP + GROUP, BLOCK_K):
                j = k0 // 2 + rj
                ke = 2 * j  # even column of each byte, odd column = ke + 1
                wb = tl.load(w_cols + j[:, None], mask=(j[:, None] < KP) & n_ok[None, :], other=0).to(tl.int32)
                w_lo = (wb & 15) - wz[None, :]
                w_hi = (wb >> 4) - wz[None, :]
                a_lo = tl.load(a_rows + ke[None, :], mask=m_ok[:, None] & (ke[None, :] < K), other=0)
                a_hi = tl.load(a_rows + ke[None, :] + 1, mask=m_ok[:, None] & (ke[None, :] + 1 < K), other=0)
                if USE_DOT:
                    acc += tl.dot(a_lo, w_lo.to(tl.int8), out_dtype=tl.int32)
                    acc += tl.dot(a_hi, w_hi.to(tl.int8), out_dtype=tl.int32)
                else:  # GEMV form for a handful of rows (decode): no padded MMA tile
                    a32_lo = a_lo.to(tl.int32)
                    a32_hi = a_hi.to(tl.int32)
                    acc += tl.sum(a32_lo[:, :, None] * w_lo[None, :, :], axis=1)
                    acc += tl.sum(a32_hi[:, :, None] * w_hi[None, :, :], axis=1)
            sw = tl.load(sw_ptr + rn * G + g, mask=n_ok, other=0.0)
            if CORRECT:
                cs = tl.load(cs_ptr + g * N + rn, mask=n_ok, other=0).to(tl.int64)
                t = (acc.to(tl.int64) - zx[:, None] * cs[None, :]).to(tl.float32)
            else:
                t = acc.to(tl.float32)
            out += t * sw[None, :]
        sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0)
        if HAS_BIAS:  # torch.addcmul(bias, acc, sx): one fused multiply-add (single rounding)
            bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0)
            y = tl.math.fma(out, sx[:, None] + tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32), bias[None, :]
                            + tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32))
        else:
            y = out * sx[:, None]
        y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        if y_ptr.dtype.element_ty == tl.bfloat16:
            # round to nearest even on the bits (torch's .to(bfloat16)); Triton's interpreter truncates
            u = y.to(tl.uint32, bitcast=True)
            r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            r = tl.where(y != y, 0x7FC0, r)
            y = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the packed Triton kernels need `triton` (pip install 'hf-roste[triton]').")


# --------------------------------------------------------------------------- activation quantization
@dataclass
class TritonActivation:
    """Per-token int8 activation codes from :func:`quantize_activation_triton`.

    Attributes: ``a`` int8 ``[M, K]`` (centred rows: ``c - z``; other rows: codes, 8-bit shifted by
    -128), ``sx`` fp32 ``[M]`` scales, ``zx`` int32 ``[M]`` effective zero points (0 for centred rows),
    ``lead`` the leading shape of the input, ``centred`` True when every row is centred by construction
    (symmetric specs), so the GEMM skips the zero-point correction.
    """

    a: Tensor
    sx: Tensor
    zx: Tensor
    lead: tuple[int, ...]
    centred: bool = False


def _check_act_spec(spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"act_spec must be a QuantSpec, got {type(spec).__name__}")
    if not spec.enabled or spec.granularity != "token":
        raise ValueError(f"the Triton activation quantizer needs a per-token spec with bits 2..8, got {spec}")


@torch.library.custom_op("hf_roste::quantize_activation_w4", mutates_args=())
def _quantize_activation_op(x2: Tensor, bits: int, symmetric: bool, clip_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """Custom op (opaque to torch.compile, CUDA-graph safe) launching :func:`_act_quant_kernel`."""
    spec = QuantSpec(bits, symmetric=symmetric, clip_ratio=clip_ratio, granularity="token")
    m, k = x2.shape
    a = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    sx = torch.empty(m, dtype=torch.float32, device=x2.device)
    zx = torch.empty(m, dtype=torch.int32, device=x2.device)
    if m and k:
        k_scale = float(torch.tensor(clip_ratio / spec.qmax, dtype=torch.float32))  # torch rounds scalars to fp32
        block = min(4096, triton.next_power_of_2(k))
        _act_quant_kernel[(m,)](
            x2, a, sx, zx, k, x2.stride(0), k_scale, float(torch.tensor(-clip_ratio, dtype=torch.float32)),
            float(spec.qmin), float(spec.qmax),
            SYMMETRIC=symmetric, BITS=bits, BLOCK=block, enable_fp_fusion=False,
        )
    return a, sx, zx


@_quantize_activation_op.register_fake
def _(x2: Tensor, bits: int, symmetric: bool, clip_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    m, k = x2.shape
    return (x2.new_empty(m, k, dtype=torch.int8), x2.new_empty(m, dtype=torch.float32),
            x2.new_empty(m, dtype=torch.int32))


def quantize_activation_triton(x: Tensor, spec: QuantSpec) -> TritonActivation:
    """Quantize ``x [..., K]`` (fp32 / bf16 / fp16) per token with ``spec`` (see the module docstring)."""
    _require_triton()
    _check_act_spec(spec)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    lead = tuple(x.shape[:-1])
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    a, sx, zx = torch.ops.hf_roste.quantize_activation_w4(x2, spec.bits, spec.symmetric, float(spec.clip_ratio))
    return TritonActivation(a, sx, zx, lead, centred=spec.symmetric)


# --------------------------------------------------------------------------- packed weight
@dataclass
class PackedWeight:
    """4-bit weight in the kernel's layout, built once per load (the packed bytes are not copied).

    Attributes: ``packed`` uint8 ``[N, ceil(K / 2)]`` (the layer's ``weight_packed``), ``zero`` int8
    ``[N, G]`` (value subtracted from a stored nibble: the zero point, or ``2^(b-1)`` for symmetric
    codes), ``scale`` fp32 ``[N, G]``, ``colsum`` int32 ``[G, N]`` group sums of the centred codes,
    ``in_features``, ``out_features``, ``group_size``.
    """

    packed: Tensor
    zero: Tensor
    scale: Tensor
    colsum: Tensor
    in_features: int
    out_features: int
    group_size: int


def packed_weight_supported(spec: QuantSpec, in_features: int) -> bool:
    """Whether :func:`prepare_packed_weight` handles this weight spec (4-bit, group sizes % 32)."""
    if spec.bits != 4 or spec.granularity not in ("channel", "group"):
        return False
    return spec.granularity == "channel" or (spec.group_size is not None and spec.group_size % 32 == 0)


def prepare_packed_weight(
    packed: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, in_features: int
) -> PackedWeight | None:
    """Kernel layout of a 4-bit packed weight, or None when its zero points do not allow centred int8
    codes (``|z| > 112``: a row far from 0; that layer keeps the PyTorch path)."""
    if not packed_weight_supported(spec, in_features):
        raise ValueError(f"the packed Triton GEMM handles 4-bit channel / group (size % 32) weights, got {spec}")
    n = packed.shape[0]
    groups = spec.num_groups(in_features)
    if spec.symmetric:
        zero = torch.full((n, groups), 1 << (spec.bits - 1), dtype=torch.int8, device=packed.device)
    else:
        if zero_point.numel() and float(zero_point.abs().max()) > _MAX_ZERO:
            return None
        zero = zero_point.to(torch.int8).contiguous()
    gsz = in_features // groups
    codes = torch.stack(((packed & 15), (packed >> 4)), dim=-1).view(n, -1)[:, :in_features]
    centred = codes.to(torch.int32).view(n, groups, gsz) - zero.to(torch.int32).unsqueeze(-1)
    colsum = centred.sum(-1, dtype=torch.int32).t().contiguous()
    return PackedWeight(packed.contiguous(), zero, scale.to(torch.float32).contiguous(), colsum,
                        in_features, n, gsz)


def _blocks(m: int, gsz: int, grouped: bool) -> tuple[int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT) for an ``m``-row product (heuristics, untuned)."""
    if grouped:  # a K block must not straddle two groups
        bk = next(b for b in (128, 64, 32) if gsz % b == 0)
    else:
        bk = 128 if gsz > 64 else (64 if gsz > 32 else 32)
    if m <= 4:
        return (1 if m == 1 else 4), 32, bk, False
    if m <= 16:
        return 16, 64, bk, True
    if m <= 64:
        return 64, 64, bk, True
    return 128, 128, bk, True


@torch.library.custom_op("hf_roste::packed_linear_w4", mutates_args=())
def _packed_linear_op(
    a: Tensor, sx: Tensor, zx: Tensor, packed: Tensor, zero: Tensor, scale: Tensor, colsum: Tensor,
    bias: Tensor | None, group_size: int, centred: bool, out_dtype: torch.dtype,
) -> Tensor:
    """Custom op (opaque to torch.compile, CUDA-graph safe) launching :func:`_w4_linear_kernel`."""
    m, k = a.shape
    n = packed.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m:
        bm, bn, bk, use_dot = _blocks(m, group_size, group_size != k)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        b = bias.to(torch.float32) if bias is not None else scale  # dummy pointer when no bias
        _w4_linear_kernel[grid](
            a, packed, zero, scale, colsum, sx, zx, b, y,
            m, n, k, packed.shape[1], group_size, k // group_size,
            HAS_BIAS=bias is not None, CORRECT=not centred, USE_DOT=use_dot,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, enable_fp_fusion=False,
        )
    return y


@_packed_linear_op.register_fake
def _(a: Tensor, sx: Tensor, zx: Tensor, packed: Tensor, zero: Tensor, scale: Tensor, colsum: Tensor,
      bias: Tensor | None, group_size: int, centred: bool, out_dtype: torch.dtype) -> Tensor:
    return a.new_empty(a.shape[0], packed.shape[0], dtype=out_dtype)


def packed_linear_triton(
    act: TritonActivation, weight: PackedWeight, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """``y [..., N]`` of a quantized activation through a packed 4-bit weight (module docstring)."""
    _require_triton()
    a = act.a
    m, k = a.shape
    if k != weight.in_features:
        raise ValueError(f"activation has {k} features, the weight expects {weight.in_features}")
    n = weight.out_features
    y = torch.ops.hf_roste.packed_linear_w4(
        a, act.sx, act.zx, weight.packed, weight.zero, weight.scale, weight.colsum, bias,
        weight.group_size, act.centred, out_dtype,
    )
    return y.view(*act.lead, n)
