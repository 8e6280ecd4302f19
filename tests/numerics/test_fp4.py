"""NVFP4 / MXFP4 numerics: bit for bit against compressed-tensors (and torchao for MXFP4), plus properties."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hf_roste.numerics import QuantSpec, fake_quantize, quantization_error, quantize
from hf_roste.numerics.fp4 import (
    E2M1_VALUES,
    FP4Spec,
    dequantize_fp4,
    e2m1_codes,
    e2m1_from_codes,
    fake_quantize_fp4,
    pack_fp4,
    quantize_fp4,
    round_to_e2m1,
    unpack_fp4,
)

ct_helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
from compressed_tensors.compressors.mx_utils import compress_mx_scale  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.quant_scheme import MXFP4, NVFP4  # noqa: E402
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4  # noqa: E402

PROPS = settings(max_examples=int(os.environ.get("HF_ROSTE_HYP_EXAMPLES", 60)), deadline=None)
NV, MX = FP4Spec("nvfp4"), FP4Spec("mxfp4")


# --------------------------------------------------------------------------- compressed-tensors references
def ct_nvfp4(w: torch.Tensor):
    """compressed-tensors' NVFP4 weight path: global scale, fp8 block scales, FP4 values, dequantized."""
    args = NVFP4["weights"]
    g = ct_helpers.generate_gparam(w.min(), w.max())
    blocks = w.reshape(*w.shape[:-1], -1, 16)
    scale, zp = ct_helpers.calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=g)
    q = ct_quantize(w, scale, zp, args, global_scale=g)
    return g, scale, q, ct_dequantize(q, scale, zp, args, global_scale=g)


def ct_mxfp4(w: torch.Tensor):
    """compressed-tensors' MXFP4 weight path: e8m0 block scales, FP4 values, dequantized."""
    args = MXFP4["weights"]
    blocks = w.reshape(*w.shape[:-1], -1, 32)
    scale, zp = ct_helpers.calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
    q = ct_quantize(w, scale, zp, args)
    return scale, q, ct_dequantize(q, scale, zp, args)


def assert_matches_ct(w: torch.Tensor) -> None:
    g, scale, q, dq = ct_nvfp4(w)
    r = quantize_fp4(w, NV)
    assert torch.equal(r.global_scale, g)
    assert torch.equal(r.block_scale.view(torch.uint8), scale.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(pack_fp4(r.codes), pack_fp4_to_uint8(q))
    ours = dequantize_fp4(r.codes, r.block_scale, r.global_scale, NV)
    assert torch.equal(ours.view(torch.int32), dq.view(torch.int32)) or torch.equal(ours, dq)
    assert torch.equal(fake_quantize(w, NV), ours)

    scale, q, dq = ct_mxfp4(w)
    r = quantize_fp4(w, MX)
    assert r.global_scale is None
    assert torch.equal(r.block_scale, compress_mx_scale(scale, torch.uint8))
    assert torch.equal(pack_fp4(r.codes), pack_fp4_to_uint8(q))
    ours = dequantize_fp4(r.codes, r.block_scale, None, MX)
    assert torch.equal(ours, dq)
    assert torch.equal(fake_quantize(w, MX), ours)


@st.composite
def weights(draw):
    """Adversarial fp32 matrices [rows, 64]: exact grid points and ties, zeros, wide magnitudes."""
    rows = draw(st.integers(1, 4))
    base = draw(hnp.arrays(np.float32, (rows, 64), elements=st.one_of(
        st.sampled_from([0.0, -0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -2.5, -5.0, 7.0]),
        st.floats(-8, 8, width=32),
    )))
    exp = draw(st.integers(-30, 30))
    return torch.from_numpy(base) * float(2.0**exp)


@PROPS
@given(weights())
def test_matches_compressed_tensors_bit_for_bit(w):
    assert_matches_ct(w)


@pytest.mark.parametrize("case", ["random", "zeros", "zero_block", "huge_one", "saturate", "tiny", "subnormal_scales",
                                  "fp32_subnormal_inputs", "wide_range"])
def test_edge_cases_match_compressed_tensors(case):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 64, generator=g)
    if case == "zeros":
        w = torch.zeros(3, 64)
    elif case == "zero_block":
        w[:, :32] = 0.0
    elif case == "huge_one":
        w[2, 5] = 1e6  # one huge value per block: the rest of that block rounds to 0
        w[4, 40] = -3e4
    elif case == "saturate":
        w = torch.full((2, 64), 2.9e38) * torch.sign(torch.randn(2, 64, generator=g))
        w[1] *= torch.rand(64, generator=g)
    elif case == "tiny":
        w = w * 1e-30
    elif case == "subnormal_scales":  # block maxima 1e-3..1e-5 of the tensor max: fp8 subnormal / zero scales
        w[1:] *= torch.logspace(-3, -6, 5).unsqueeze(1)
    elif case == "fp32_subnormal_inputs":
        w = w * 1e-40
    elif case == "wide_range":
        w = w * torch.logspace(-20, 20, 64)
    assert_matches_ct(w)


def test_mxfp4_matches_torchao_even_scales():
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("this torch has no float4_e2m1fn_x2")
    w = torch.randn(8, 128) * torch.logspace(-4, 4, 128)
    w[3, 7] = 1e5
    scale, data = mx.to_mx(w, torch.float4_e2m1fn_x2, 32, mx.ScaleCalculationMode.EVEN)
    r = quantize_fp4(w, MX)
    assert torch.equal(scale.view(torch.uint8).reshape(8, 4), r.block_scale)
    assert torch.equal(data.view(torch.uint8).reshape(8, 64), pack_fp4(r.codes))


# --------------------------------------------------------------------------- e2m1 grid
def test_round_to_e2m1_grid_ties_and_saturation():
    grid = torch.tensor(E2M1_VALUES)
    assert torch.equal(round_to_e2m1(grid), grid)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert round_to_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert round_to_e2m1(torch.tensor([6.5, 100.0, -1e30])).tolist() == [6.0, 6.0, -6.0]
    assert torch.signbit(round_to_e2m1(torch.tensor([-0.1]))).item()
    x = torch.linspace(-7, 7, 20001)
    assert torch.equal(round_to_e2m1(x), cast_to_fp4(x.clamp(-6, 6).clone()))


def test_codes_roundtrip_and_packing_layout():
    vals = torch.tensor([*E2M1_VALUES, *(-v for v in E2M1_VALUES)])
    codes = e2m1_codes(vals)
    assert codes.tolist() == list(range(16))
    assert torch.equal(e2m1_from_codes(codes), vals)
    packed = pack_fp4(codes.reshape(2, 8))
    assert torch.equal(unpack_fp4(packed, 8), codes.reshape(2, 8))
    assert torch.equal(unpack_fp4_from_uint8(packed, 2, 8, dtype=torch.float32), vals.reshape(2, 8))


# --------------------------------------------------------------------------- properties
@pytest.mark.parametrize("spec", [NV, MX, FP4Spec("nvfp4", "row")])
def test_dequantize_of_quantize_is_fake_quantize(spec):
    x = torch.randn(3, 5, 64) * 4
    r = quantize_fp4(x, spec)
    assert torch.equal(dequantize_fp4(r.codes, r.block_scale, r.global_scale, spec), fake_quantize_fp4(x, spec))
    assert quantization_error(x, spec).item() == pytest.approx(float((fake_quantize(x, spec) - x).square().sum()))


def test_row_global_scale_makes_rows_independent():
    spec = FP4Spec("nvfp4", "row")
    x = torch.randn(4, 32)
    x[0] *= 1e4
    full = fake_quantize(x, spec)
    for i in range(4):
        assert torch.equal(full[i], fake_quantize(x[i : i + 1], spec)[0])
    assert not torch.equal(fake_quantize(x, NV)[1:], full[1:])  # a tensor-wide global scale couples the rows


def test_straight_through_gradient_and_dtype():
    x = (torch.randn(2, 32) * 3).requires_grad_()
    y = fake_quantize(x, MX)
    g = torch.randn(2, 32)
    y.backward(g)
    assert torch.equal(x.grad, g)
    xb = torch.randn(2, 32, dtype=torch.bfloat16)
    out = fake_quantize(xb, NV)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fake_quantize(xb.float(), NV).to(torch.bfloat16))


def test_non_finite_block_is_isolated():
    x = torch.randn(2, 64)
    x[0, 3] = float("nan")
    out = fake_quantize(x, MX)
    assert torch.isnan(out[0, :32]).all() and torch.isfinite(out[0, 32:]).all() and torch.isfinite(out[1]).all()
    r = quantize_fp4(x, MX)
    assert r.block_scale[0, 0].item() == 255 and (r.codes[0, :32] == 0).all()


def test_clear_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        fake_quantize(torch.randn(2, 24), NV)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantization_error(torch.randn(2, 48), MX)
    with pytest.raises(TypeError, match="quantize_fp4"):
        quantize(torch.randn(2, 32), NV)
    with pytest.raises(ValueError, match="format"):
        FP4Spec("fp4")
    with pytest.raises(ValueError, match="nvfp4 only"):
        FP4Spec("mxfp4", "row")
    r = quantize_fp4(torch.randn(2, 32), NV)
    with pytest.raises(TypeError, match="global scale"):
        dequantize_fp4(r.codes, r.block_scale, None, NV)
    with pytest.raises(TypeError, match="e8m0"):
        dequantize_fp4(r.codes, r.block_scale[:, :1], None, MX)
    assert isinstance(QuantSpec(4), QuantSpec)  # the int spec is untouched
