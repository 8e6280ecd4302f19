"""Base ("factor") Hadamard matrices used by :mod:`hf_roste.numerics.hadamard`.

A Hadamard size ``n`` is written ``n = m * 2**k``; the order-``m`` base matrix comes from
one of two sources:

``"compressed-tensors"`` (preferred)
    The int8 matrices shipped in ``compressed_tensors/transform/utils/hadamards.safetensors``
    (orders 1, 2 and every multiple of 4 up to 256). Using exactly these matrices makes our
    rotations bit-identical to the ones compressed-tensors / vLLM rebuild at load time.
``"paley"`` (fallback when compressed-tensors' file cannot be found)
    Paley I (prime ``q = 3 mod 4``, order ``q + 1``) and Paley II (prime ``q = 1 mod 4``, order
    ``2 (q + 1)``) constructions, limited to orders <= :data:`MAX_BASE_ORDER`. These matrices are
    valid Hadamard matrices but are NOT the compressed-tensors ones, so rotations built with
    them cannot be re-created by compressed-tensors.

Powers of two always use Sylvester's construction (base order 1), in both sources.

Orientation: :func:`base_matrix` returns ``B_m`` such that the unnormalised size-``n`` matrix
is ``H_n = kron(B_m, S_{2**k})`` (``S`` = Sylvester); for the compressed-tensors source this
means ``B_m`` is the TRANSPOSE of the stored matrix (their ``_matmul_hadU`` applies the stored
matrix from the left to column vectors, i.e. ``x @ stored.T`` for row vectors).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "MAX_BASE_ORDER",
    "hadamard_base_source",
    "paley_hadamard_matrix",
    "supported_base_orders",
    "sylvester_matrix",
]

#: Largest base order used by either source (compressed-tensors ships orders up to 256).
MAX_BASE_ORDER = 256

BaseSource = Literal["compressed-tensors", "paley"]

_CACHED: list[Any] = []


def _cached(fn: Callable[..., Any]) -> Any:
    """``functools.lru_cache`` that also registers the function for :func:`clear_caches`."""
    wrapped = functools.lru_cache(maxsize=None)(fn)
    _CACHED.append(wrapped)
    return wrapped


def clear_caches() -> None:
    """Forget every cached matrix / source decision (used by tests that switch sources)."""
    for fn in _CACHED:
        fn.cache_clear()


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


# ----------------------------------------------------------------------------- Sylvester


@_cached
def sylvester_matrix(n: int) -> torch.Tensor:
    """Unnormalised Sylvester Hadamard matrix ``S_n`` (symmetric, +-1), float64 ``[n, n]``.

    ``S_1 = [[1]]`` and ``S_{2n} = [[S_n, S_n], [S_n, -S_n]]``, i.e. ``S_n[i, j] =
    (-1)**popcount(i & j)``; identical to compressed-tensors' ``deterministic_hadamard_matrix``.
    The returned tensor is cached: do not modify it in place.
    """
    if not _is_pow2(n):
        raise ValueError(f"Sylvester Hadamard order must be a power of two, got n={n}")
    idx = torch.arange(n, dtype=torch.int64)
    anded = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(anded)
    while bool(anded.any()):
        parity ^= anded & 1
        anded = anded >> 1
    return (1 - 2 * parity).to(torch.float64)


# ----------------------------------------------------------------------------- Paley


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix ``Q[i, j] = chi(j - i)`` over GF(q) (q prime), int64 ``[q, q]``."""
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    for a in range(1, q):
        chi[(a * a) % q] = 1
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def _paley_kind(m: int) -> tuple[int, int] | None:
    """``(1, q)`` if Paley I gives order m, ``(2, q)`` for Paley II, else None (q prime)."""
    q = m - 1
    if q % 4 == 3 and _is_prime(q):
        return 1, q
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _is_prime(q):
            return 2, q
    return None


@_cached
def paley_hadamard_matrix(m: int) -> torch.Tensor:
    """Unnormalised Hadamard matrix of order ``m`` from a Paley construction, float64 ``[m, m]``.

    * Paley I, ``m = q + 1`` with ``q`` prime, ``q = 3 (mod 4)``:
      ``H = I + [[0, 1^T], [-1, Q]]`` (``Q`` the antisymmetric Jacobsthal matrix).
    * Paley II, ``m = 2 (q + 1)`` with ``q`` prime, ``q = 1 (mod 4)``: with the symmetric
      conference matrix ``C = [[0, 1^T], [1, Q]]``,
      ``H = kron(C, [[1, 1], [1, -1]]) + kron(I, [[1, -1], [-1, -1]])``.

    Paley I is tried first. Prime powers are not supported. Raises ``ValueError`` when neither
    construction gives order ``m``. Cached: do not modify the result in place.
    """
    kind = _paley_kind(m)
    if kind is None:
        raise ValueError(
            f"no Paley construction for order m={m}: accepted are m = q + 1 with q prime, q = 3 mod 4, "
            "and m = 2 (q + 1) with q prime, q = 1 mod 4"
        )
    which, q = kind
    jac = _jacobsthal(q).to(torch.float64)
    ones = torch.ones(q, dtype=torch.float64)
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[1:, 1:] = jac
    if which == 1:
        core[0, 1:] = ones
        core[1:, 0] = -ones
        return core + torch.eye(q + 1, dtype=torch.float64)
    core[0, 1:] = ones
    core[1:, 0] = ones
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(core, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


# ----------------------------------------------------------------------------- compressed-tensors


def _ct_factor_file() -> Path | None:
    """Path of compressed-tensors' ``hadamards.safetensors`` or None if unavailable."""
    try:
        from compressed_tensors.transform.utils import hadamard as ct_hadamard
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    path = Path(
        getattr(ct_hadamard, "REPO_PATH", Path(ct_hadamard.__file__).parent / "hadamards.safetensors")
    )
    return path if path.is_file() else None


@_cached
def _ct_orders() -> frozenset[int] | None:
    path = _ct_factor_file()
    if path is None:
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return frozenset(int(key) for key in fh.keys())
    except Exception:  # noqa: BLE001 - unreadable file: fall back to Paley
        return None


@_cached
def _ct_matrix(m: int) -> torch.Tensor:
    """compressed-tensors' stored order-m matrix (as stored, not transposed), float64."""
    from safetensors import safe_open

    path = _ct_factor_file()
    assert path is not None
    with safe_open(str(path), framework="pt") as fh:
        mat = fh.get_tensor(str(m)).to(torch.float64)
    if mat.shape != (m, m) or not torch.equal(mat @ mat.T, m * torch.eye(m, dtype=torch.float64)):
        raise RuntimeError(f"compressed-tensors Hadamard factor of order {m} in {path} is not Hadamard")
    return mat


# ----------------------------------------------------------------------------- source / orders


@_cached
def hadamard_base_source() -> BaseSource:
    """Which source provides non-power-of-two base matrices in this environment.

    ``"compressed-tensors"`` when its ``hadamards.safetensors`` can be read, else ``"paley"``.
    """
    return "compressed-tensors" if _ct_orders() is not None else "paley"


@_cached
def supported_base_orders() -> tuple[int, ...]:
    """Sorted base orders ``m`` usable in ``n = m * 2**k`` for the active source.

    compressed-tensors: 1, 2 and every multiple of 4 up to 256 (powers of two among them are
    Sylvester). Paley: 1, 2 and every non-power-of-two Paley I / II order <= 256.
    """
    if hadamard_base_source() == "compressed-tensors":
        orders = _ct_orders()
        assert orders is not None
        return tuple(sorted(orders))
    paley = (m for m in range(3, MAX_BASE_ORDER + 1) if not _is_pow2(m) and _paley_kind(m) is not None)
    return (1, 2, *paley)


def describe_base_orders() -> str:
    """Short human-readable description of :func:`supported_base_orders` (for error messages)."""
    orders = supported_base_orders()
    if set(orders) == {1, 2, *range(4, MAX_BASE_ORDER + 1, 4)}:
        return f"1, 2 and every multiple of 4 up to {MAX_BASE_ORDER}"
    return ", ".join(map(str, orders))


def choose_base(n: int) -> int | None:
    """Base order ``m`` for size ``n`` (see ``hadamard_factorization``), None if unsupported.

    Powers of two -> 1. Otherwise, compressed-tensors source: the LARGEST stored divisor ``d``
    with ``n / d`` a power of two (the same divisor compressed-tensors' ``_matmul_hadU`` picks,
    so the matrices agree exactly); Paley source: the SMALLEST such base order.
    """
    if n < 1:
        return None
    if _is_pow2(n):
        return 1
    orders = [m for m in supported_base_orders() if not _is_pow2(m)]
    if hadamard_base_source() == "compressed-tensors":
        orders.sort(reverse=True)
    for m in orders:
        if n % m == 0 and _is_pow2(n // m):
            return m
    return None


@_cached
def base_matrix(m: int) -> torch.Tensor:
    """Base matrix ``B_m`` (``H_n = kron(B_m, S_{2**k})``), unnormalised float64 ``[m, m]``.

    Cached: do not modify in place. ``m`` must be in :func:`supported_base_orders`.
    """
    if _is_pow2(m):
        return sylvester_matrix(m)
    if hadamard_base_source() == "compressed-tensors":
        return _ct_matrix(m).T.contiguous()
    return paley_hadamard_matrix(m)
