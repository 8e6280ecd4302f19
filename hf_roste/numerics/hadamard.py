"""Walsh-Hadamard rotations (SpinQuant / RoSTE R1..R4) for arbitrary supported sizes.

Conventions
-----------
* A size ``n`` is factored as ``n = m * 2**k`` (:func:`hadamard_factorization`). The unnormalised
  matrix is ``H_n = kron(B_m, S_{2**k})`` with ``B_m = base_hadamard_matrix(m)`` acting on the
  MAJOR (slow) index and the Sylvester matrix ``S`` on the minor (fast) index: for a row vector
  ``x`` reshaped to ``X [m, 2**k]``, ``x @ H_n == (B_m.T @ X @ S).flatten()``.
* The rotation is ``R = diag(s) @ H_n / sqrt(n)`` (``s`` = optional +-1 signs), applied to ROW
  vectors: ``hadamard_transform(x, s) == x @ R`` (multiply by ``s`` then apply ``H``), and
  ``transpose=True`` gives ``x @ R.T`` (the inverse).
* With compressed-tensors available, ``H_n`` equals, exactly, ``_matmul_hadU(eye(n))`` of
  ``compressed_tensors.transform.utils.hadamard`` for every non-power-of-two ``n`` (and
  ``random_hadamard_matrix`` equals ``diag(s) @ H_n``), and equals Sylvester's
  ``deterministic_hadamard_matrix(n)`` for powers of two. compressed-tensors applies transforms
  online as ``value @ W / sqrt(n)``, the same ``x @ R`` convention. (Only caveat: for ``n = 32``
  their ``_matmul_hadU`` uses a stored non-Sylvester matrix; we use Sylvester, like their
  ``"hadamard"`` transform type.)
"""

from __future__ import annotations

import functools
import math
import operator

import torch
from torch import Tensor

from . import hadamard_factors as _hf
from .kernels._triton import use_triton
from .kernels.hadamard import kernel_supports, triton_hadamard_transform

__all__ = [
    "base_hadamard_matrix",
    "hadamard_factorization",
    "hadamard_matrix",
    "hadamard_transform",
    "is_hadamard_size",
    "random_signs",
]

# Sylvester block sizes for the CPU path are at most 2**_MAX_BLOCK_LOG2 (benchmarked: 128).
_MAX_BLOCK_LOG2 = 7
# fast_hadamard_transform's CUDA kernel handles power-of-two sizes up to 2**15.
_FHT_MAX = 2**15


def _as_int(n: object, what: str = "n") -> int:
    if isinstance(n, bool):
        raise ValueError(f"{what} must be a positive integer, got {n!r}")
    try:
        return operator.index(n)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be a positive integer, got {n!r}") from None


def is_hadamard_size(n: int) -> bool:
    """True iff an ``n x n`` rotation is available (``n = m * 2**k``, ``m`` a supported base order)."""
    try:
        n = _as_int(n)
    except ValueError:
        return False
    return n >= 1 and _hf.choose_base(n) is not None


def _nearest_supported(n: int) -> tuple[int | None, int]:
    below = next((c for c in range(n - 1, 0, -1) if _hf.choose_base(c) is not None), None)
    above = max(n + 1, 1)
    while _hf.choose_base(above) is None:
        above += 1
    return below, above


def hadamard_factorization(n: int) -> tuple[int, int]:
    """Factor a rotation size as ``n = m * 2**k`` and return ``(m, k)``.

    * Powers of two: ``m = 1`` (pure Sylvester matrix).
    * Otherwise ``m`` is the LARGEST order compressed-tensors' factor file ships (multiples of 4 up to 256) with ``n / m`` a power of two,
      because that is the divisor compressed-tensors itself picks, and its order-224 (etc.)
      matrices are not Kronecker products of smaller ones; matching it keeps our matrices
      identical to what compressed-tensors / vLLM rebuild. E.g. 896 -> (224, 2),
      3584 -> (224, 4), 14336 -> (224, 6), 4864 -> (152, 5), 18944 -> (148, 7), 3072 -> (192, 4),
      12 -> (12, 0), 40 -> (40, 0).

    Raises ``ValueError`` naming ``n`` and the nearest supported sizes below and above, and
    ``RuntimeError`` (naming the file) when compressed-tensors' factor file cannot be read.
    """
    n = _as_int(n)
    if n < 1:
        raise ValueError(f"Hadamard size must be a positive integer, got n={n}")
    m = _hf.choose_base(n)
    if m is None:
        below, above = _nearest_supported(n)
        raise ValueError(
            f"unsupported Hadamard size n={n}: sizes must be m * 2**k with base order m in "
            f"{{{_hf.describe_base_orders()}}}; nearest "
            f"supported sizes: {below} (below) and {above} (above)"
        )
    return m, (n // m).bit_length() - 1


def base_hadamard_matrix(m: int) -> Tensor:
    """Unnormalised +-1 base matrix ``B_m`` of ``H_n = kron(B_m, S_{2**k})``: float64 ``[m, m]``.

    Equals ``hadamard_matrix(m) * sqrt(m)`` (up to rounding). Powers of two give Sylvester
    matrices; other orders the transpose of compressed-tensors' stored matrix. ``m`` must be one of the supported base orders, else ``ValueError``.
    Returns a fresh tensor (safe to modify).
    """
    m = _as_int(m, "m")
    orders = _hf.supported_base_orders()
    if m not in orders:
        raise ValueError(
            f"unsupported Hadamard base order m={m}; supported base orders: {{{_hf.describe_base_orders()}}}"
        )
    return _hf.base_matrix(m).clone()


def random_signs(n: int, seed: int) -> Tensor:
    """Random +-1 vector, float32 ``[n]``, from a CPU ``torch.Generator`` seeded with ``seed``.

    Generated on CPU so the result is identical across machines and devices (move it with
    ``.to(device)``). ``seed`` must be an integer in ``[0, 2**64)``.
    """
    n = _as_int(n)
    if n < 1:
        raise ValueError(f"random_signs needs n >= 1, got n={n}")
    seed = _as_int(seed, "seed")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got seed={seed}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64)
    return (2 * bits - 1).to(torch.float32)


def _check_signs(signs: Tensor | None, n: int) -> None:
    if signs is None:
        return
    if not isinstance(signs, Tensor):
        raise ValueError(f"signs must be a torch.Tensor of shape [{n}] or None, got {type(signs).__name__}")
    if signs.shape != (n,):
        raise ValueError(f"signs must have shape [{n}] (the rotation size), got {list(signs.shape)}")
    if not signs.is_floating_point():
        raise ValueError(f"signs must be a floating-point +-1 tensor, got dtype {signs.dtype}")


def hadamard_matrix(n: int, signs: Tensor | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Dense orthonormal rotation ``R = diag(signs) @ H_n / sqrt(n)``, ``[n, n]`` on CPU.

    Computed in float64 then cast to ``dtype``; ``hadamard_transform(x, signs) == x @ R``.
    ``signs``: optional +-1 float tensor ``[n]`` (any device). Memory is ``8 n**2`` bytes: use
    :func:`hadamard_transform` for large ``n``. Unsupported ``n`` or bad signs -> ``ValueError``.
    """
    m, k = hadamard_factorization(n)
    n = m << k
    _check_signs(signs, n)
    mat = torch.kron(_hf.base_matrix(m), _hf.sylvester_matrix(1 << k)) / math.sqrt(n)
    if signs is not None:
        s = signs.detach().to(device="cpu", dtype=torch.float64)
        if not bool((s.abs() == 1).all()):
            raise ValueError("signs must contain only +1 and -1 entries")
        mat = s[:, None] * mat
    return mat.to(dtype)


# ----------------------------------------------------------------------------- transform kernels


def _block_sizes(k: int) -> list[int]:
    """Split ``2**k`` into near-equal Sylvester blocks of at most ``2**_MAX_BLOCK_LOG2``."""
    if k == 0:
        return []
    r = -(-k // _MAX_BLOCK_LOG2)
    base, extra = divmod(k, r)
    return [1 << (base + (1 if i < extra else 0)) for i in range(r)]


@functools.lru_cache(maxsize=256)
def _device_matrix(kind: str, order: int, scale: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Cached ``scale * M`` on ``device``; kind: "syl" (symmetric), "base" (B_m) or "baseT" (B_m.T)."""
    if kind == "syl":
        mat = _hf.sylvester_matrix(order)
    else:
        mat = _hf.base_matrix(order)
        if kind == "baseT":
            mat = mat.T
    return (mat * scale).to(device=device, dtype=dtype).contiguous()


_hf._CACHED.append(_device_matrix)


@functools.lru_cache(maxsize=1)
def _fht_module():  # noqa: ANN202 - optional dependency
    try:
        import fast_hadamard_transform
    except Exception:  # noqa: BLE001
        return None
    return fast_hadamard_transform


@functools.lru_cache(maxsize=256)
def _plan(m: int, k: int, transpose: bool, device: torch.device, dtype: torch.dtype) -> tuple:
    """Cached matrices of one transform: ``(sylvester blocks [(b, S_b)], base matrix or None)``.

    The ``1/sqrt(n)`` normalisation is folded into the last (fastest) Sylvester block, or into the
    base matrix when ``n = m`` (no power-of-two part); blocks are applied last-first.
    """
    n = m << k
    scale = 1.0 / math.sqrt(n)
    blocks = _block_sizes(k)
    syl = [(b, _device_matrix("syl", b, scale if i == len(blocks) - 1 else 1.0, device, dtype))
           for i, b in enumerate(blocks)]
    base = None
    if m > 1:
        base = _device_matrix("baseT" if not transpose else "base", m, 1.0 if blocks else scale, device, dtype)
    return tuple(syl), base


_hf._CACHED.append(_plan)


def _pow2_torch(y: Tensor, p: int, syl: tuple) -> Tensor:
    """``y [R, p] @ S_p`` (normalisation folded in ``syl``) via Kronecker blocks as batched matmuls."""
    b_last, mat = syl[-1]
    y = (y.reshape(-1, b_last) @ mat).view(-1, p)  # last (fastest) block: one plain GEMM
    inner = b_last
    for b, mat in reversed(syl[:-1]):
        # S is symmetric, so x @ S on the middle axis == S @ X with X [.., b, inner].
        y = torch.matmul(mat, y.view(-1, b, inner))
        inner *= b
    return y.reshape(-1, p)


def _apply(x: Tensor, m: int, k: int, signs: Tensor | None, transpose: bool) -> Tensor:
    """Core transform (no autograd): ``x [..., n]`` -> ``x @ R`` (or ``x @ R.T``), x's dtype."""
    n = m << k
    p = 1 << k
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.reshape(-1, n)
    if y.dtype != cdtype:
        y = y.to(cdtype)
    rows = y.shape[0]
    s = None if signs is None else signs.to(device=y.device, dtype=cdtype)
    if s is not None and not transpose:
        y = y * s
    fht = _fht_module() if y.is_cuda and cdtype == torch.float32 and 1 < p <= _FHT_MAX else None
    syl, bmat = _plan(m, k, bool(transpose), y.device, cdtype)
    if fht is not None:
        scale = 1.0 / math.sqrt(n)
        y = fht.hadamard_transform(y.reshape(rows * m, p).contiguous(), scale)
        if bmat is not None and not syl:  # the plan folded the scale into the base matrix
            bmat = bmat / scale
    elif syl:
        y = _pow2_torch(y, p, syl)
    elif bmat is None:  # n == 1
        y = y * 1.0
    if bmat is not None:
        # forward: Y = B^T X ; transpose: Y = B X   (X = row reshaped to [m, p])
        y = torch.matmul(bmat, y.reshape(rows, m, p))
    y = y.reshape(x.shape)
    if s is not None and transpose:
        y = y * s
    return y if y.dtype == x.dtype else y.to(x.dtype)


class _HadamardTransformFn(torch.autograd.Function):
    """``x @ R`` (or ``x @ R.T``); backward is the transposed transform (saves only signs)."""

    @staticmethod
    def forward(ctx, x: Tensor, signs: Tensor | None, m: int, k: int, transpose: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(signs)
        ctx.mk = (m, k)
        ctx.transpose = transpose
        return _apply(x, m, k, signs, transpose)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]  # noqa: ANN205
        (signs,) = ctx.saved_tensors
        m, k = ctx.mk
        grad_x = _HadamardTransformFn.apply(grad, signs, m, k, not ctx.transpose)
        return grad_x, None, None, None, None


@torch.compiler.assume_constant_result
def _traced_factorization(n: int) -> tuple[int, int]:
    """:func:`hadamard_factorization` evaluated once at trace time (it reads the factor file and caches)."""
    return hadamard_factorization(n)


def hadamard_transform(x: Tensor, signs: Tensor | None = None, transpose: bool = False) -> Tensor:
    """Apply the rotation along the LAST dim: ``x @ R`` (``transpose=True``: ``x @ R.T = x @ R^-1``).

    ``R = diag(signs) @ H_n / sqrt(n)`` is :func:`hadamard_matrix` ``(n, signs)`` with
    ``n = x.shape[-1]`` (must be a supported size).

    Args:
        x: ``[..., n]`` float32 / bfloat16 / float16 (float64 also accepted and kept in float64),
            any device, any leading batch shape.
        signs: optional +-1 float tensor ``[n]`` (moved to x's device); not differentiated.
        transpose: apply ``R.T`` instead of ``R``.

    Returns:
        ``[..., n]`` tensor in x's dtype; accumulation in float32 (float64 for float64 input).

    CPU / no-kernel path: pure torch, the ``2**k`` part as near-equal Sylvester Kronecker blocks
    (<= 128) applied as batched matmuls and the base part as an ``[m, m]`` matmul; no dense
    ``n x n`` product. On CUDA with ``fast_hadamard_transform`` installed, its kernel does the
    power-of-two part only. Where :func:`~hf_roste.numerics.kernels.use_triton` holds (CUDA with
    Triton by default) and under ``torch.compile``, the call goes through the custom op
    ``hf_roste::hadamard_transform`` (:mod:`hf_roste.numerics.kernels.hadamard`: butterfly kernel for the
    power-of-two part, ``[m, m]`` product for the base). Differentiable (backward = transposed transform).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the rotated last dim)")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"x dtype {x.dtype} is not supported; accepted: float32, bfloat16, float16, float64")
    n = int(x.shape[-1])
    m, k = _traced_factorization(n) if torch.compiler.is_compiling() else hadamard_factorization(n)
    _check_signs(signs, m * (1 << k))
    if signs is not None:
        signs = signs.detach()
    if torch.compiler.is_compiling() or (x.dtype != torch.float64 and use_triton(x.device)):
        # one custom op: no graph break on symbolic sizes under torch.compile, the kernel where Triton runs
        return hadamard_transform_op(x, m, k, signs, bool(transpose))
    if not (x.requires_grad and torch.is_grad_enabled()):  # no graph: skip the autograd.Function
        return _apply(x, m, k, signs, bool(transpose))
    return _HadamardTransformFn.apply(x, signs, m, k, bool(transpose))


# ----------------------------------------------------------------------------- the custom op
@torch.library.custom_op("hf_roste::hadamard_transform", mutates_args=())
def _hadamard_impl(x: Tensor, signs: Tensor | None, m: int, k: int, transpose: bool) -> Tensor:
    if kernel_supports(x, m, k) and use_triton(x.device):
        base = None if m == 1 else _device_matrix("base" if transpose else "baseT", m, 1.0, x.device, torch.float32)
        if signs is None:
            return triton_hadamard_transform(x, m, k, base)
        s = signs.to(device=x.device, dtype=torch.float32)
        if transpose:
            return (triton_hadamard_transform(x, m, k, base).float() * s).to(x.dtype)
        return triton_hadamard_transform(x.float() * s, m, k, base).to(x.dtype)
    out = _apply(x, m, k, signs, transpose)
    return out.clone() if out is x else out.contiguous()


@_hadamard_impl.register_fake
def _(x: Tensor, signs: Tensor | None, m: int, k: int, transpose: bool) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library autograd signature
    _, signs, m, k, transpose = inputs
    if signs is not None:
        ctx.save_for_backward(signs)
    ctx.has_signs = signs is not None
    ctx.mkt = (m, k, transpose)


def _backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202 - torch.library autograd signature
    m, k, transpose = ctx.mkt
    signs = ctx.saved_tensors[0] if ctx.has_signs else None
    return _hadamard_impl(grad.contiguous(), signs, m, k, not transpose), None, None, None, None


_hadamard_impl.register_autograd(_backward, setup_context=_setup)


def hadamard_transform_op(x: Tensor, m: int, k: int, signs: Tensor | None = None, transpose: bool = False) -> Tensor:
    """``hf_roste::hadamard_transform``: the rotation of :func:`hf_roste.numerics.hadamard.hadamard_transform`
    as one custom op (differentiable; backward = the transposed transform). ``signs`` is not differentiated."""
    return _hadamard_impl(x, None if signs is None else signs.detach(), int(m), int(k), bool(transpose))
