"""Fused fake quantization (one Triton pass per quantization group) and the ``hf_roste::fake_quantize`` op.

The kernel computes, for each row of a contiguous ``[rows, cols]`` view (a token, an output
channel, a token of one K/V head, or a ``group_size`` block of a weight row), exactly the rule of
:mod:`hf_roste.numerics.quantize`: minimum, maximum, scale with the relative floor, zero point,
the constant-row and non-finite-row special cases, ``clamp(round(x / s) + z)`` and
``(codes - z) * s``, in fp32 whatever the input dtype, with the result rounded once to the input
dtype (bfloat16 by integer round-to-nearest-even on the fp32 bits, which Triton's interpreter and
compiled code then agree on). It reads the input twice (statistics, then codes) and writes the output once; nothing is
saved for the backward, which is the straight-through identity.

Bit-exactness with the PyTorch reference rests on three choices: divisions use IEEE
round-to-nearest (``tl.math.div_rn``, not the approximate ``/``), multiply-adds are not contracted
into FMAs (``enable_fp_fusion=False`` at launch), and ``round`` (half to even) is done with the
``1.5 * 2**23`` magic constant, exact here because the relative scale floor bounds ``|x / s|`` by
``2**20 + 1``.

The ``torch.library`` custom op ``hf_roste::fake_quantize`` (:func:`hf_roste.numerics.quantize.fake_quantize_op`,
straight-through autograd formula, fake implementation for ``torch.compile``) runs this kernel when
:func:`~._triton.use_triton` says so for the input's device, and the PyTorch reference otherwise.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..spec import QuantSpec

__all__ = ["kernel_supports", "triton_fake_quantize"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BLOCK = 4096  # columns processed per loop iteration of one program


def kernel_supports(x: Tensor, spec: QuantSpec) -> bool:
    """Whether the fused kernel handles ``x`` / ``spec`` (row-wise or group granularity, a native dtype)."""
    return spec.enabled and spec.granularity != "tensor" and x.dtype in _KERNEL_DTYPES and x.numel() > 0


@functools.cache
def _kernel():  # noqa: ANN202 - a triton.JITFunction, built on first use so importing needs no triton
    import triton
    import triton.language as tl

    @triton.jit
    def _fake_quant_rows(
        x_ptr,
        out_ptr,
        cols,
        k_scale,  # asymmetric: c / qmax; symmetric: c / qmax as well (qmax = 2^(b-1) - 1)
        neg_clip,  # -c
        qmin,
        qmax,
        SYMMETRIC: tl.constexpr,
        OUT_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = row * cols
        lanes = tl.arange(0, BLOCK)
        vmax = tl.full((BLOCK,), float("-inf"), tl.float32)
        vmin = tl.full((BLOCK,), float("inf"), tl.float32)
        vbad = tl.zeros((BLOCK,), tl.int32)
        for start in range(0, cols, BLOCK):
            offs = start + lanes
            inside = offs < cols
            x = tl.load(x_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
            vmax = tl.maximum(vmax, tl.where(inside, x, float("-inf")))
            vmin = tl.minimum(vmin, tl.where(inside, x, float("inf")))
            vbad = vbad | ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
        mx = tl.max(vmax, axis=0)
        mn = tl.min(vmin, axis=0)
        bad = tl.max(vbad, axis=0) > 0  # a NaN or +-Inf in the row: the reference's amax is not finite
        amax = tl.maximum(tl.abs(mn), tl.abs(mx))
        floor = tl.maximum(amax * 9.5367431640625e-07, 1.1754943508222875e-38)  # 2^-20, FLT_MIN
        if SYMMETRIC:
            scale = tl.maximum(amax * k_scale, floor)
            scale = tl.where(amax == 0.0, 1.0, scale)
            zero = 0.0
        else:
            scale = tl.maximum(mx * k_scale - mn * k_scale, floor)
            # not named q: a scalar q here and the block q of the loop below do not compile (loop-carried type)
            qz = tl.math.div_rn(mn * neg_clip, scale)
            zero = (qz + 12582912.0) - 12582912.0 + 0.0  # round half to even (|qz| <= 2^20), no -0.0
            constant = mx == mn
            sign = tl.where(mn > 0.0, 1.0, tl.where(mn < 0.0, -1.0, 0.0))
            scale = tl.where(constant, tl.where(mn == 0.0, 1.0, tl.abs(mn)), scale)
            zero = tl.where(constant, 0.0 - sign + 0.0, zero)
        scale = tl.where(bad, float("nan"), scale)
        zero = tl.where(bad, 0.0, zero)
        for start in range(0, cols, BLOCK):
            offs = start + lanes
            inside = offs < cols
            x = tl.load(x_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
            q = tl.math.div_rn(x, scale)
            codes = (q + 12582912.0) - 12582912.0
            codes = codes + zero  # symmetric: + 0.0 turns -0.0 into +0.0, like the reference
            codes = tl.minimum(tl.maximum(codes, qmin), qmax)
            if SYMMETRIC:
                out = codes * scale
            else:
                out = (codes - zero) * scale
            out = tl.where(bad, float("nan"), out)
            if OUT_BF16:  # round to nearest even in integer arithmetic (same bits compiled and interpreted)
                u = out.to(tl.uint32, bitcast=True)
                u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
                u = tl.where(out != out, 0x7FC0, u)
                tl.store(out_ptr + base + offs, u.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=inside)
            else:
                tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=inside)

    return _fake_quant_rows


def triton_fake_quantize(x: Tensor, spec: QuantSpec, out_dtype: torch.dtype | None = None) -> Tensor:
    """Fake-quantized ``x`` (the forward value of :func:`hf_roste.numerics.fake_quantize`) by the fused kernel.

    Args:
        x: float32 / bfloat16 / float16 tensor ``[..., n]`` on a device Triton runs on (CUDA, or CPU
            under ``TRITON_INTERPRET=1``).
        spec: enabled :class:`QuantSpec` with a row-wise or ``"group"`` granularity.

        out_dtype: dtype of the result (default ``x.dtype``); the fp32 ``x_hat`` is rounded once to it,
            exactly what ``fake_quantize(x).to(out_dtype)`` gives for a float32 ``x``.

    Returns:
        A new contiguous tensor with the shape of ``x``. No autograd: use :func:`hf_roste.numerics.quantize.fake_quantize_op`.

    Raises:
        ValueError: the spec or dtype is one the kernel does not handle (see :func:`kernel_supports`).
    """
    if not kernel_supports(x, spec):
        raise ValueError(
            f"the fused fake-quant kernel handles enabled row-wise/group specs on non-empty float32/bfloat16/"
            f"float16 tensors; got {spec} on a {x.dtype} tensor of shape {tuple(x.shape)}"
        )
    cols = x.shape[-1]
    if spec.granularity == "group":
        cols = spec.group_size
        spec.num_groups(x.shape[-1])  # raises when group_size does not divide the last dim
    src = x.contiguous()
    out = torch.empty_like(src, dtype=out_dtype or src.dtype)
    if out.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"out_dtype must be one of {_KERNEL_DTYPES}, got {out.dtype}")
    rows = src.numel() // cols
    block = min(_MAX_BLOCK, 1 << max(cols - 1, 1).bit_length())
    k_scale = float(spec.clip_ratio) / spec.qmax
    _kernel()[(rows,)](
        src,
        out,
        cols,
        k_scale,
        -float(spec.clip_ratio),
        float(spec.qmin),
        float(spec.qmax),
        SYMMETRIC=spec.symmetric,
        OUT_BF16=out.dtype == torch.bfloat16,
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
        enable_fp_fusion=False,
    )
    return out.view(x.shape)
