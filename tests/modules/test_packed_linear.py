"""PackedLinear: packing round trip, integer forward, lazy kernel cache and state_dict behaviour.

Forward tolerance: see tests/numerics/test_int_matmul.py (the integer sum is exact; only the final
fp32 rescale rounds), so against the fp32 fake-quant reference we allow ``(K + G + 6) * eps32 * M``
with ``M = |x_hat| @ |w_hat|^T + |b|``.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from hf_roste.modules.packed_linear import PackedLinear
from hf_roste.numerics import QuantSpec, fake_quantize, packed_length

EPS32 = torch.finfo(torch.float32).eps


def _wspec(bits: int, sym: bool, gran: str) -> QuantSpec:
    return QuantSpec(bits, symmetric=sym, granularity=gran, group_size=32 if gran == "group" else None)


def _assert_matches(layer: PackedLinear, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    xh = fake_quantize(x.float(), layer.act_spec)
    wh = fake_quantize(w, layer.weight_spec)
    ref = F.linear(xh, wh, b)
    mag = F.linear(xh.abs(), wh.abs(), None if b is None else b.abs())
    groups = layer.weight_spec.num_groups(w.shape[1])
    tol = (w.shape[1] + groups + 6) * EPS32 * mag + 1e-30
    if x.dtype != torch.float32:
        tol = tol + torch.finfo(x.dtype).eps * ref.abs()
    assert bool(((y.float() - ref).abs() <= tol).all())


@pytest.mark.parametrize("wbits", [2, 3, 4, 8])
@pytest.mark.parametrize("wsym", [False, True])
@pytest.mark.parametrize("gran", ["channel", "group"])
def test_from_float_forward_and_dequantized_weight(wbits, wsym, gran):
    g = torch.Generator().manual_seed(wbits + 10 * wsym)
    w, b = torch.randn(40, 96, generator=g), torch.randn(40, generator=g)
    wspec = _wspec(wbits, wsym, gran)
    layer = PackedLinear.from_float(w, b, wspec, QuantSpec(4))
    assert layer.weight_packed.dtype == torch.uint8
    assert layer.weight_packed.shape == (40, packed_length(96, wbits))
    assert layer.weight_scale.shape == (40, wspec.num_groups(96)) == layer.weight_zero_point.shape
    assert torch.equal(layer.dequantized_weight(torch.float32), fake_quantize(w, wspec))
    assert layer.dequantized_weight(torch.bfloat16).dtype == torch.bfloat16
    for shape in [(1, 96), (3, 7, 96)]:
        _assert_matches(layer, torch.randn(shape, generator=g), w, b)
    assert layer(torch.randn(0, 96)).shape == (0, 40)
    _assert_matches(layer, torch.randn(4, 96, generator=g).bfloat16(), w, b)


@pytest.mark.parametrize("abits,asym", [(8, False), (8, True), (4, True)])
def test_activation_variants_and_no_bias(abits, asym):
    w = torch.randn(40, 96)
    layer = PackedLinear.from_float(w, None, _wspec(4, False, "group"), QuantSpec(abits, symmetric=asym))
    assert layer.bias is None
    _assert_matches(layer, torch.randn(3, 96), w, None)


def test_weight_only_mode_caches_dequantized_weight():
    w, b = torch.randn(40, 96), torch.randn(40)
    layer = PackedLinear.from_float(w, b, _wspec(4, True, "channel"), QuantSpec(16))
    x = torch.randn(5, 96)
    torch.testing.assert_close(layer(x), F.linear(x, fake_quantize(w, layer.weight_spec), b))
    first = layer._cache
    layer(x)
    assert layer._cache is first  # not rebuilt per call
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16


def test_kernel_cache_is_lazy_reused_and_not_in_state_dict():
    w, b = torch.randn(40, 96), torch.randn(40)
    layer = PackedLinear.from_float(w, b, _wspec(4, False, "channel"), QuantSpec(4))
    assert layer._cache is None  # nothing built before the first forward
    layer(torch.randn(2, 96))
    kw = layer.kernel_weight()
    layer(torch.randn(2, 96))
    assert layer.kernel_weight() is kw
    sd = layer.state_dict()
    assert set(sd) == {"weight_packed", "weight_scale", "weight_zero_point", "bias", "weight"}
    # `weight` is only the empty marker that makes RoSTE-unaware loaders fail on its shape
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].numel() == 0
    layer.invalidate_cache()
    assert layer.kernel_weight() is not kw


@pytest.mark.parametrize("wsym", [False, True])
def test_state_dict_round_trip_and_stale_cache(wsym):
    wspec, aspec = _wspec(4, wsym, "group"), QuantSpec(4)
    w1, b1 = torch.randn(40, 96), torch.randn(40)
    w2, b2 = torch.randn(40, 96) * 3, torch.randn(40)
    src1 = PackedLinear.from_float(w1, b1, wspec, aspec)
    src2 = PackedLinear.from_float(w2, b2, wspec, aspec)
    x = torch.randn(3, 96)

    dst = PackedLinear(96, 40, wspec, aspec)
    dst.load_state_dict(src1.state_dict())
    assert torch.equal(dst(x), src1(x))  # cache built from src1's weights

    dst.load_state_dict(src2.state_dict())  # in-place copy into the same buffers
    assert torch.equal(dst(x), src2(x)), "stale kernel cache after load_state_dict"
    assert torch.equal(dst.dequantized_weight(), fake_quantize(w2, wspec))

    with torch.no_grad():  # any in-place write to the packed buffer also invalidates
        dst.weight_packed.copy_(src1.weight_packed)
        dst.weight_scale.copy_(src1.weight_scale)
        dst.weight_zero_point.copy_(src1.weight_zero_point)
        dst.bias.copy_(src1.bias)
    assert torch.equal(dst(x), src1(x))


@pytest.mark.parametrize("gran", ["channel", "group"])
def test_deepcopy_and_pickle_after_forward(gran):
    layer = PackedLinear.from_float(torch.randn(40, 96), torch.randn(40), _wspec(4, True, gran), QuantSpec(4))
    x = torch.randn(3, 96)
    y = layer(x)  # cache populated (may hold an opaque oneDNN tensor)
    assert torch.equal(copy.deepcopy(layer)(x), y)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    assert torch.equal(layer(x), y)  # the original keeps working


def test_input_transform_is_applied_before_quantization():
    w = torch.randn(40, 96)
    h = torch.linalg.qr(torch.randn(96, 96))[0]
    layer = PackedLinear.from_float(w, None, _wspec(4, True, "channel"), QuantSpec(4),
                                    input_transform=lambda t: t @ h)
    x = torch.randn(3, 96)
    plain = PackedLinear.from_float(w, None, _wspec(4, True, "channel"), QuantSpec(4))
    assert torch.equal(layer(x), plain(x @ h))


def test_errors():
    w = torch.randn(8, 32)
    layer = PackedLinear.from_float(w, None, _wspec(4, False, "channel"), QuantSpec(4))
    with pytest.raises(ValueError, match="in_features=32"):
        layer(torch.randn(2, 16))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        layer(torch.ones(2, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="2-D float tensor"):
        PackedLinear.from_float(torch.ones(8, 32, dtype=torch.int32), None, _wspec(4, False, "channel"),
                                QuantSpec(4))
    with pytest.raises(ValueError, match="bias"):
        PackedLinear.from_float(w, torch.randn(7), _wspec(4, False, "channel"), QuantSpec(4))
    with pytest.raises(ValueError, match="weight_spec.bits"):
        PackedLinear(32, 8, QuantSpec(16, granularity="channel"), QuantSpec(4))
    with pytest.raises(ValueError, match="weight_spec.granularity"):
        PackedLinear(32, 8, QuantSpec(4, granularity="token"), QuantSpec(4))
    with pytest.raises(ValueError, match="act_spec.granularity"):
        PackedLinear(32, 8, _wspec(4, False, "channel"), QuantSpec(4, granularity="group", group_size=8))
    with pytest.raises(TypeError, match="act_spec must be a QuantSpec"):
        PackedLinear(32, 8, _wspec(4, False, "channel"), 4)
    with pytest.raises(ValueError, match="in_features"):
        PackedLinear(0, 8, _wspec(4, False, "channel"), QuantSpec(4))
    with pytest.raises(ValueError, match="group_size"):
        PackedLinear(30, 8, _wspec(4, False, "group"), QuantSpec(4))
    other = PackedLinear(32, 8, QuantSpec(4, granularity="group", group_size=8), QuantSpec(4))
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(layer.state_dict(), strict=False)


@pytest.mark.parametrize("wsym", [False, True])
def test_per_channel_kernel_keeps_one_int8_copy_and_rebuilds_on_demand(monkeypatch, onednn_on, wsym):
    """With oneDNN's pre-packed copy available, the per-channel kernel drops its second int8 copy;
    routes that need it (here: _int_mm forced) rebuild it from the packed buffer and agree exactly."""
    import hf_roste.numerics.int_matmul as im
    import hf_roste.numerics.onednn as dnn

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(48, 64, generator=g), torch.randn(5, 64, generator=g)
    # as if oneDNN were fast for this shape at small row counts (the per-weight timing decides otherwise)
    monkeypatch.setattr(dnn, "fast_at_small_m", lambda codes, packed: True)
    layer = PackedLinear.from_float(w, None, _wspec(4, wsym, "channel"), QuantSpec(4, granularity="token"))
    y_dnn = layer(x)
    kw = layer.kernel_weight()
    if kw.onednn_packed is None:
        pytest.skip("oneDNN int8 pre-packing is not available in this torch build")
    assert kw._codes is None and kw.nbytes == 0
    monkeypatch.setattr(im, "_ONEDNN_ENABLED", False)
    y_mm = layer(x)
    assert kw._codes is not None and kw.nbytes == 48 * 64
    assert torch.equal(kw.codes, im.prepare_int_weight(layer.weight_codes(), layer.weight_scale,
                                                       layer.weight_zero_point, layer.weight_spec).codes)
    assert torch.equal(y_dnn, y_mm)
    _assert_matches(layer, x, w, None)


@pytest.mark.parametrize("cast", ["to_bf16", "half", "double"])
def test_dtype_casts_keep_fp32_scales_and_zero_points(cast):
    """model.to(bfloat16) / .half() must not round the quantization parameters (the function would change)."""
    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(16, 32, generator=g), torch.randn(3, 32, generator=g)
    layer = PackedLinear.from_float(w, torch.randn(16, generator=g), _wspec(4, False, "channel"),
                                    QuantSpec(4, granularity="token"))
    scale, zero = layer.weight_scale.clone(), layer.weight_zero_point.clone()
    ref = layer(x)
    {"to_bf16": lambda: layer.to(torch.bfloat16), "half": layer.half, "double": layer.double}[cast]()
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert layer.weight_zero_point.dtype == torch.float32 and torch.equal(layer.weight_zero_point, zero)
    assert layer.weight_packed.dtype == torch.uint8
    assert layer.bias.dtype != torch.float32  # the bias does follow the model dtype
    if layer.bias.dtype != torch.float64:  # (the kernel takes fp32 / bf16 / fp16 inputs)
        y = layer(x.to(layer.bias.dtype))
        assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2)
    # a device move (here: to the same device) keeps everything usable
    layer.to("cpu")
    assert layer.weight_scale.dtype == torch.float32


@pytest.mark.parametrize("fast_small_m", [False, True])
def test_small_row_route_choice_keeps_results_identical(monkeypatch, onednn_on, fast_small_m):
    """Decode-sized inputs take _int_mm when oneDNN measured slow for the shape (codes then kept),
    larger inputs take oneDNN; every route gives the same numbers."""
    import hf_roste.numerics.int_matmul as im
    import hf_roste.numerics.onednn as dnn

    monkeypatch.setattr(dnn, "fast_at_small_m", lambda codes, packed: fast_small_m)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 96, generator=g)
    layer = PackedLinear.from_float(w, torch.randn(40, generator=g), _wspec(4, False, "channel"),
                                    QuantSpec(4, granularity="token"))
    outs = {m: layer(torch.randn(m, 96, generator=torch.Generator().manual_seed(m))) for m in (1, 16, 17, 40)}
    kw = layer.kernel_weight()
    if kw.onednn_packed is None:
        pytest.skip("oneDNN int8 pre-packing is not available in this torch build")
    assert kw.onednn_small_m is fast_small_m
    assert (kw._codes is None) is fast_small_m  # kept for the _int_mm route when decode uses it
    monkeypatch.setattr(im, "_ONEDNN_ENABLED", False)  # everything through _int_mm
    for m, y in outs.items():
        assert torch.equal(layer(torch.randn(m, 96, generator=torch.Generator().manual_seed(m))), y)
