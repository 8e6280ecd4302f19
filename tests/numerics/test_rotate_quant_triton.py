"""Fused online R4 + activation quantization (``rotate_quant``) against the unfused routes.

Two references:

* the unfused Triton route (Triton Hadamard kernel, then ``quantize_activation_triton``): the fused kernel
  adds in the same butterfly order and scales alike, so rotated values, codes, scales, zero points and the
  packed down_proj output are bit-identical;
* the PyTorch Hadamard (block matrix products, another summation order): rotated values agree to fp32
  rounding; codes may differ by one only at near-ties (counted, and each mismatch checked to be one), scales
  to one ulp of the row's max; the packed output within the bound those differences imply.

The kernels run on CUDA when present, else through Triton's interpreter (conftest).
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from hf_roste.modules import packed_linear as pl  # noqa: E402
from hf_roste.modules.packed_linear import PackedLinear, fused_r4_block  # noqa: E402
from hf_roste.numerics import hadamard as hadamard_module  # noqa: E402
from hf_roste.numerics.block_hadamard import r4_transform  # noqa: E402
from hf_roste.numerics.hadamard import hadamard_transform  # noqa: E402
from hf_roste.numerics.kernels import packed_gemm as pg  # noqa: E402
from hf_roste.numerics.kernels import rotate_quant as rq  # noqa: E402
from hf_roste.numerics.spec import QuantSpec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACT = [(4, False), (4, True), (8, False), (8, True)]


@pytest.fixture(autouse=True)
def _triton_on(monkeypatch):
    monkeypatch.setenv("HF_ROSTE_TRITON", "1")


@pytest.fixture
def pytorch_hadamard(monkeypatch):
    """The Hadamard's PyTorch path (block matrix products) instead of its Triton kernel."""
    monkeypatch.setattr(hadamard_module, "use_triton", lambda device: False)


def _spec(bits: int, sym: bool) -> QuantSpec:
    return QuantSpec(bits, symmetric=sym, clip_ratio=0.95, granularity="token")


def _rows(m: int, k: int, dtype: torch.dtype, seed: int = 0, edges: bool = True, block: int | None = None) -> torch.Tensor:
    """Random rows (heavy-tailed like activations) and, with ``edges``, the quantizer's edge rows (row 3:
    far from 0 once rotated by ``block``, so its zero point is outside the centred range)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).mul(4).add(0.1)
    x[:, :: max(1, k // 7)] *= 6.0  # outlier channels
    if edges and m >= 8:
        x[1] = 0.7  # constant: rotates to one spike per block
        x[2] = 0.0
        far = torch.rand(k, generator=g) + 50.0
        x[3] = r4_transform(far, block, transpose=True) if block else far
        x[4] *= 1e-30
        x[5] = float("nan") if k > 1 else 0.0
        x[5, 1:] = 1.0
        x[6, 0] = float("inf")
        x[7] = torch.arange(k, dtype=torch.float32) - k / 2
    if dtype == torch.float16:  # stay finite in fp16, keep the Inf row
        x = torch.where(x.isinf(), x, x.clamp(-6e4, 6e4))
    return x.to(dtype)


def _to_cpu(act: pg.TritonActivation) -> pg.TritonActivation:
    return pg.TritonActivation(act.a.cpu(), act.sx.cpu(), act.zx.cpu(), act.lead, act.centred)


def _fused(x, spec, block):
    act, rotated = rq.rotate_quantize_activation_triton(x.to(DEVICE), spec, block, return_rotated=True)
    return _to_cpu(act), rotated.cpu()


def _unfused(x, spec, block):
    """The unfused route: ``r4_transform`` (Triton or PyTorch Hadamard, per fixture), then the quantizer."""
    rotated = r4_transform(x.to(DEVICE), block)
    return _to_cpu(pg.quantize_activation_triton(rotated, spec)), rotated.float().cpu()


def _same_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


# --------------------------------------------------------------------------- vs the unfused Triton route
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block,k", [(16, 48), (32, 160), (128, 384), (64, 64)])  # (64, 64): full-size R4
@pytest.mark.parametrize("bits,sym", ACT)
def test_fused_equals_triton_hadamard_then_quantizer_bit_for_bit(dtype, block, k, bits, sym):
    spec = _spec(bits, sym)
    x = _rows(13, k, dtype, seed=block + bits, block=block)  # 13 rows: not a multiple of anything
    got, rot = _fused(x, spec, block)
    ref, ref_rot = _unfused(x, spec, block)
    assert _same_nan(rot, ref_rot)  # the values the quantizer sees, rounded to x's dtype alike
    assert torch.equal(got.a, ref.a) and torch.equal(got.zx, ref.zx) and _same_nan(got.sx, ref.sx)
    assert got.centred == ref.centred and got.lead == (13,)
    assert bool(got.sx.isnan()[5]) and bool(got.sx.isnan()[6])  # NaN / Inf rows: NaN scale (codes 0, stored as such)
    if not sym:
        assert bool((got.zx != 0).any())  # a row far from 0 exercises the non-centred storage


def test_fused_two_sweep_path_equals_one_sweep(monkeypatch):
    """Rows longer than ONE_PASS_MAX_FEATURES are swept twice (rotation recomputed): same results."""
    x = _rows(9, 384, torch.bfloat16, seed=3, block=16)
    for bits, sym in ACT:
        one, one_rot = _fused(x, _spec(bits, sym), 16)
        with monkeypatch.context() as mp:
            mp.setattr(rq, "ONE_PASS_MAX_FEATURES", 64)
            mp.setattr(rq, "_CHUNK", 64)
            assert rq._plan(384, 16)[:2] == (64, False)
            two, two_rot = _fused(x, _spec(bits, sym), 16)
        assert torch.equal(one.a, two.a) and torch.equal(one.zx, two.zx) and _same_nan(one.sx, two.sx)
        assert _same_nan(one_rot, two_rot)


def test_leading_dims_and_m1():
    x = _rows(6, 64, torch.float32, edges=False).view(2, 3, 64)
    act = rq.rotate_quantize_activation_triton(x.to(DEVICE), _spec(4, True), 32)
    assert act.lead == (2, 3) and act.a.shape == (6, 64)
    one = rq.rotate_quantize_activation_triton(x[1, 2].to(DEVICE), _spec(4, True), 32)
    assert one.lead == () and torch.equal(one.a.cpu(), act.a[5:6].cpu())


# --------------------------------------------------------------------------- vs the PyTorch Hadamard
def _eps(dtype: torch.dtype) -> float:
    """Spacing of ``dtype`` at 1 (a rotated value rounded to it moves by at most this, relative)."""
    return float(torch.finfo(dtype).eps)


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The larger spacing of ``dtype`` around each value of ``v`` (fp32)."""
    d = v.to(dtype)
    up = torch.nextafter(d, torch.full_like(d, float("inf"))).float() - d.float()
    down = d.float() - torch.nextafter(d, torch.full_like(d, float("-inf"))).float()
    return torch.maximum(up, down)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block,k", [(16, 1024), (32, 1024), (128, 1024), (1024, 1024)])
def test_rotation_equals_pytorch_r4_transform_to_rounding(pytorch_hadamard, dtype, block, k):
    x = _rows(24, k, dtype, seed=11, edges=False)
    _, rot = _fused(x, _spec(4, False), block)
    ref = r4_transform(x, block).float()  # PyTorch: fp32 block products, rounded to x's dtype
    row_max = ref.abs().amax(-1, keepdim=True)
    diff = (rot - ref).abs()
    # both sum a block's values in fp32 (different orders): within log2(block) fp32 ulps of the row's largest
    # value (a butterfly rounds once per stage)
    tol = math.log2(block) * _eps(torch.float32) * row_max
    if dtype == torch.float32:
        print(f"\nfp32 block {block}: max |fused - PyTorch| = {float((diff / row_max).max()) / _eps(torch.float32):.2f} "
              f"fp32 ulps of the row max")
        assert bool((diff <= tol).all()), float((diff / row_max).max())
        exact64 = r4_transform(x.double(), block)  # the exact rotation (float64 path)
        assert bool(((rot.double() - exact64).abs() <= tol.double()).all())
    else:
        # then both round to x's dtype: equal, or one ulp of the dtype apart (plus that fp32 difference) where
        # the fp32 value was within fp32 rounding of the dtype's rounding boundary
        assert bool((diff <= _ulp(ref, dtype) + tol).all())
        changed = int((diff > 0).sum())
        print(f"\n{dtype} block {block}: {changed} of {diff.numel()} rotated values differ (by one ulp of {dtype})")
        assert changed <= 1e-3 * diff.numel(), changed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [16, 32, 128])
@pytest.mark.parametrize("bits,sym", ACT)
def test_codes_equal_pytorch_hadamard_route_but_counted_near_ties(pytorch_hadamard, dtype, block, bits, sym):
    m, k = 48, 2 * 384 if block == 128 else 640
    spec = _spec(bits, sym)
    x = _rows(m, k, dtype, seed=block * 7 + bits + sym, block=block)
    got, rot = _fused(x, spec, block)
    ref, ref_rot = _unfused(x, spec, block)  # PyTorch Hadamard, then the (bit-exact) quantizer
    finite = ~ref.sx.isnan()
    assert torch.equal(got.sx.isnan(), ref.sx.isnan())
    # what the rotation may move a value by: fp32 rounding of the block sums (relative to the row's largest
    # value), then one ulp of x's dtype where the rounding to it flips
    amax = ref_rot[finite].abs().amax(-1, keepdim=True)
    dv_fp32 = math.log2(block) * _eps(torch.float32) * amax
    # (c) scales: moved at most by what moving the row's max and min moves (max - min) * clip / qmax
    s_ref, s_got = ref.sx[finite, None], got.sx[finite, None]
    ds = (s_got - s_ref).abs()
    ds_bound = 2 * spec.clip_ratio / spec.qmax * (dv_fp32 + _ulp(amax, dtype)) + 2 * _eps(torch.float32) * s_ref
    assert bool((ds <= ds_bound).all()), float((ds / ds_bound).max())
    assert torch.equal(got.zx, ref.zx)
    # (b) codes: off by one, only at near-ties of the reference (the value / scale within what those moves
    # can shift it of a rounding boundary), and few
    diff = (got.a.to(torch.int32) - ref.a.to(torch.int32))[finite]
    assert int(diff.abs().max()) <= 1
    v = ref_rot[finite]
    t = v / s_ref
    tie_dist = (t - t.floor() - 0.5).abs()
    tol = (dv_fp32 + _ulp(v, dtype)) / s_ref + t.abs() * ds / s_ref + 1e-6
    near = tie_dist <= tol
    bad = (diff != 0) & ~near
    assert not bool(bad.any()), (t[bad][:5], tol[bad][:5])
    # the quantizer is deterministic: a code differs only where its input value or its row's scale does
    moved = (rot[finite] != v) | (ds > 0)
    assert not bool(((diff != 0) & ~moved).any())
    mismatches = int((diff != 0).sum())
    assert mismatches <= 1e-3 * diff.numel(), mismatches
    print(f"\n{dtype} block {block} A{bits} {'sym' if sym else 'asym'}: {mismatches} codes differ, "
          f"{int(near.sum())} near-ties, {diff.numel()} codes")


# --------------------------------------------------------------------------- packed down_proj
def _down_proj(k: int, n: int, bits: int, sym: bool, gran: str, transform, seed: int = 0) -> PackedLinear:
    g = torch.Generator().manual_seed(seed)
    wspec = QuantSpec(4, symmetric=False, clip_ratio=0.95, granularity=gran, group_size=32 if gran == "group" else None)
    layer = PackedLinear.from_float(torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g),
                                    wspec, _spec(bits, sym), input_transform=transform)
    return layer.to(DEVICE)


def _count_fused(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = rq.rotate_quantize_activation_triton
    monkeypatch.setattr(rq, "rotate_quantize_activation_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [16, 32, 128, None])
@pytest.mark.parametrize("bits,sym", ACT)
@pytest.mark.parametrize("m", [1, 37])
def test_packed_down_proj_fused_route(monkeypatch, dtype, block, bits, sym, m):
    k = 256
    transform = hadamard_transform if block is None else functools.partial(r4_transform, block=block)
    layer = _down_proj(k, 40, bits, sym, "group" if bits == 4 else "channel", transform, seed=m)
    x = _rows(m, k, dtype, seed=m + bits, edges=False)
    if m > 3:
        x[2] += 3.0  # rotates to a far-from-0 spike per block
    xd = x.to(DEVICE)
    calls = _count_fused(monkeypatch)
    with torch.no_grad():
        fused = layer(xd).cpu()
    assert len(calls) == 1 and fused.dtype == dtype and fused.shape == (m, 40)
    # the unfused Triton route (Triton Hadamard kernel, then the quantizer): bit for bit
    with monkeypatch.context() as mp:
        mp.setattr(pl, "fused_r4_block", lambda transform, in_features: None)
        layer._fused_r4_memo = None
        with torch.no_grad():
            unfused = layer(xd).cpu()
    layer._fused_r4_memo = None
    assert len(calls) == 1 and torch.equal(fused, unfused)
    # the PyTorch route (PyTorch Hadamard, PyTorch integer GEMM): within what the differing codes (off by one
    # at near-ties) and scales (fp32 rounding of the row's max / min) can move the output
    monkeypatch.setenv("HF_ROSTE_TRITON", "0")
    with torch.no_grad():
        ref = layer(x.to(DEVICE)).cpu()
    monkeypatch.setenv("HF_ROSTE_TRITON", "1")
    monkeypatch.setattr(hadamard_module, "use_triton", lambda device: False)
    got_act, _ = _fused(x, layer.act_spec, block or k)
    ref_act, _ = _unfused(x, layer.act_spec, block or k)
    xq_got = (got_act.a.float() - got_act.zx.float()[:, None]) * got_act.sx[:, None]
    xq_ref = (ref_act.a.float() - ref_act.zx.float()[:, None]) * ref_act.sx[:, None]
    w = layer.dequantized_weight(torch.float32).cpu().abs()
    bound = ((xq_got - xq_ref).abs() @ w.t() + 8 * _eps(torch.float32) * (xq_ref.abs() @ w.t())
             + _eps(dtype) * ref.float().abs())
    # (the 8 eps32 term: the PyTorch integer path assembles the group sums in another order than the Triton
    # GEMM for some shapes, a few fp32 ulps even on identical codes)
    assert bool(((fused.float() - ref.float()).abs() <= bound).all())
    assert int((got_act.a != ref_act.a).sum()) <= max(1, 1e-3 * got_act.a.numel())


def test_fused_r4_block_recognises_the_r4_transforms():
    assert fused_r4_block(hadamard_transform, 128) == 128
    assert fused_r4_block(hadamard_transform, 8192) == 8192
    assert fused_r4_block(hadamard_transform, 16384) is None  # above the register kernel's block
    assert fused_r4_block(hadamard_transform, 160) is None  # 160 = 20 * 8: not a power of two
    assert fused_r4_block(functools.partial(r4_transform, block=16), 14336) == 16
    assert fused_r4_block(functools.partial(r4_transform, block=None), 256) == 256
    assert fused_r4_block(functools.partial(r4_transform, block=16, transpose=True), 64) is None
    assert fused_r4_block(lambda t: t, 64) is None
    assert fused_r4_block(None, 64) is None


def test_non_r4_transform_keeps_unfused_route(monkeypatch):
    h = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0]
    layer = _down_proj(64, 8, 4, False, "channel", lambda t: t @ h.to(t.device, t.dtype))
    calls = _count_fused(monkeypatch)
    x = torch.randn(3, 64).to(DEVICE)
    with torch.no_grad():
        got = layer(x).cpu()
    assert not calls
    act = _to_cpu(pg.quantize_activation_triton(x @ h.to(DEVICE), layer.act_spec))
    ref = pg.packed_linear_triton(act, pg.prepare_packed_weight(
        layer.weight_packed.cpu(), layer.weight_scale.cpu(), layer.weight_zero_point.cpu(), layer.weight_spec, 64),
        layer.bias.cpu(), torch.float32)
    assert torch.equal(got, ref)


def test_bad_blocks_and_specs_are_refused():
    x = torch.randn(2, 96).to(DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        rq.rotate_quantize_activation_triton(x, _spec(4, True), 48)
    with pytest.raises(ValueError, match="dividing the row"):
        rq.rotate_quantize_activation_triton(x, _spec(4, True), 64)
    with pytest.raises(ValueError, match="per-token"):
        rq.rotate_quantize_activation_triton(x, QuantSpec(4, granularity="tensor"), 32)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        rq.rotate_quantize_activation_triton(x.double(), _spec(4, True), 32)
    assert not rq.fused_r4_supported(2 * rq.MAX_FUSED_BLOCK, 4 * rq.MAX_FUSED_BLOCK)
    assert not rq.fused_r4_supported(True, 64)


# --------------------------------------------------------------------------- CUDA compilation on the CPU
_AOT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from hf_roste.numerics.kernels import fake_quant as fq, hadamard, kv_attention as kva
    from hf_roste.numerics.kernels import packed_gemm as pg, rotate_quant as rq

    def build(fn, sig, consts, warps=4):
        sig = dict(sig, **{k: "constexpr" for k in consts})
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, enable_fp_fusion=False))
        assert k.asm.get("cubin"), fn
        print("compiled", getattr(fn, "__name__", fn), consts)

    rot = {"x_ptr": "*bf16", "a_ptr": "*i8", "sx_ptr": "*fp32", "zx_ptr": "*i32", "r_ptr": "*fp32", "K": "i32",
           "stride_x": "i32", "rot_scale": "fp32", "k_scale": "fp32", "neg_c": "fp32", "qmin": "fp32", "qmax": "fp32"}
    for kind, dt in ((0, "*fp32"), (1, "*bf16"), (2, "*fp16")):
        for b, k, sym, bits, store in ((16, 14336, False, 4, False), (128, 4096, True, 8, True), (8192, 8192, False, 8, False)):
            chunk, one_pass, warps = rq._plan(k, b)
            build(rq._rot_quant_kernel, dict(rot, x_ptr=dt), dict(SYMMETRIC=sym, BITS=bits, B=b, LOG_B=b.bit_length() - 1,
                  CHUNK=chunk, ONE_PASS=one_pass, IN_KIND=kind, STORE_ROTATED=store), warps)
    build(rq._rot_quant_kernel, rot, dict(SYMMETRIC=False, BITS=4, B=256, LOG_B=8, CHUNK=4096, ONE_PASS=False,
          IN_KIND=1, STORE_ROTATED=True), 8)
    for sym in (False, True):
        build(pg._act_quant_kernel, {"x_ptr": "*bf16", "a_ptr": "*i8", "sx_ptr": "*fp32", "zx_ptr": "*i32", "K": "i32",
              "stride_x": "i32", "k_scale": "fp32", "neg_c": "fp32", "qmin": "fp32", "qmax": "fp32"},
              dict(SYMMETRIC=sym, BITS=4, BLOCK=4096))
    lin = {n: "*i8" for n in ("a_ptr", "wz_ptr")}
    lin.update({"w_ptr": "*u8", "sw_ptr": "*fp32", "cs_ptr": "*i32", "sx_ptr": "*fp32", "zx_ptr": "*i32",
                "b_ptr": "*fp32", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "KP": "i32", "GROUP": "i32",
                "G": "i32"})
    for dot, bm in ((True, 64), (False, 1)):
        build(pg._w4_linear_kernel, lin, dict(HAS_BIAS=True, CORRECT=True, USE_DOT=dot, BLOCK_M=bm, BLOCK_N=64,
              BLOCK_K=128))
    build(hadamard._kernel(), {"x_ptr": "*bf16", "out_ptr": "*bf16", "rows": "i32", "scale": "fp32"},
          dict(P=1024, LOG_P=10, BLOCK_R=4, OUT_BF16=True))
    names = ("q_ptr codes_ptr scale_ptr zero_ptr mask_ptr out_ptr L HQ HKV GROUPS sm_scale offset s_qb s_qh s_ck s_cb "
             "s_ch s_ct s_sk s_sb s_sh s_st s_mb s_mt s_ob s_oh").split()
    types = ["*bf16", "*u8", "*fp32", "*i8", "*u8", "*bf16", "i32", "i32", "i32", "i32", "fp32", "i32"] + ["i32"] * 14
    build(kva._decode_attention_kernel, dict(zip(names, types)), dict(HAS_ZERO=True, MASK_KIND=1, HALF_D=32, BLOCK_N=64))
    for sym in (False, True):  # the training fake quantizer
        build(fq._kernel(), {"x_ptr": "*bf16", "out_ptr": "*bf16", "cols": "i32", "k_scale": "fp32", "neg_clip": "fp32",
              "qmin": "fp32", "qmax": "fp32"}, dict(SYMMETRIC=sym, OUT_BF16=True, BLOCK=1024))
''')


def test_kernels_compile_for_cuda_on_the_cpu():
    """Triton's interpreter runs Python that the CUDA compiler refuses (non-constexpr globals, a constexpr
    reassigned in an unrolled loop, a loop-carried name changing type): compile every Triton kernel of the
    package (packed inference, K/V attention, the online Hadamard, the training fake quantizer) ahead of
    time for sm_90, through Triton's CUDA front end and ptxas."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover - a Triton build without the CUDA backend
        pytest.skip(f"Triton's CUDA backend is not installed: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled") == 18
