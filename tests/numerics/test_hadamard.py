"""Tests for hf_roste.numerics.hadamard (Walsh-Hadamard rotations)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_roste.numerics import hadamard_factors as hf
from hf_roste.numerics.hadamard import (
    base_hadamard_matrix,
    hadamard_factorization,
    hadamard_matrix,
    hadamard_transform,
    is_hadamard_size,
    random_signs,
)

MODEL_SIZES = [896, 3584, 1024, 2048, 4096, 4864, 18944, 14336, 3072, 8192, 16384, 64, 128, 256]
SMALL_SIZES = [1, 2, 4, 12, 24, 40, 48, 96, 160, 192]
DENSE_LIMIT = 1024


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


def _check_orthonormal(n: int) -> None:
    if n <= DENSE_LIMIT:
        r = hadamard_matrix(n, random_signs(n, 3))
        assert r.shape == (n, n) and r.dtype == torch.float64
        assert (r @ r.T - _eye(n)).abs().max().item() < 1e-10
    else:  # probe: norm preservation and exact inverse
        x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        s = random_signs(n, 5)
        y = hadamard_transform(x, s)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
        assert (hadamard_transform(y, s, transpose=True) - x).abs().max().item() < 1e-10


# ----------------------------------------------------------------------------- orthogonality


@pytest.mark.parametrize("n", MODEL_SIZES + SMALL_SIZES)
def test_orthonormal_listed_sizes(n: int) -> None:
    assert is_hadamard_size(n)
    _check_orthonormal(n)


def _supported_sizes(max_n: int = 32768) -> st.SearchStrategy[int]:
    bases = hf.supported_base_orders()
    return st.sampled_from(bases).flatmap(
        lambda m: st.integers(0, int(math.log2(max_n // m))).map(lambda k: m << k)
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=_supported_sizes())
def test_orthonormal_hypothesis(n: int) -> None:
    m, k = hadamard_factorization(n)
    assert m << k == n and m in hf.supported_base_orders()
    _check_orthonormal(n)


def test_factorization_choices() -> None:
    # compressed-tensors picks its LARGEST stored divisor; powers of two -> Sylvester (m = 1).
    assert hadamard_factorization(4096) == (1, 12)
    assert hadamard_factorization(32) == (1, 5)
    assert hadamard_factorization(896) == (224, 2)
    assert hadamard_factorization(4864) == (152, 5)
    assert hadamard_factorization(18944) == (148, 7)
    assert hadamard_factorization(12) == (12, 0)


def test_unreadable_ct_factor_file_fails_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No silent switch to another construction: a non-power-of-two size names the missing file."""
    from compressed_tensors.transform.utils import hadamard as ct_hadamard

    monkeypatch.setattr(ct_hadamard, "REPO_PATH", tmp_path / "missing.safetensors", raising=False)
    hf.clear_caches()
    try:
        with pytest.raises(RuntimeError, match="missing.safetensors.*compressed-tensors"):
            hadamard_factorization(896)
        assert hadamard_factorization(1024) == (1, 10)  # powers of two are Sylvester: no file needed
        (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
        monkeypatch.setattr(ct_hadamard, "REPO_PATH", tmp_path / "broken.safetensors")
        hf.clear_caches()
        with pytest.raises(RuntimeError, match="cannot be read"):
            hadamard_matrix(12)
    finally:
        monkeypatch.undo()
        hf.clear_caches()
    assert hadamard_factorization(896) == (224, 2)


# ----------------------------------------------------------------------------- transform vs dense


@pytest.mark.parametrize("n", [1, 12, 40, 64, 96, 192, 896, 1024])
@pytest.mark.parametrize("use_signs", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("batch", [(), (3,), (2, 5)])
def test_transform_matches_dense(n: int, use_signs: bool, transpose: bool, batch: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(*batch, n, generator=gen)
    s = random_signs(n, 11) if use_signs else None
    r = hadamard_matrix(n, s)
    ref = x.double() @ (r.T if transpose else r)
    y = hadamard_transform(x, s, transpose=transpose)
    assert y.shape == x.shape and y.dtype == torch.float32
    rel = (y.double() - ref).norm() / ref.norm().clamp_min(1e-30)
    assert rel.item() < 1e-5


def test_transform_large_sizes_against_dense_columns() -> None:
    # Sizes too large for a dense R: compare a few output columns with R[:, j] built from kron.
    for n in (14336, 18944):
        m, k = hadamard_factorization(n)
        p = 1 << k
        x = torch.randn(2, n, generator=torch.Generator().manual_seed(0))
        s = random_signs(n, 1)
        y = hadamard_transform(x, s).double()
        base, syl = base_hadamard_matrix(m), hf.sylvester_matrix(p)
        for j in (0, 1, n // 3, n - 1):
            col = torch.kron(base[:, j // p], syl[:, j % p]) * s.double() / math.sqrt(n)
            ref = x.double() @ col
            assert (y[:, j] - ref).abs().max().item() < 1e-5 * x.norm(dim=-1).max().item()


def test_inverse_and_rows_of_dense() -> None:
    n = 192
    s = random_signs(n, 2)
    r = hadamard_matrix(n, s)
    torch.testing.assert_close(hadamard_transform(_eye(n), s), r, rtol=0, atol=1e-14)
    torch.testing.assert_close(hadamard_transform(_eye(n), s, transpose=True), r.T, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- compressed-tensors


ct_h = pytest.importorskip("compressed_tensors.transform.utils.hadamard")


@pytest.mark.parametrize("n", [12, 24, 28, 40, 96, 160, 192, 224, 304, 448, 592, 608, 896])
def test_equals_compressed_tensors_matmul_hadU(n: int) -> None:
    ct = ct_h._matmul_hadU(_eye(n))
    ours = hadamard_matrix(n) * math.sqrt(n)
    assert torch.equal(torch.round(ours), ct)
    assert (ours - ct).abs().max().item() < 1e-12
    # random_hadamard_matrix == diag(s) @ H with their generator's signs
    gen = torch.Generator().manual_seed(7)
    ct_rand = ct_h.random_hadamard_matrix(n, torch.float64, gen=gen)
    sgn = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2 - 1
    assert torch.equal(torch.round(hadamard_matrix(n, sgn) * math.sqrt(n)), ct_rand)


@pytest.mark.parametrize("n", [1, 2, 4, 16, 32, 64, 128, 256, 512, 2048])
def test_pow2_equals_sylvester(n: int) -> None:
    ours = torch.round(hadamard_matrix(n) * math.sqrt(n))
    assert torch.equal(ours, ct_h.deterministic_hadamard_matrix(n, torch.float64))
    if n != 32:  # compressed-tensors' stored order-32 factor is not Sylvester (documented caveat)
        assert torch.equal(ours, ct_h._matmul_hadU(_eye(n)))


def test_base_matrix_is_transposed_ct_factor() -> None:
    for m in (12, 28, 76, 148, 224):
        assert torch.equal(base_hadamard_matrix(m), hf._ct_matrix(m).T)
        assert torch.equal(torch.round(hadamard_matrix(m) * math.sqrt(m)), base_hadamard_matrix(m))


# ----------------------------------------------------------------------------- autograd / dtypes


@pytest.mark.parametrize("n", [12, 64, 896])
@pytest.mark.parametrize("transpose", [False, True])
def test_backward_is_transposed_transform(n: int, transpose: bool) -> None:
    s = random_signs(n, 4)
    x = torch.randn(2, 3, n, requires_grad=True)
    g = torch.randn(2, 3, n)
    (hadamard_transform(x, s, transpose=transpose) * g).sum().backward()
    expected = hadamard_transform(g, s, transpose=not transpose)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64() -> None:
    x = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    s = random_signs(24, 0).double()
    assert torch.autograd.gradcheck(lambda t: hadamard_transform(t, s), (x,))
    assert torch.autograd.gradgradcheck(lambda t: hadamard_transform(t, s, transpose=True), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_dtype(dtype: torch.dtype) -> None:
    n = 896
    x = torch.randn(4, n).to(dtype)
    s = random_signs(n, 9)
    y = hadamard_transform(x, s)
    assert y.dtype == dtype
    ref = hadamard_transform(x.float(), s)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert ((y.float() - ref).norm() / ref.norm()).item() < tol


def test_random_signs_deterministic() -> None:
    a, b = random_signs(4096, 0), random_signs(4096, 0)
    assert a.dtype == torch.float32 and a.shape == (4096,)
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, random_signs(4096, 1))
    # pinned values: catches a change of generator / recipe (cross-machine determinism)
    g = torch.Generator().manual_seed(0)
    expected = torch.randint(0, 2, (4096,), generator=g).float() * 2 - 1
    assert torch.equal(a, expected)


def test_empty_batch_and_noncontiguous() -> None:
    assert hadamard_transform(torch.zeros(0, 12)).shape == (0, 12)
    x = torch.randn(64, 8).T  # [8, 64] non-contiguous
    torch.testing.assert_close(hadamard_transform(x), hadamard_transform(x.contiguous()))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("n", "below", "above"), [(7, 4, 8), (14, 12, 16), (1000, 992, 1008), (260, 256, 264), (4100, 4096, 4224)]
)
def test_unsupported_sizes(n: int, below: int, above: int) -> None:
    assert not is_hadamard_size(n)
    with pytest.raises(ValueError, match=rf"n={n}\b.*{below} \(below\) and {above} \(above\)"):
        hadamard_factorization(n)
    with pytest.raises(ValueError, match=f"n={n}"):
        hadamard_transform(torch.zeros(2, n))
    with pytest.raises(ValueError, match=f"n={n}"):
        hadamard_matrix(n)


def test_bad_values() -> None:
    for bad in (0, -4):
        assert not is_hadamard_size(bad)
        with pytest.raises(ValueError, match="positive integer"):
            hadamard_factorization(bad)
    with pytest.raises(ValueError, match="base order m=7"):
        base_hadamard_matrix(7)
    with pytest.raises(ValueError, match=r"shape \[12\]"):
        hadamard_transform(torch.zeros(12), torch.ones(6))
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        hadamard_matrix(12, torch.full((12,), 2.0))
    with pytest.raises(ValueError, match="dtype"):
        hadamard_transform(torch.zeros(12, dtype=torch.int32))
    with pytest.raises(ValueError, match="seed"):
        random_signs(8, -1)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [64, 896, 4096, 4864, 14336])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(n: int, dtype: torch.dtype) -> None:
    x = torch.randn(3, n).to(dtype)
    s = random_signs(n, 1)
    for transpose in (False, True):
        cpu = hadamard_transform(x, s, transpose=transpose).float()
        gpu = hadamard_transform(x.cuda(), s.cuda(), transpose=transpose)
        assert gpu.dtype == dtype and gpu.is_cuda
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert ((gpu.float().cpu() - cpu).norm() / cpu.norm()).item() < tol


@pytest.mark.parametrize("n", [1, 12, 64, 96, 768, 3072])
@pytest.mark.parametrize("transpose", [False, True])
def test_no_grad_fast_path_equals_autograd_path_bitwise(n, transpose):
    """Without a graph the transform skips the autograd.Function; the numbers must not change."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    for s in (None, signs):
        fast = hadamard_transform(x, s, transpose=transpose)
        xr = x.clone().requires_grad_(True)
        slow = hadamard_transform(xr, s, transpose=transpose)
        assert slow.grad_fn is not None and fast.grad_fn is None
        assert torch.equal(fast, slow.detach())
