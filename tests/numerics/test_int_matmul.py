"""Integer GEMM with zero-point corrections vs the fake-quant reference.

Tolerance rationale.  The integer kernel computes the integer sum ``T = sum (cx-zx)(cw-zw)``
exactly and rounds only in the final rescale: ``T -> fp32`` (exact below 2^24), ``* s_w``,
``+=`` over G groups, ``* s_x``, ``+ bias``.  The fake-quant operands ``x_hat = fl((c-z)*s)``
themselves carry a half-ulp rounding each.  Against an fp64 evaluation of
``F.linear(x_hat, w_hat, b)`` the kernel is therefore within ``(G + 6) * eps32 * M`` where
``M = |x_hat| @ |w_hat|^T + |b|`` (the worst-case sum of magnitudes).  The fp32 reference itself
differs from fp64 by up to ``~K * eps32 * M`` (accumulation order), so we compare with the fp64
reference: a much tighter check than the fp32 tolerance, and any wrong correction term gives an
error of order ``M``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_roste.numerics import int_matmul as im
from hf_roste.numerics import onednn as dnn
from hf_roste.numerics.int_matmul import int8_matmul, int_linear, prepare_int_weight
from hf_roste.numerics.quantize import fake_quantize, quantize
from hf_roste.numerics.spec import QuantSpec

EPS32 = torch.finfo(torch.float32).eps


def _wspec(bits: int, sym: bool, gran: str, gs: int = 32) -> QuantSpec:
    return QuantSpec(bits, symmetric=sym, granularity=gran, group_size=gs if gran == "group" else None)


def _check(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, wspec: QuantSpec, aspec: QuantSpec):
    iw = prepare_int_weight(*quantize(w, wspec), wspec)
    y = int_linear(x, iw, aspec, b)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    xh = fake_quantize(x.float(), aspec).double()
    wh = fake_quantize(w, wspec).double()
    bd = None if b is None else b.double()
    ref64 = F.linear(xh, wh, bd)
    mag = F.linear(xh.abs(), wh.abs(), None if b is None else bd.abs())
    groups = wspec.num_groups(w.shape[1])
    if x.dtype == torch.float32:
        tol = (groups + 6) * EPS32 * mag + 1e-30
    else:  # one final rounding to the 8/11-bit mantissa of bf16/fp16
        tol = torch.finfo(x.dtype).eps * ref64.abs() + (groups + 6) * EPS32 * mag + 1e-30
    err = (y.double() - ref64).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item()} tol {tol.min().item()}"
    # and the plain fp32 reference the brief names, within fp32 accumulation tolerance (K*eps*M)
    ref32 = F.linear(fake_quantize(x.float(), aspec), fake_quantize(w, wspec), b)
    tol32 = (w.shape[1] + groups + 6) * EPS32 * mag + (tol if x.dtype != torch.float32 else 0)
    assert bool(((y.double() - ref32.double()).abs() <= tol32).all())
    return y, iw


@pytest.mark.parametrize("wbits", [2, 3, 4, 8])
@pytest.mark.parametrize("wsym", [False, True])
@pytest.mark.parametrize("gran", ["channel", "group"])
@pytest.mark.parametrize("abits", [4, 8])
@pytest.mark.parametrize("asym", [False, True])
def test_matches_fake_quant_reference(wbits, wsym, gran, abits, asym):
    g = torch.Generator().manual_seed(wbits * 100 + abits + 7 * wsym + 3 * asym)
    w = torch.randn(40, 96, generator=g)
    b = torch.randn(40, generator=g)
    x = torch.randn(3, 7, 96, generator=g) + 0.3
    _check(x, w, b, _wspec(wbits, wsym, gran), QuantSpec(abits, symmetric=asym))


@pytest.mark.parametrize("shape", [(1, 96), (3, 7, 96), (0, 96), (2, 0, 96)])
def test_batch_shapes(shape):
    w = torch.randn(40, 96)
    wspec, aspec = _wspec(4, False, "channel"), QuantSpec(4)
    iw = prepare_int_weight(*quantize(w, wspec), wspec)
    x = torch.randn(shape)
    y = int_linear(x, iw, aspec, torch.randn(40))
    assert y.shape == (*shape[:-1], 40)
    if x.numel():
        _check(x, w, None, wspec, aspec)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gran", ["channel", "group"])
def test_half_inputs(dtype, gran):
    w = torch.randn(40, 96)
    x = torch.randn(5, 96).to(dtype)
    _check(x, w, torch.randn(40), _wspec(4, False, gran), QuantSpec(4))


def test_uncentred_weight_and_far_zero_points_use_exact_path():
    # rows with a large positive offset: zw ~ -1500 so cw - zw does not fit int8 (correction path);
    # all-positive activations: zx ~ -1500 so the bound forces fp64 corrections.
    w = torch.rand(40, 96) + 100.0
    x = torch.rand(4, 96) + 100.0
    wspec = _wspec(4, False, "channel")
    _, iw = _check(x, w, None, wspec, QuantSpec(4))
    assert iw.zero is not None and iw.max_abs_zero > 127
    _, iw8 = _check(x, w, None, _wspec(8, False, "group"), QuantSpec(8))
    assert iw8.zero is not None
    _, iwc = _check(torch.randn(4, 96), torch.randn(40, 96), None, wspec, QuantSpec(4))
    assert iwc.zero is None  # ordinary 4-bit weights are stored centred


@pytest.mark.parametrize("rows", [4, 300])
def test_grouped_row_tiled_path(rows):
    # 300 rows x 3 groups > block-diagonal limit: per-group products tiled over 128-row blocks
    x, w = torch.randn(rows, 96), torch.randn(24, 96)
    for aspec in (QuantSpec(4), QuantSpec(4, symmetric=True), QuantSpec(8)):
        _check(x, w, torch.randn(24), _wspec(4, True, "group"), aspec)


def test_wide_8bit_products_use_fp64_rescale():
    # K * 128 * 128 >= 2^24: the int32 sums are not exactly representable in fp32
    x, w = torch.randn(5, 2048), torch.randn(8, 2048)
    _check(x, w, None, _wspec(8, True, "channel"), QuantSpec(8, symmetric=True))
    _check(x, w, None, QuantSpec(8, symmetric=True, granularity="group", group_size=1024),
           QuantSpec(8, symmetric=True))


@pytest.mark.parametrize("wsym", [False, True])
@pytest.mark.parametrize("gran,rows", [("channel", 10), ("group", 300)])
def test_onednn_and_int_mm_routes_agree(monkeypatch, onednn_on, wsym, gran, rows):
    g = torch.Generator().manual_seed(11)
    x, w, b = torch.randn(2, rows // 2, 96, generator=g), torch.randn(40, 96, generator=g), torch.randn(40)
    wspec = _wspec(4, wsym, gran)
    y1, iw = _check(x, w, b, wspec, QuantSpec(4))
    monkeypatch.setattr(im, "_ONEDNN_ENABLED", False)
    y2, _ = _check(x, w, b, wspec, QuantSpec(4))
    # both are exact in the integer part; they may differ by the rounding of the final rescale
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    if iw.onednn_packed is None:
        pytest.skip("oneDNN int8 prepack not available in this torch build")


def test_nan_token_only_poisons_its_row():
    w = torch.randn(8, 32)
    wspec = _wspec(4, True, "channel")
    iw = prepare_int_weight(*quantize(w, wspec), wspec)
    x = torch.randn(3, 32)
    x[1, 5] = float("nan")
    y = int_linear(x, iw, QuantSpec(4))
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_int8_matmul_overflow_chunks_and_fallback(monkeypatch):
    k = 140_000  # k * 128 * 128 > 2^31: chunked, int64 result
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((3, k), -128, dtype=torch.int8)
    out = int8_matmul(a, b.t())
    assert out.dtype == torch.int64 and bool((out == k * 16384).all())
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 77), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (9, 77), dtype=torch.int8, generator=g)
    exact = a.long() @ b.long().t()
    assert torch.equal(int8_matmul(a, b.t()).long(), exact)
    monkeypatch.setattr(im, "_int_mm_ok", lambda *args: False)  # exact float fallback
    assert torch.equal(int8_matmul(a, b.t()).long(), exact)
    x, w = torch.randn(3, 96), torch.randn(40, 96)
    _check(x, w, torch.randn(40), _wspec(4, False, "group"), QuantSpec(4))


def test_errors():
    w = torch.randn(8, 32)
    wspec = _wspec(4, False, "channel")
    iw = prepare_int_weight(*quantize(w, wspec), wspec)
    with pytest.raises(ValueError, match="in_features=32"):
        int_linear(torch.randn(2, 31), iw, QuantSpec(4))
    with pytest.raises(TypeError, match="x must be float32"):
        int_linear(torch.ones(2, 32, dtype=torch.int32), iw, QuantSpec(4))
    with pytest.raises(ValueError, match="granularity"):
        int_linear(torch.randn(2, 32), iw, QuantSpec(4, granularity="group", group_size=8))
    with pytest.raises(ValueError, match="bits"):
        int_linear(torch.randn(2, 32), iw, QuantSpec(16))
    with pytest.raises(ValueError, match="bias"):
        int_linear(torch.randn(2, 32), iw, QuantSpec(4), torch.randn(7))
    with pytest.raises(TypeError, match="IntWeight"):
        int_linear(torch.randn(2, 32), w, QuantSpec(4))
    codes, s, z = quantize(w, wspec)
    with pytest.raises(TypeError, match="uint8"):
        prepare_int_weight(codes.to(torch.int8), s, z, wspec)
    with pytest.raises(ValueError, match="granularity"):
        prepare_int_weight(codes, s, z, QuantSpec(4, granularity="tensor"))
    with pytest.raises(ValueError, match="shape"):
        prepare_int_weight(codes, s[:4], z[:4], wspec)
    with pytest.raises(TypeError, match="int8 operands"):
        int8_matmul(codes, codes.t())
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        int8_matmul(codes.view(torch.int8), codes.view(torch.int8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m", [1, 16, 17, 64])
def test_cuda_matches_cpu(m):
    w = torch.randn(64, 128)
    wspec = _wspec(4, False, "group", 64)
    x = torch.randn(m, 128)
    iw_c = prepare_int_weight(*quantize(w, wspec), wspec)
    iw_g = prepare_int_weight(*quantize(w.cuda(), wspec), wspec)
    y_c = int_linear(x, iw_c, QuantSpec(4))
    y_g = int_linear(x.cuda(), iw_g, QuantSpec(4)).cpu()
    torch.testing.assert_close(y_g, y_c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_activation_fast_path_equals_the_quantize_route(bits, sym, dtype):
    """The direct int8 route of quantize_activation gives exactly what quantize() + centring gives."""
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(3, 5, 96, generator=g) * torch.rand(3, 5, 1, generator=g) * 3).to(dtype)
    x[1, 2] += 40.0  # a token far from 0 (large zero point): may need the uncentred route
    spec = QuantSpec(bits, symmetric=sym, granularity="token")
    act = im.quantize_activation(x, spec)
    codes, s, z = quantize(x.reshape(-1, 96), spec)
    a, zx, max_a, zmax = im._act_codes(codes, z.reshape(-1), spec)
    assert torch.equal(act.a, a) and torch.equal(act.sx, s.reshape(-1, 1))
    assert (act.zx_eff is None) == (zx is None) and (zx is None or torch.equal(act.zx_eff, zx))
    assert (act.max_a, act.zmax, act.lead) == (max_a, zmax, (3, 5))
    # and with a constant token (general rule) the two routes still agree
    x[0, 0] = 1.5
    act = im.quantize_activation(x, spec)
    codes, s, z = quantize(x.reshape(-1, 96), spec)
    assert torch.equal(act.a, im._act_codes(codes, z.reshape(-1), spec)[0])


@pytest.mark.parametrize("value,expected", [("int_mm", False), ("INT_MM ", False), ("onednn", None)])
def test_int8_kernel_env_choice(monkeypatch, value, expected):
    """HF_ROSTE_INT8_KERNEL picks the CPU route; with int_mm no oneDNN copy is made and the codes stay."""
    monkeypatch.setenv(dnn.INT8_KERNEL_ENV, value)
    dnn.onednn_int8_enabled.cache_clear()
    try:
        has_op = hasattr(torch.ops.onednn, "qlinear_prepack")
        assert dnn.onednn_int8_enabled() is (has_op if expected is None else expected)
        wspec = _wspec(4, True, "channel")
        w = torch.randn(24, 64)
        iw = prepare_int_weight(*quantize(w, wspec), wspec)
        assert (iw.onednn_packed is not None) is dnn.onednn_int8_enabled()
        if iw.onednn_packed is None:
            assert iw._codes is not None and iw.nbytes == 24 * 64
    finally:
        dnn.onednn_int8_enabled.cache_clear()


def test_int8_kernel_env_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv(dnn.INT8_KERNEL_ENV, "cutlass")
    dnn.onednn_int8_enabled.cache_clear()
    try:
        with pytest.raises(ValueError, match="HF_ROSTE_INT8_KERNEL='cutlass'.*auto"):
            dnn.onednn_int8_enabled()
    finally:
        dnn.onednn_int8_enabled.cache_clear()


@pytest.mark.parametrize("t_dnn,expected", [(1.1, True), (2.0, False)])
def test_int8_kernel_auto_probe_keeps_onednn_only_when_not_slower(monkeypatch, t_dnn, expected):
    """auto: _int_mm timed first, oneDNN second; oneDNN kept only within 1.25x of _int_mm."""
    if not hasattr(torch.ops.onednn, "qlinear_prepack"):
        pytest.skip("oneDNN int8 ops are not in this torch build")
    monkeypatch.delenv(dnn.INT8_KERNEL_ENV, raising=False)
    times = iter([1.0, t_dnn])
    monkeypatch.setattr(dnn, "_time_best", lambda fn, reps=2: (fn(), next(times))[1])
    dnn.onednn_int8_enabled.cache_clear()
    try:
        assert dnn.onednn_int8_enabled() is expected
    finally:
        dnn.onednn_int8_enabled.cache_clear()


@pytest.mark.parametrize("m,n", [(1, 1), (5, 7), (300, 16)])
def test_int8_matmul_with_a_single_input_feature_is_exact(m, n):
    # torch._int_mm on CPU returns uninitialised values for K == 1 (contiguous operands)
    g = torch.Generator().manual_seed(m + n)
    a = torch.randint(-128, 128, (m, 1), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, 1), dtype=torch.int8, generator=g)
    for b_t in (b.t(), b.t().contiguous()):
        assert torch.equal(int8_matmul(a, b_t).long(), a.long() @ b.long().t())
    x, w = torch.randn(m, 1, generator=g), torch.randn(n, 1, generator=g)
    _check(x, w, None, _wspec(4, True, "channel"), QuantSpec(4, symmetric=False))
