"""Packed W4 Triton kernels vs the PyTorch integer path (on the CPU), bit for bit.

The kernels run on CUDA when a device is present (compiled), else on the CPU through Triton's
interpreter (conftest sets ``TRITON_INTERPRET=1`` on machines without CUDA).

Checked separately: activation codes / scales / zero points against ``quantize``, the int32
accumulators against ``int8_matmul`` of the reference layout, and the rescaled outputs against
``int_linear``; on random and edge inputs (constant rows, zero rows, NaN / Inf rows, rows far from
0, huge and tiny magnitudes), shapes that are not multiples of the blocks, odd K and M = 1.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hf_roste.numerics import pack_codes, quantize, to_unsigned  # noqa: E402
from hf_roste.numerics.int_matmul import int8_matmul, int_linear, prepare_int_weight  # noqa: E402
from hf_roste.numerics.kernels import packed_gemm as pg  # noqa: E402
from hf_roste.numerics.spec import QuantSpec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton_on(monkeypatch):
    monkeypatch.setenv("HF_ROSTE_TRITON", "1")


def _quant(x, spec):
    """The kernel's activation codes, back on the CPU."""
    act = pg.quantize_activation_triton(x.to(DEVICE), spec)
    return pg.TritonActivation(act.a.cpu(), act.sx.cpu(), act.zx.cpu(), act.lead, act.centred)


def _linear(x, spec, packed, scale, zero, wspec, k, bias, dtype):
    """The kernel's output for CPU inputs, run on DEVICE, back on the CPU."""
    pw = pg.prepare_packed_weight(packed.to(DEVICE), scale.to(DEVICE), zero.to(DEVICE), wspec, k)
    b = None if bias is None else bias.to(DEVICE)
    return pg.packed_linear_triton(pg.quantize_activation_triton(x.to(DEVICE), spec), pw, b, dtype).cpu()


def _edge_rows(k: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    rows = [
        torch.full((k,), 0.7),  # constant positive
        torch.full((k,), -2.0),  # constant negative
        torch.zeros(k),  # all zero
        torch.rand(k, generator=g) + 50.0,  # far from 0: zero point outside the code range
        torch.randn(k, generator=g) * 1e-30,  # tiny (subnormal range)
        torch.randn(k, generator=g) * 1e30,  # huge
        torch.arange(k, dtype=torch.float32) - k / 2,  # ties in the rounding
    ]
    nan_row = torch.randn(k, generator=g)
    nan_row[k // 2] = float("nan")
    inf_row = torch.randn(k, generator=g)
    inf_row[0] = float("inf")
    rows += [nan_row, inf_row]
    x = torch.stack(rows)
    if dtype == torch.bfloat16:
        x = x.clamp(-3e38, 3e38)
    return x.to(dtype)


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, False), (8, True), (3, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_codes_equal_quantize(bits, sym, dtype):
    spec = QuantSpec(bits, symmetric=sym, clip_ratio=0.95, granularity="token")
    k = 37  # not a multiple of any block
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(5, k, generator=g).to(dtype), _edge_rows(k, dtype)])
    act = _quant(x, spec)
    codes, scale, zero = quantize(x, spec)
    assert torch.equal(act.sx.isnan(), scale.view(-1).isnan())  # NaN / Inf rows: NaN scale
    finite = ~scale.view(-1).isnan()
    assert torch.equal(act.sx[finite], scale.view(-1)[finite])
    # recover the codes from the stored form: centred rows hold c - z, the others c (- 128 for 8 bits)
    a = act.a.to(torch.int32)
    zx = act.zx.to(torch.int32).unsqueeze(1)
    z = zero.view(-1, 1).to(torch.int32)
    centred = (z.abs() + spec.qmax <= 127) if not sym else torch.ones_like(zx, dtype=torch.bool)  # the rule
    shift = 128 if (bits == 8 and not sym) else 0
    recovered = torch.where(centred, a + (0 if sym else z), a + shift)
    assert torch.equal(recovered, codes.to(torch.int32))
    # non-centred rows carry their zero point (shifted like the codes)
    assert torch.equal(torch.where(centred, 0, z - shift).view(-1), act.zx.to(torch.int32))
    if not sym and bits == 4:
        assert bool((~centred).any())  # the far-from-0 row exercises the correction path


def _weight(n: int, k: int, spec: QuantSpec, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0] = 0.3  # constant row
    codes, scale, zero = quantize(w, spec)
    unsigned = to_unsigned(codes, spec) if spec.symmetric else codes
    packed = pack_codes(unsigned, 4)
    return codes, scale, zero, packed


@pytest.mark.parametrize("wsym", [False, True])
@pytest.mark.parametrize("gran", ["channel", "group"])
@pytest.mark.parametrize("m", [1, 3, 20])
def test_int32_accumulators_equal_reference(wsym, gran, m):
    k = 64 if gran == "group" else 45
    n = 19
    wspec = QuantSpec(4, symmetric=wsym, granularity=gran, group_size=32 if gran == "group" else None)
    aspec = QuantSpec(4, symmetric=True, granularity="token")
    codes, scale, zero, packed = _weight(n, k, wspec)
    pw = pg.prepare_packed_weight(packed.to(DEVICE), scale.to(DEVICE), zero.to(DEVICE), wspec, k)
    assert pw is not None
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=g)
    act = pg.quantize_activation_triton(x.to(DEVICE), aspec)
    # sw = 1, sx = 1: the kernel's output is the exact integer sum (small enough for fp32)
    ones = pg.PackedWeight(pw.packed, pw.zero, torch.ones_like(pw.scale), pw.colsum, k, n, pw.group_size)
    unit = pg.TritonActivation(act.a, torch.ones_like(act.sx), act.zx, act.lead, act.centred)
    got = pg.packed_linear_triton(unit, ones, None, torch.float32).cpu()
    act = pg.TritonActivation(act.a.cpu(), act.sx.cpu(), act.zx.cpu(), act.lead, act.centred)
    centred_w = codes.to(torch.int32) - (0 if wsym else zero.to(torch.int32).repeat_interleave(
        k // wspec.num_groups(k), dim=1))
    ref = int8_matmul(act.a, centred_w.to(torch.int8).t())
    assert torch.equal(got, ref.to(torch.float32))


@pytest.mark.parametrize("wsym,asym_act", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("gran", ["channel", "group"])
@pytest.mark.parametrize("m", [1, 2, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_outputs_equal_int_linear(wsym, asym_act, gran, m, bias):
    k = 96 if gran == "group" else 77
    n = 33
    wspec = QuantSpec(4, symmetric=wsym, clip_ratio=0.95, granularity=gran,
                      group_size=32 if gran == "group" else None)
    aspec = QuantSpec(4, symmetric=asym_act, clip_ratio=0.95, granularity="token")
    codes, scale, zero, packed = _weight(n, k, wspec, seed=5)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g) * 3
    if m > 2:
        x[1] += 4.0  # a row far from 0 (zero-point correction)
        x[2] = 0.25  # constant row
    b = torch.randn(n, generator=g) if bias else None
    ref = int_linear(x, prepare_int_weight(codes, scale, zero, wspec), aspec, b)
    got = _linear(x, aspec, packed, scale, zero, wspec, k, b, x.dtype)
    assert torch.equal(got, ref)


def test_bf16_output_and_leading_dims():
    k, n = 64, 24
    wspec = QuantSpec(4, granularity="channel")
    aspec = QuantSpec(4, granularity="token")
    codes, scale, zero, packed = _weight(n, k, wspec)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ref = int_linear(x, prepare_int_weight(codes, scale, zero, wspec), aspec, None)
    got = _linear(x, aspec, packed, scale, zero, wspec, k, None, x.dtype)
    assert got.shape == (2, 3, n) and got.dtype == torch.bfloat16
    assert torch.equal(got, ref)


def test_unsupported_weights_are_refused_or_declined():
    assert not pg.packed_weight_supported(QuantSpec(3, granularity="channel"), 64)
    assert not pg.packed_weight_supported(QuantSpec(4, granularity="group", group_size=16), 64)
    spec = QuantSpec(4, granularity="channel")
    w = torch.rand(4, 32) + 10.0  # every row far from 0: zero points beyond the int8 centring bound
    codes, scale, zero = quantize(w, spec)
    assert float(zero.abs().max()) > 112
    assert pg.prepare_packed_weight(pack_codes(codes, 4), scale, zero, spec, 32) is None
    with pytest.raises(ValueError, match="4-bit"):
        pg.prepare_packed_weight(pack_codes(codes, 4), scale, zero, QuantSpec(8, granularity="channel"), 32)
    with pytest.raises(ValueError, match="per-token"):
        pg.quantize_activation_triton(torch.randn(2, 8), QuantSpec(4, granularity="tensor"))
