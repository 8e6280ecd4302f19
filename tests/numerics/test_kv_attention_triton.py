"""Decode attention over the packed 4-bit KV cache (CUDA when present, else Triton's interpreter on
the CPU) vs the CPU path
(dequantize the whole cache, then SDPA).  The kernel computes in fp32 with another summation order,
so outputs agree to fp32 rounding (checked at 2e-6 relative), not bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hf_roste.modules.kv_store import KVStore, encode_kv  # noqa: E402
from hf_roste.numerics.kernels.kv_attention import (  # noqa: E402
    packed_kv_attention,
    packed_kv_attention_supported,
)
from hf_roste.numerics.spec import QuantSpec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton_on(monkeypatch):
    monkeypatch.setenv("HF_ROSTE_TRITON", "1")


def _attend(q, store: KVStore, spec, mask, scaling):
    """The kernel on DEVICE for a CPU store, back on the CPU."""
    codes, scale, zero = (None if t is None else t.to(DEVICE) for t in store.views())
    m = None if mask is None else mask.to(DEVICE)
    return packed_kv_attention(q.to(DEVICE), codes, scale, zero, spec, m, scaling).cpu()


def _store(spec: QuantSpec, b: int, hkv: int, length: int, d: int, seed: int, scale_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    store = KVStore(spec, d, scale_dtype)
    done = 0
    while done < length:  # several appends, like prefill then decode steps
        step = min(length - done, max(1, length // 3))
        kv = torch.randn(2, b, hkv, step, d, generator=g) * 2 + 0.5
        store.append(*encode_kv(kv, spec))
        done += step
    return store


def _reference(q, store: KVStore, mask, scaling):
    kv = store.decode()
    k, v = kv[0], kv[1]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("length", [1, 37, 130])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_decode_attention_matches_dequantize_then_sdpa(sym, hq, hkv, length, mask_kind):
    spec = QuantSpec(4, symmetric=sym, clip_ratio=0.95, granularity="token_head")
    b, d = 2, 16
    store = _store(spec, b, hkv, length, d, seed=length + hq)
    q = torch.randn(b, hq, 1, d, generator=torch.Generator().manual_seed(1))
    mask = None
    if mask_kind != "none":
        keep = torch.ones(b, 1, 1, length, dtype=torch.bool)
        keep[1, ..., : length // 2] = False  # left padding of the second row
        keep[..., -1] = True
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    got = _attend(q, store, spec, mask, d**-0.5)
    ref = _reference(q, store, mask, d**-0.5)
    assert got.shape == ref.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())


def test_fp16_scales_and_bf16_query():
    spec = QuantSpec(4, granularity="token_head")
    store = _store(spec, 1, 2, 40, 32, seed=3, scale_dtype=torch.float16)
    q = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(2))
    got = _attend(q.bfloat16(), store, spec, None, 32**-0.5)
    ref = _reference(q, store, None, 32**-0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2)


def test_unsupported_layouts_are_refused():
    spec = QuantSpec(4, granularity="token_head")
    assert not packed_kv_attention_supported(spec, 16, 2)  # prefill: the CPU path
    assert not packed_kv_attention_supported(QuantSpec(3, granularity="token_head"), 16, 1)
    assert not packed_kv_attention_supported(spec, 24, 1)
    store = _store(spec, 1, 2, 5, 16, seed=0)
    codes, scale, zero = store.views()
    with pytest.raises(ValueError, match="one query token"):
        packed_kv_attention(torch.randn(1, 2, 3, 16), codes, scale, zero, spec, None, 0.25)
    with pytest.raises(ValueError, match="grouped"):
        packed_kv_attention(torch.randn(1, 3, 1, 16), codes, scale, zero, spec, None, 0.25)
