"""The training kernels (fused fake quantization, online Hadamard) equal the PyTorch reference.

Without CUDA they run through Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, chosen
by conftest before triton is imported, and ``HF_ROSTE_TRITON=1``); with CUDA the same tests run the
compiled kernels on CUDA tensors against the PyTorch reference on CUDA. Sizes stay small: the
interpreter executes every program in numpy.
"""

from __future__ import annotations

import pytest
import torch

from hf_roste.numerics import QuantSpec, fake_quantize
from hf_roste.numerics.hadamard import _apply, hadamard_factorization, hadamard_transform, random_signs
from hf_roste.numerics.kernels import use_triton
from hf_roste.numerics.quantize import _fake_quant_fp32

pytest.importorskip("triton", reason="triton is in the dev extra; the kernel tests need it")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.setenv("HF_ROSTE_TRITON", "1")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(DEVICE)
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device("cpu")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-identical, NaN payloads aside (not part of the rule: torch writes different NaNs on CPU and CUDA)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    keep = ~want.isnan()
    assert torch.equal(_bits(got)[keep], _bits(want)[keep])


def _reference(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    out = _fake_quant_fp32(x, spec)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _edge_rows(cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random rows over 12 decades, plus every special case of the numerics docstring."""
    g = torch.Generator(device="cpu").manual_seed(cols)
    x = torch.randn(14, cols, generator=g, device="cpu") * torch.logspace(-6, 6, 14, device="cpu")[:, None]
    x[0] = 2.5  # constant row
    x[1] = -0.75  # negative constant row
    x[2] = 0.0  # all-zero row
    x[3, cols // 2] = 1e30  # one huge value
    x[4] = torch.arange(cols, dtype=torch.float32, device="cpu") * 0.5 - 3.0  # halves: rounding ties
    x[5, 1] = float("nan")
    x[6, 0] = float("inf")
    x[7, -1] = float("-inf")
    x[8] = torch.randn(cols, generator=g, device="cpu") * 1e-30  # subnormal-scale magnitudes
    x[9] = x[9].abs()  # range not containing 0 (zero point outside the grid)
    x[10] = -x[10].abs()
    x[11, :] = 0.0
    x[11, 0] = -1.0  # one nonzero value
    return x.to(device=DEVICE, dtype=dtype)


SPECS = [
    QuantSpec(bits, sym, clip, gran, gs)
    for bits in (2, 3, 4, 8)
    for sym in (False, True)
    for clip in (1.0, 0.9)
    for gran, gs in (("token", None), ("group", 8))
] + [QuantSpec(4, False, 0.37, "channel"), QuantSpec(4, True, 0.37, "token_head"), QuantSpec(3, False, 1.0, "group", 5)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_fake_quant_kernel_bit_identical_fp32(spec):
    cols = 40  # not a multiple of the kernel block (64); 5 groups of 8, 8 groups of 5
    x = _edge_rows(cols)
    got = fake_quantize(x, spec)
    want = _reference(x, spec)
    assert want.isnan().any()  # the non-finite rows are part of the comparison
    _assert_same(got, want)


def test_fake_quant_kernel_multi_block_rows():
    """Rows longer than one block (4096 columns per iteration): the statistics span several iterations."""
    spec = QuantSpec(4, False, 1.0, "token")
    x = torch.randn(2, 4096 + 37)
    x[1, 4100] = 50.0
    _assert_same(fake_quantize(x, spec), _reference(x, spec))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", [QuantSpec(4, False), QuantSpec(8, True, 0.9), QuantSpec(2, False, 1.0, "group", 4)],
                         ids=str)
def test_fake_quant_kernel_bit_identical_half_inputs(spec, dtype):
    x = _edge_rows(24)
    x = x.clamp(-6e4, 6e4).to(dtype) if dtype == torch.float16 else x.to(dtype)
    got = fake_quantize(x, spec)
    want = _reference(x, spec)
    assert got.dtype == dtype and want.isnan().any()
    _assert_same(got, want)


def test_fake_quant_kernel_nonfinite_rows_are_nan_and_isolated():
    spec = QuantSpec(4, False)
    x = _edge_rows(16)
    out = fake_quantize(x, spec)
    assert out[5:8].isnan().all()
    assert out[:5].isfinite().all() and out[8:].isfinite().all()


def test_fake_quant_kernel_gradient_is_straight_through():
    spec = QuantSpec(3, False, 0.8, "token")
    x = (torch.randn(3, 4, 20) * 3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(3, 4, 20)
    fake_quantize(x, spec).backward(g)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ROSTE_TRITON", "0")
        y = fake_quantize(x_ref, spec)
        y.backward(g)
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(x.grad, g)


def test_fake_quant_kernel_non_contiguous_input():
    """K/V arrive as transposed views ``[b, heads, seq, head_dim]``."""
    spec = QuantSpec(4, False, 1.0, "token_head")
    kv = torch.randn(2, 5, 3, 16).transpose(1, 2)
    assert torch.equal(fake_quantize(kv, spec), _reference(kv, spec))


def test_fake_quant_kernel_rejects_what_it_does_not_handle():
    from hf_roste.numerics.kernels.fake_quant import triton_fake_quantize

    with pytest.raises(ValueError, match="row-wise/group"):
        triton_fake_quantize(torch.randn(3, 8), QuantSpec(4, granularity="tensor"))
    with pytest.raises(ValueError, match="must divide"):
        triton_fake_quantize(torch.randn(3, 10), QuantSpec(4, granularity="group", group_size=4))


def test_per_tensor_spec_falls_back_to_reference():
    spec = QuantSpec(4, False, 1.0, "tensor")
    x = torch.randn(4, 8)
    assert torch.equal(fake_quantize(x, spec), _reference(x, spec))


# ------------------------------------------------------------------ online Hadamard

@pytest.mark.parametrize("n", [2, 16, 24, 112, 128, 304, 4864])
@pytest.mark.parametrize("transpose", [False, True])
def test_hadamard_kernel_matches_reference(n, transpose):
    m, k = hadamard_factorization(n)
    x = torch.randn(3, 2, n)
    got = hadamard_transform(x, transpose=transpose)
    want = _apply(x, m, k, None, transpose)
    # butterflies add in another order than the block products: equal up to fp32 rounding (log2 n adds)
    assert (got - want).abs().max() <= 4e-7 * max(1, k) ** 0.5 * want.abs().max()
    back = hadamard_transform(got, transpose=not transpose)
    assert torch.allclose(back, x, atol=1e-5)


def test_hadamard_kernel_with_signs_and_gradient():
    n = 96
    s = random_signs(n, 7)
    x = torch.randn(4, n, requires_grad=True)
    y = hadamard_transform(x, s)
    m, k = hadamard_factorization(n)
    assert torch.allclose(y, _apply(x.detach(), m, k, s, False), atol=1e-6)
    g = torch.randn(4, n)
    y.backward(g)
    assert torch.allclose(x.grad, _apply(g, m, k, s, True), atol=1e-6)


def test_hadamard_kernel_bf16_rounds_once():
    n = 304
    m, k = hadamard_factorization(n)
    x = torch.randn(5, n).to(torch.bfloat16)
    got = hadamard_transform(x)
    want = _apply(x, m, k, None, False)
    assert got.dtype == torch.bfloat16
    # both accumulate in fp32 and round once; they may differ by one bf16 ulp where fp32 results straddle a tie
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp(min=1e-3)
    assert ((got.float() - want.float()).abs() <= ulp).all()


def test_hadamard_kernel_is_used_not_bypassed(monkeypatch):
    """With HF_ROSTE_TRITON=1 the transform really goes through the kernel launcher."""
    import hf_roste.numerics.hadamard as kh

    calls = []
    original = kh.triton_hadamard_transform
    monkeypatch.setattr(kh, "triton_hadamard_transform", lambda *a, **kw: calls.append(a[1:3]) or original(*a, **kw))
    hadamard_transform(torch.randn(2, 112))
    assert calls == [hadamard_factorization(112)]


def test_fake_quant_kernel_is_used_not_bypassed(monkeypatch):
    import importlib

    kf = importlib.import_module("hf_roste.numerics.quantize")  # the attribute `quantize` is the function

    calls = []
    original = kf.triton_fake_quantize
    monkeypatch.setattr(kf, "triton_fake_quantize", lambda x, spec, *a: calls.append(spec) or original(x, spec, *a))
    spec = QuantSpec(4, False)
    fake_quantize(torch.randn(2, 8), spec)
    assert calls == [spec]


def test_qat_linear_under_autocast_quantizes_straight_into_bf16(monkeypatch):
    """Kernel path under bf16 autocast: the fp32 activation is quantized directly into bf16 (no fp32 copy for the
    matmul to cast); output and gradients equal the PyTorch path, where autocast casts the fp32 result."""
    from hf_roste.modules.qat_linear import QATLinear

    def run(triton: str):
        monkeypatch.setenv("HF_ROSTE_TRITON", triton)
        torch.manual_seed(0)
        # no online R4 here: the butterfly Hadamard equals the PyTorch one only up to fp32 rounding
        lin = QATLinear(32, 8, weight_spec=QuantSpec(4, False, 1.0, "channel"), act_spec=QuantSpec(4, False)).train()
        x = torch.randn(3, 5, 32, requires_grad=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            q = lin.quantize_input(x)
            y = lin(x)
        y.float().square().sum().backward()
        return q, y, x.grad, lin.weight.grad

    q_k, y_k, gx_k, gw_k = run("1")
    q_r, y_r, gx_r, gw_r = run("0")
    assert q_k.dtype == torch.bfloat16 and q_r.dtype == torch.float32
    assert torch.equal(q_k, q_r.to(torch.bfloat16))
    assert torch.equal(y_k, y_r)
    assert torch.equal(gx_k, gx_r) and torch.equal(gw_k, gw_r)
