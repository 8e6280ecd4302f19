"""Decode attention that reads a 4-bit packed KV cache directly (fused dequantization).

:class:`~hf_roste.modules.kv_store.KVStore` keeps K and V as packed codes (two per byte, low nibble =
even dimension), one fp32 scale and (asymmetric) one integer zero point per token per head.  The CPU
path dequantizes the whole cache at every step and hands it to SDPA; on the device path the new
query token attends to the codes directly: each program (one batch row, one query head) streams its
KV head's bytes in blocks of tokens, dequantizes them in registers with ``decode_kv``'s arithmetic
(``(code - offset - zero) * scale`` in fp32: the same K/V values) and runs an online softmax in fp32,
so no full-precision copy of the cache is ever written.  Scores, softmax and the weighted sum are
fp32 (the CPU path runs SDPA in the model dtype), so outputs agree to rounding, not bit for bit.

Supported: one query token per sequence (decode), 4-bit codes with one scale per token per head,
an even head_dim, GQA (query heads grouped onto KV heads), an optional mask (bool: True = attend, or
additive float), ``[batch, 1, 1, kv_len]`` broadcastable.  Anything else keeps the CPU path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import QuantSpec

__all__ = ["packed_kv_attention", "packed_kv_attention_supported"]

try:  # optional on CPU installs; nothing here runs unless use_triton() said yes
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - installs without triton
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, codes_ptr, scale_ptr, zero_ptr, mask_ptr, out_ptr,
        L, HQ, HKV, GROUPS, sm_scale, offset,
        s_qb, s_qh,
        s_ck, s_cb, s_ch, s_ct,
        s_sk, s_sb, s_sh, s_st,
        s_mb, s_mt,
        s_ob, s_oh,
        HAS_ZERO: tl.constexpr, MASK_KIND: tl.constexpr,
        HALF_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // HQ
        hq = pid % HQ
        hk = hq // GROUPS
        j = tl.arange(0, HALF_D)
        q_row = q_ptr + b.to(tl.int64) * s_qb + hq.to(tl.int64) * s_qh
        q_even = tl.load(q_row + 2 * j).to(tl.float32)
        q_odd = tl.load(q_row + 2 * j + 1).to(tl.float32)
        k_base = codes_ptr + b.to(tl.int64) * s_cb + hk.to(tl.int64) * s_ch
        v_base = k_base + s_ck
        ks_base = scale_ptr + b.to(tl.int64) * s_sb + hk.to(tl.int64) * s_sh
        vs_base = ks_base + s_sk
        kz_base = zero_ptr + b.to(tl.int64) * s_sb + hk.to(tl.int64) * s_sh
        vz_base = kz_base + s_sk
        m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)  # fp32 scalars (loop-carried)
        l_i = tl.sum(tl.full([BLOCK_N], 0.0, tl.float32), axis=0)
        acc_even = tl.full([HALF_D], 0.0, tl.float32)
        acc_odd = tl.full([HALF_D], 0.0, tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for t0 in range(0, L, BLOCK_N):
            t = t0 + offs_n
            ok = t < L
            t64 = t.to(tl.int64)
            kb = tl.load(k_base + t64[:, None] * s_ct + j[None, :], mask=ok[:, None], other=0).to(tl.int32)
            ks = tl.load(ks_base + t64 * s_st, mask=ok, other=0.0).to(tl.float32)
            vb = tl.load(v_base + t64[:, None] * s_ct + j[None, :], mask=ok[:, None], other=0).to(tl.int32)
            vs = tl.load(vs_base + t64 * s_st, mask=ok, other=0.0).to(tl.float32)
            k_lo = (kb & 15).to(tl.float32) - offset
            k_hi = (kb >> 4).to(tl.float32) - offset
            v_lo = (vb & 15).to(tl.float32) - offset
            v_hi = (vb >> 4).to(tl.float32) - offset
            if HAS_ZERO:
                kz = tl.load(kz_base + t64 * s_st, mask=ok, other=0).to(tl.float32)
                vz = tl.load(vz_base + t64 * s_st, mask=ok, other=0).to(tl.float32)
                k_lo = k_lo - kz[:, None]
                k_hi = k_hi - kz[:, None]
                v_lo = v_lo - vz[:, None]
                v_hi = v_hi - vz[:, None]
            k_lo = k_lo * ks[:, None]
            k_hi = k_hi * ks[:, None]
            v_lo = v_lo * vs[:, None]
            v_hi = v_hi * vs[:, None]
            s = tl.sum(k_lo * q_even[None, :], axis=1) + tl.sum(k_hi * q_odd[None, :], axis=1)
            s = s * sm_scale
            if MASK_KIND == 1:  # bool, True = attend
                keep = tl.load(mask_ptr + b.to(tl.int64) * s_mb + t64 * s_mt, mask=ok, other=0)
                s = tl.where(keep != 0, s, float("-inf"))
            if MASK_KIND == 2:  # additive
                s = s + tl.load(mask_ptr + b.to(tl.int64) * s_mb + t64 * s_mt, mask=ok, other=0.0).to(tl.float32)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc_even = acc_even * alpha + tl.sum(p[:, None] * v_lo, axis=0)
            acc_odd = acc_odd * alpha + tl.sum(p[:, None] * v_hi, axis=0)
            m_i = m_new
        o_row = out_ptr + b.to(tl.int64) * s_ob + hq.to(tl.int64) * s_oh
        tl.store(o_row + 2 * j, (acc_even / l_i).to(out_ptr.dtype.element_ty))
        tl.store(o_row + 2 * j + 1, (acc_odd / l_i).to(out_ptr.dtype.element_ty))


def packed_kv_attention_supported(spec: QuantSpec, head_dim: int, query_len: int) -> bool:
    """Whether :func:`packed_kv_attention` handles this cache layout and query length."""
    return (
        triton is not None and query_len == 1 and spec.bits == 4 and spec.granularity in ("token", "token_head")
        and head_dim % 2 == 0 and head_dim >= 4 and (head_dim & (head_dim - 1)) == 0
    )


@torch.library.custom_op("hf_roste::packed_kv_attention", mutates_args=())
def _attention_op(
    query: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, mask: Tensor | None,
    sm_scale: float, offset: float,
) -> Tensor:
    """Custom op (opaque to torch.compile) launching :func:`_decode_attention_kernel`."""
    b, hq, _, d = query.shape
    hkv, length = codes.shape[2], codes.shape[3]
    out = torch.empty(b, hq, 1, d, dtype=query.dtype, device=query.device)
    q = query[:, :, 0]
    if mask is None:
        kind, m, s_mb, s_mt = 0, scale, 0, 0
    else:
        m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        kind = 1 if mask.dtype == torch.bool else 2
        s_mb, s_mt = m.stride(0), m.stride(1)
    zp = zero if zero is not None else scale
    block_n = 64 if length >= 64 else max(16, triton.next_power_of_2(length))
    _decode_attention_kernel[(b * hq,)](
        q, codes, scale, zp, m, out,
        length, hq, hkv, hq // hkv, sm_scale, offset,
        q.stride(0), q.stride(1),
        codes.stride(0), codes.stride(1), codes.stride(2), codes.stride(3),
        scale.stride(0), scale.stride(1), scale.stride(2), scale.stride(3),
        s_mb, s_mt,
        out.stride(0), out.stride(1),
        HAS_ZERO=zero is not None, MASK_KIND=kind, HALF_D=d // 2, BLOCK_N=block_n,
    )
    return out


@_attention_op.register_fake
def _(query: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, mask: Tensor | None,
      sm_scale: float, offset: float) -> Tensor:
    return torch.empty_like(query)


def packed_kv_attention(
    query: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    spec: QuantSpec,
    attention_mask: Tensor | None,
    scaling: float,
) -> Tensor:
    """Attention of one new query token over a packed 4-bit K/V cache.

    Args:
        query: ``[batch, q_heads, 1, head_dim]`` (after RoPE and R3).
        codes: uint8 ``[2, batch, kv_heads, length, head_dim // 2]`` (index 0 = K, 1 = V).
        scale: ``[2, batch, kv_heads, length, 1]`` (fp32 or fp16); zero: same shape, int8 / int32,
            or None for symmetric codes.
        spec: the K/V quantizer (4-bit, per token per head).
        attention_mask: None, bool (True = attend) or additive float, broadcastable to
            ``[batch, 1, 1, length]`` (a longer last dim is cut to ``length``).
        scaling: the softmax scale (``module.scaling``).

    Returns:
        ``[batch, q_heads, 1, head_dim]`` in ``query.dtype``.
    """
    b, hq, q_len, d = query.shape
    if not packed_kv_attention_supported(spec, d, q_len):
        raise ValueError(f"packed_kv_attention handles one query token and 4-bit per-token-head codes with a "
                         f"power-of-two head_dim; got q_len={q_len}, head_dim={d}, {spec}")
    if codes.dim() != 5 or codes.shape[0] != 2 or codes.shape[1] != b or codes.shape[-1] != d // 2:
        raise ValueError(f"codes must be [2, {b}, kv_heads, length, {d // 2}], got {tuple(codes.shape)}")
    hkv = codes.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot be grouped onto {hkv} KV heads")
    length = codes.shape[3]
    mask = None
    if attention_mask is not None:
        am = attention_mask[..., -1:, :length]  # the one query row
        mask = am.expand(b, am.shape[1], 1, length)[:, 0, 0, :]
    offset = float(1 << (spec.bits - 1)) if spec.symmetric else 0.0
    return torch.ops.hf_roste.packed_kv_attention(
        query.contiguous(), codes, scale, None if spec.symmetric else zero, mask, float(scaling), offset
    )
