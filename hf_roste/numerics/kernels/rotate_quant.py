"""Fused online R4 + per-token activation quantization: one Triton launch in front of a packed down_proj.

A packed ``down_proj`` with the online R4 otherwise runs the Hadamard (a kernel that writes the rotated
activation back in its dtype) and then :func:`~.packed_gemm.quantize_activation_triton` (which reads it
again).  :func:`rotate_quantize_activation_triton` does both in one program per token row:

1. load the row (in chunks of whole Hadamard blocks), convert to fp32;
2. rotate every block of ``b`` consecutive channels in registers: ``log2(b)`` butterfly stages (``a + b``,
   ``a - b``, the stage order and pairing of :mod:`.hadamard`'s kernel), times ``1 / sqrt(b)``;
3. round the rotated values to the input dtype (bf16: round-to-nearest-even on the bits; fp16: the
   conversion) -- the unfused route hands the quantizer a tensor of that dtype;
4. quantize per token with the rule of :func:`~.packed_gemm.quantize_activation_triton` (the same
   ``@triton.jit`` helpers: scale / zero point / centred storage / codes) and write the int8 codes and
   the per-token scale and effective zero point in its layout, so
   :func:`~.packed_gemm.packed_linear_triton` consumes the result unchanged.

Rows of up to :data:`ONE_PASS_MAX_FEATURES` features (padded to a power of two) stay in registers: the
row is read once and the rotated values are never written (e.g. Llama-3.1-8B's 14336 features, padded to
2**14, with ``r4_block_size=128``).  Longer rows are swept twice (max / min, then codes), the rotation
recomputed on the second sweep; still no intermediate tensor and one launch.  Warps scale with the row
(about 16 values per thread; ptxas for sm_90 reports no register spills up to 2**14, checked ahead of
time on the CPU, not on a GPU).

Blocks: any power of two ``2 <= b <=`` :data:`MAX_FUSED_BLOCK` dividing ``K``.  The block-diagonal R4
(``RoSTEConfig.r4_block_size``, e.g. 16..256) is ``b = r4_block_size``; a full-size R4 is the single
block ``b = K`` when the intermediate size is a power of two up to :data:`MAX_FUSED_BLOCK`.  Other sizes
(e.g. 14336 = 224 * 2**6, whose rotation has a non-Sylvester factor) keep the unfused route.

Numerics: the butterfly adds in the order of the Triton Hadamard kernel and scales by the same fp32
``1 / sqrt(b)``, so codes, scales and zero points are bit-identical to the unfused Triton route
(Triton Hadamard, then the quantizer).  Against the PyTorch Hadamard (block matrix products, another
summation order) the rotated values agree to fp32 rounding (bf16 / fp16 inputs: then one ulp of that dtype
where the rounding to it flips), the scale moves by what that moves the row's max / min, and a code can
differ by one where the value lies within those moves of a rounding boundary (a near-tie), which the
tests count.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..spec import QuantSpec
from .packed_gemm import TritonActivation, _check_act_spec, _require_triton

__all__ = [
    "MAX_FUSED_BLOCK",
    "ONE_PASS_MAX_FEATURES",
    "fused_r4_supported",
    "rotate_quantize_activation_triton",
]

MAX_FUSED_BLOCK = 2**13
"""Largest Hadamard block the fused kernel rotates in registers (the Hadamard kernel's limit)."""

ONE_PASS_MAX_FEATURES = 2**14
"""Rows up to this many features (padded to a power of two) are held in registers and read once."""

_CHUNK = 2**12  # features per sweep step of longer rows (rounded up to a whole block)
_DTYPE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

try:  # triton is optional on CPU installs; nothing here is called unless use_triton() said yes
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None


if triton is not None:
    from .packed_gemm import _act_codes, _act_row_params

    @triton.jit
    def _rotate_blocks(x, rot_scale, R: tl.constexpr, B: tl.constexpr, LOG_B: tl.constexpr, IN_KIND: tl.constexpr):
        """``x [R * B]`` fp32 -> each block of ``B`` times ``S_B / sqrt(B)``, rounded to the input dtype (fp32)."""
        y = tl.reshape(x, (R, B))
        for s in tl.static_range(LOG_B):
            # stage s pairs channels 2**s apart; the shapes are written inline because a constexpr
            # assigned in an unrolled loop does not compile (reassignment) and `1 << s` stored in a
            # plain name becomes a tensor
            z = tl.reshape(y, (R, B // (2 << s), 2, 1 << s))
            z = tl.permute(z, (0, 1, 3, 2))
            lo, hi = tl.split(z)
            z = tl.join(lo + hi, lo - hi)
            z = tl.permute(z, (0, 1, 3, 2))
            y = tl.reshape(z, (R, B))
        y = tl.reshape(y, (R * B,)) * rot_scale
        if IN_KIND == 1:  # bf16: round to nearest even on the bits (the interpreter's cast truncates)
            u = y.to(tl.uint32, bitcast=True)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
            y = tl.where(y != y, y, u.to(tl.float32, bitcast=True))
        elif IN_KIND == 2:
            y = y.to(tl.float16).to(tl.float32)
        return y

    @triton.jit
    def _rot_quant_kernel(
        x_ptr, a_ptr, sx_ptr, zx_ptr, r_ptr, K, stride_x,
        rot_scale, k_scale, neg_c, qmin, qmax,
        SYMMETRIC: tl.constexpr, BITS: tl.constexpr, B: tl.constexpr, LOG_B: tl.constexpr,
        CHUNK: tl.constexpr, ONE_PASS: tl.constexpr, IN_KIND: tl.constexpr, STORE_ROTATED: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, CHUNK)
        x_row = x_ptr + row.to(tl.int64) * stride_x
        out_row = row.to(tl.int64) * K
        if ONE_PASS:  # the whole row in registers: one read, no second rotation
            m = offs < K
            y = _rotate_blocks(tl.load(x_row + offs, mask=m, other=0.0).to(tl.float32), rot_scale,
                               CHUNK // B, B, LOG_B, IN_KIND)
            scale, zero, zx_eff, sub, finite = _act_row_params(
                tl.max(tl.where(m, y, float("-inf")), axis=0), tl.min(tl.where(m, y, float("inf")), axis=0),
                tl.max(((y != y) & m).to(tl.int32), axis=0) > 0, k_scale, neg_c, qmax, SYMMETRIC, BITS)
            tl.store(a_ptr + out_row + offs, _act_codes(y, scale, zero, sub, finite, qmin, qmax, SYMMETRIC), mask=m)
            if STORE_ROTATED:
                tl.store(r_ptr + out_row + offs, y, mask=m)
        else:  # sweep 1: max / min of the rotated row; sweep 2: rotate again, write the codes
            mx = tl.full([CHUNK], float("-inf"), tl.float32)
            mn = tl.full([CHUNK], float("inf"), tl.float32)
            bad = tl.full([CHUNK], 0, tl.int32)
            for k0 in range(0, K, CHUNK):
                m = k0 + offs < K
                y = _rotate_blocks(tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32), rot_scale,
                                   CHUNK // B, B, LOG_B, IN_KIND)
                bad = bad | ((y != y) & m).to(tl.int32)
                mx = tl.where(m, tl.maximum(mx, y), mx)
                mn = tl.where(m, tl.minimum(mn, y), mn)
            scale, zero, zx_eff, sub, finite = _act_row_params(
                tl.max(mx, axis=0), tl.min(mn, axis=0), tl.max(bad, axis=0) > 0, k_scale, neg_c, qmax,
                SYMMETRIC, BITS)
            for k0 in range(0, K, CHUNK):
                m = k0 + offs < K
                y = _rotate_blocks(tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32), rot_scale,
                                   CHUNK // B, B, LOG_B, IN_KIND)
                tl.store(a_ptr + out_row + k0 + offs, _act_codes(y, scale, zero, sub, finite, qmin, qmax, SYMMETRIC),
                         mask=m)
                if STORE_ROTATED:
                    tl.store(r_ptr + out_row + k0 + offs, y, mask=m)
        tl.store(sx_ptr + row, scale)
        tl.store(zx_ptr + row, zx_eff.to(tl.int32))


def fused_r4_supported(block: int, in_features: int) -> bool:
    """Whether the fused kernel rotates ``in_features``-wide rows in Hadamard blocks of ``block``."""
    if isinstance(block, bool) or not isinstance(block, int) or isinstance(in_features, bool):
        return False
    return 2 <= block <= MAX_FUSED_BLOCK and block & (block - 1) == 0 and in_features % block == 0


def _plan(k: int, block: int) -> tuple[int, bool, int]:
    """(CHUNK, ONE_PASS, num_warps) of a ``k``-feature row in ``block``-wide Hadamard blocks."""
    padded = max(block, triton.next_power_of_2(k))
    if padded <= ONE_PASS_MAX_FEATURES:
        chunk, one_pass = padded, True
    else:
        chunk, one_pass = max(block, _CHUNK), False
    # about 16 values per thread: ptxas (sm_90) then reports no spills for every chunk up to 2**14
    return chunk, one_pass, min(32, max(4, chunk // 512))


@torch.library.custom_op("hf_roste::rotate_quantize_activation_w4", mutates_args=())
def _rotate_quantize_op(
    x2: Tensor, block: int, bits: int, symmetric: bool, clip_ratio: float, store_rotated: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Custom op (opaque to torch.compile, CUDA-graph safe) launching :func:`_rot_quant_kernel`."""
    spec = QuantSpec(bits, symmetric=symmetric, clip_ratio=clip_ratio, granularity="token")
    m, k = x2.shape
    a = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    sx = torch.empty(m, dtype=torch.float32, device=x2.device)
    zx = torch.empty(m, dtype=torch.int32, device=x2.device)
    rotated = torch.empty((m, k) if store_rotated else (0,), dtype=torch.float32, device=x2.device)
    if m and k:
        chunk, one_pass, warps = _plan(k, block)
        _rot_quant_kernel[(m,)](
            x2, a, sx, zx, rotated if store_rotated else sx, k, x2.stride(0),
            1.0 / math.sqrt(block),  # the Hadamard kernel's scale, rounded to fp32 at the launch alike
            float(torch.tensor(clip_ratio / spec.qmax, dtype=torch.float32)),  # torch rounds scalars to fp32
            float(torch.tensor(-clip_ratio, dtype=torch.float32)), float(spec.qmin), float(spec.qmax),
            SYMMETRIC=symmetric, BITS=bits, B=block, LOG_B=block.bit_length() - 1, CHUNK=chunk,
            ONE_PASS=one_pass, IN_KIND=_DTYPE_KIND[x2.dtype], STORE_ROTATED=store_rotated,
            num_warps=warps, enable_fp_fusion=False,
        )
    return a, sx, zx, rotated


@_rotate_quantize_op.register_fake
def _(x2: Tensor, block: int, bits: int, symmetric: bool, clip_ratio: float,
      store_rotated: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m, k = x2.shape
    return (x2.new_empty(m, k, dtype=torch.int8), x2.new_empty(m, dtype=torch.float32),
            x2.new_empty(m, dtype=torch.int32),
            x2.new_empty((m, k) if store_rotated else (0,), dtype=torch.float32))


def rotate_quantize_activation_triton(
    x: Tensor, spec: QuantSpec, block: int, return_rotated: bool = False
) -> TritonActivation | tuple[TritonActivation, Tensor]:
    """Rotate ``x [..., K]`` by the block-diagonal Hadamard ``I_{K/block} (x) H_block / sqrt(block)`` and
    quantize it per token with ``spec``, in one kernel (module docstring).

    Args:
        x: float32 / bfloat16 / float16 activation, ``K`` a multiple of ``block``.
        spec: per-token activation spec (bits 2..8).
        block: Hadamard block, a power of two in ``[2, MAX_FUSED_BLOCK]``; ``block = K`` is the full-size
            rotation of :func:`hf_roste.numerics.hadamard.hadamard_transform`.
        return_rotated: also return the rotated values the quantizer saw (fp32 ``[M, K]``, already
            rounded to ``x``'s dtype); for tests and diagnostics, it costs an extra write.

    Returns:
        The :class:`~.packed_gemm.TritonActivation` of
        ``quantize_activation_triton(r4_transform(x, block), spec)`` (bit for bit with the Triton Hadamard
        kernel), or ``(activation, rotated)``.

    Raises:
        TypeError: another dtype.  ValueError: a spec that is not per token, or a block that is not a power
        of two in range dividing ``K``.
    """
    _require_triton()
    _check_act_spec(spec)
    if x.dtype not in _DTYPE_KIND:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    k = x.shape[-1]
    if not fused_r4_supported(block, k):
        raise ValueError(
            f"the fused R4 kernel rotates blocks of a power of two in [2, {MAX_FUSED_BLOCK}] dividing the row "
            f"({k} features), got block={block!r}; use r4_transform + quantize_activation_triton for other sizes."
        )
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    a, sx, zx, rotated = torch.ops.hf_roste.rotate_quantize_activation_w4(
        x2, block, spec.bits, spec.symmetric, float(spec.clip_ratio), bool(return_rotated))
    act = TritonActivation(a, sx, zx, lead, centred=spec.symmetric)
    return (act, rotated) if return_rotated else act
