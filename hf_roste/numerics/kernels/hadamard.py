"""Online Hadamard transform: a Triton fast Walsh-Hadamard kernel and the ``hf_roste::hadamard_transform`` op.

For ``n = m * 2**k`` the rotation is ``x @ R`` with ``R = H_n / sqrt(n)`` and
``H_n = kron(B_m, S_{2**k})`` (see the rotation module). The kernel does the power-of-two part,
``X @ S_{2**k}`` on every row ``X`` of the ``[rows * m, 2**k]`` view, as ``k`` butterfly stages in
registers (``log2(p)`` additions per element, no matrix), scaled by ``1 / sqrt(n)``; the small
``m x m`` base factor (``m <= 256``, e.g. 152 for 4864, 224 for 14336, 148 for 18944) is then one
batched ``[m, m] @ [m, 2**k]`` product. No dense ``n x n`` product is ever formed.

The arithmetic is fp32 whatever the input dtype (the result is rounded once to the input dtype),
like the PyTorch path; the order of the additions differs (butterflies instead of block
matrix products), so results agree to fp32 rounding, not bit for bit.

The ``torch.library`` custom op ``hf_roste::hadamard_transform``
(:func:`hf_roste.numerics.hadamard.hadamard_transform_op`: fake implementation and autograd formula,
so ``torch.compile`` traces it without a graph break on symbolic sizes) runs this kernel when
:func:`~._triton.use_triton` says so and the PyTorch path otherwise.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["MAX_KERNEL_POW2", "kernel_supports", "triton_hadamard_transform"]

MAX_KERNEL_POW2 = 2**13
"""Largest power-of-two part the register kernel handles (larger sizes use the PyTorch path)."""

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _kernel():  # noqa: ANN202 - a triton.JITFunction, built on first use so importing needs no triton
    import triton
    import triton.language as tl

    @triton.jit
    def _fwht_rows(x_ptr, out_ptr, rows, scale, P: tl.constexpr, LOG_P: tl.constexpr, BLOCK_R: tl.constexpr,
                   OUT_BF16: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, P)
        offs = r.to(tl.int64)[:, None] * P + c[None, :]
        inside = r[:, None] < rows
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        for s in tl.static_range(LOG_P):
            # shapes inline: an annotated constexpr cannot be reassigned in the unrolled loop (no compile)
            y = tl.reshape(x, (BLOCK_R, P // (2 << s), 2, 1 << s))
            y = tl.permute(y, (0, 1, 3, 2))
            a, b = tl.split(y)
            y = tl.join(a + b, a - b)
            y = tl.permute(y, (0, 1, 3, 2))
            x = tl.reshape(y, (BLOCK_R, P))
        x = x * scale
        if OUT_BF16:  # round to nearest even in integer arithmetic (same bits compiled and interpreted)
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            u = tl.where(x != x, 0x7FC0, u)
            tl.store(out_ptr + offs, u.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=inside)
        else:
            tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=inside)

    return _fwht_rows


def _pow2_rows(y: Tensor, p: int, scale: float, out_dtype: torch.dtype) -> Tensor:
    """``scale * (y @ S_p)`` for a contiguous ``[R, p]`` tensor, by the butterfly kernel."""
    rows = y.shape[0]
    out = torch.empty((rows, p), dtype=out_dtype, device=y.device)
    if p == 1:
        return out.copy_(y.float() * scale)
    block_r = max(1, min(16, 4096 // p))
    _kernel()[(_cdiv(rows, block_r),)](
        y, out, rows, scale, P=p, LOG_P=p.bit_length() - 1, BLOCK_R=block_r, OUT_BF16=out_dtype == torch.bfloat16,
        num_warps=4 if p * block_r <= 4096 else 8, enable_fp_fusion=False,
    )
    return out


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


def triton_hadamard_transform(x: Tensor, m: int, k: int, base: Tensor | None = None) -> Tensor:
    """``x @ R`` along the last dim, ``n = m * 2**k``, by the Triton kernel (plus the ``[m, m]`` factor).

    Args:
        x: float32 / bfloat16 / float16 ``[..., n]`` on a device Triton runs on.
        m, k: the factorization of ``n`` (:func:`~hf_roste.numerics.hadamard.hadamard_factorization`).
        base: the fp32 ``[m, m]`` factor applied to each row seen as ``[m, 2**k]`` (``B_m.T`` for the
            rotation, ``B_m`` for its inverse; the Sylvester part is symmetric), on ``x``'s device;
            required when ``m > 1``.

    Returns:
        A new tensor with the shape and dtype of ``x``; no autograd (use
        :func:`hf_roste.numerics.hadamard.hadamard_transform_op`).

    Raises:
        ValueError: a dtype other than float32 / bfloat16 / float16, ``n`` not ``m * 2**k``, a
            power-of-two part above :data:`MAX_KERNEL_POW2` or a missing / mis-shaped ``base``.
    """
    p = 1 << k
    n = m * p
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Hadamard kernel handles float32/bfloat16/float16, got {x.dtype}")
    if x.shape[-1] != n:
        raise ValueError(f"x has last dim {x.shape[-1]}, expected m * 2**k = {m} * {p} = {n}")
    if p > MAX_KERNEL_POW2:
        raise ValueError(f"the Hadamard kernel handles power-of-two parts up to {MAX_KERNEL_POW2}, got {p}")
    rows = x.numel() // n
    scale = 1.0 / math.sqrt(n)
    y = x.reshape(rows * m, p).contiguous()
    if m == 1:
        return _pow2_rows(y, p, scale, x.dtype).view(x.shape)
    if base is None or tuple(base.shape) != (m, m):
        raise ValueError(f"n = {m} * 2**{k} needs the [m, m] base factor, got "
                         f"{None if base is None else tuple(base.shape)}")
    y = _pow2_rows(y, p, scale, torch.float32).view(rows, m, p)
    y = torch.matmul(base, y)  # forward: B^T X ; transpose: B X  (X = a row as [m, p])
    return y.view(x.shape) if x.dtype == torch.float32 else y.view(x.shape).to(x.dtype)


def kernel_supports(x: Tensor, m: int, k: int) -> bool:
    """Whether :func:`triton_hadamard_transform` handles ``x`` for ``n = m * 2**k``."""
    return x.dtype in _KERNEL_DTYPES and (1 << k) <= MAX_KERNEL_POW2 and x.numel() > 0
