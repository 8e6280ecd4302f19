"""The online R4 as a block-diagonal Hadamard: what vLLM's fast `hadamard` transform kernel computes.

With ``r4_block_size = b`` (a power of two dividing the intermediate size ``n``), R4 is
``I_{n/b} (x) H_b / sqrt(b)`` (Sylvester ``H_b``): the down projection's input is rotated in
independent blocks of ``b`` consecutive channels. compressed-tensors writes it as a ``hadamard``
transform with ``head_dim = b``, which vLLM applies with its power-of-two kernel and no dense
``n x n`` matrix (a dense fp32 R4 of Llama-3.1-8B, n = 14336, is 822 MB per layer).
``block = None`` is the full-size rotation of :func:`hf_roste.numerics.hadamard.hadamard_transform`.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_r4_block_size", "r4_transform"]


def check_r4_block_size(block: int | None, size: int | None = None) -> None:
    """Raise `ValueError` unless `block` is None or a power of two >= 2 (dividing `size` when given)."""
    if block is None:
        return
    if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (block - 1):
        raise ValueError(
            f"RoSTEConfig.r4_block_size={block!r} is invalid: expected None (one Hadamard of the full intermediate "
            "size) or a power of two >= 2, e.g. 128 (vLLM's fast hadamard kernel)."
        )
    if size is not None and size % block:
        raise ValueError(
            f"RoSTEConfig.r4_block_size={block} does not divide the down_proj input size {size}; use a power of two "
            f"that divides it (largest: {size & -size}), or r4_block_size=None."
        )


def r4_transform(x: Tensor, block: int | None = None, transpose: bool = False) -> Tensor:
    """``x @ R4`` along the last dim (``transpose=True``: ``x @ R4^T``), block-diagonal when `block` is set."""
    from .hadamard import hadamard_transform

    if block is None:
        return hadamard_transform(x, transpose=transpose)
    n = x.shape[-1]
    check_r4_block_size(block, n)
    y = hadamard_transform(x.reshape(*x.shape[:-1], n // block, block), transpose=transpose)
    return y.reshape(x.shape)
