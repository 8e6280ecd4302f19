"""Base ("factor") Hadamard matrices used by :mod:`hf_roste.numerics.hadamard`.

A Hadamard size ``n`` is written ``n = m * 2**k``; the order-``m`` base matrix comes from
compressed-tensors (a hard dependency): the int8 matrices shipped in
``compressed_tensors/transform/utils/hadamards.safetensors`` (orders 1, 2 and every multiple of 4
up to 256). Using exactly these matrices makes our rotations bit-identical to the ones
compressed-tensors / vLLM rebuild at load time, and a checkpoint always reloads with the matrices
it was trained with. When that file cannot be read, building a non-power-of-two rotation fails
with an error naming the file (there is no other construction to fall back to silently).

Powers of two use Sylvester's construction (base order 1), as compressed-tensors does.

Orientation: :func:`base_matrix` returns ``B_m`` such that the unnormalised size-``n`` matrix
is ``H_n = kron(B_m, S_{2**k})`` (``S`` = Sylvester); this means ``B_m`` is the TRANSPOSE of the stored matrix (their ``_matmul_hadU`` applies the stored
matrix from the left to column vectors, i.e. ``x @ stored.T`` for row vectors).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MAX_BASE_ORDER",
    "supported_base_orders",
    "sylvester_matrix",
]

#: Largest base order (compressed-tensors ships orders up to 256).
MAX_BASE_ORDER = 256


_CACHED: list[Any] = []


def _cached(fn: Callable[..., Any]) -> Any:
    """``functools.lru_cache`` that also registers the function for :func:`clear_caches`."""
    wrapped = functools.lru_cache(maxsize=None)(fn)
    _CACHED.append(wrapped)
    return wrapped


def clear_caches() -> None:
    """Forget every cached matrix and the factor file's orders (used by tests that hide the file)."""
    for fn in _CACHED:
        fn.cache_clear()


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


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


# ----------------------------------------------------------------------------- compressed-tensors


def _ct_factor_file() -> Path:
    """Path of compressed-tensors' ``hadamards.safetensors``; a clear error when it is unavailable."""
    try:
        # first import of compressed-tensors: its modules build constant tensors (e.g. the e2m1 table its
        # NVFP4 compressor uses) at import time, which must not land on a default device such as transformers'
        # meta device during from_pretrained (the FP4 export would then fail with "Cannot copy out of meta tensor")
        with torch.device("cpu"):
            from compressed_tensors.transform.utils import hadamard as ct_hadamard
    except ImportError as exc:
        raise RuntimeError(
            f"compressed-tensors' Hadamard factors cannot be imported ({exc}); they define every non-power-of-two "
            "RoSTE rotation. Reinstall hf-roste's dependency: pip install -U compressed-tensors."
        ) from exc
    path = Path(getattr(ct_hadamard, "REPO_PATH", Path(ct_hadamard.__file__).parent / "hadamards.safetensors"))
    if not path.is_file():
        raise RuntimeError(
            f"compressed-tensors' Hadamard factor file {path} is missing; it defines every non-power-of-two RoSTE "
            "rotation. Reinstall it: pip install --force-reinstall compressed-tensors."
        )
    return path


@_cached
def _ct_orders() -> frozenset[int]:
    path = _ct_factor_file()
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return frozenset(int(key) for key in fh.keys())
    except Exception as exc:  # noqa: BLE001 - any read failure: name the file and the fix
        raise RuntimeError(
            f"compressed-tensors' Hadamard factor file {path} cannot be read ({type(exc).__name__}: {exc}). "
            "Reinstall it: pip install --force-reinstall compressed-tensors."
        ) from exc


@_cached
def _ct_matrix(m: int) -> torch.Tensor:
    """compressed-tensors' stored order-m matrix (as stored, not transposed), float64."""
    from safetensors import safe_open

    path = _ct_factor_file()
    with safe_open(str(path), framework="pt") as fh:
        mat = fh.get_tensor(str(m)).to(torch.float64)
    if mat.shape != (m, m) or not torch.equal(mat @ mat.T, m * torch.eye(m, dtype=torch.float64)):
        raise RuntimeError(f"compressed-tensors Hadamard factor of order {m} in {path} is not Hadamard")
    return mat


# ----------------------------------------------------------------------------- source / orders


@_cached
def supported_base_orders() -> tuple[int, ...]:
    """Sorted base orders ``m`` usable in ``n = m * 2**k``: compressed-tensors' stored orders (1, 2 and
    every multiple of 4 up to 256; the powers of two among them are Sylvester)."""
    return tuple(sorted(_ct_orders()))


def describe_base_orders() -> str:
    """Short human-readable description of :func:`supported_base_orders` (for error messages)."""
    orders = supported_base_orders()
    if set(orders) == {1, 2, *range(4, MAX_BASE_ORDER + 1, 4)}:
        return f"1, 2 and every multiple of 4 up to {MAX_BASE_ORDER}"
    return ", ".join(map(str, orders))


def choose_base(n: int) -> int | None:
    """Base order ``m`` for size ``n`` (see ``hadamard_factorization``), None if unsupported.

    Powers of two -> 1. Otherwise the LARGEST stored divisor ``d`` with ``n / d`` a power of two
    (the same divisor compressed-tensors' ``_matmul_hadU`` picks, so the matrices agree exactly).
    """
    if n < 1:
        return None
    if _is_pow2(n):
        return 1
    orders = sorted((m for m in supported_base_orders() if not _is_pow2(m)), reverse=True)
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
    return _ct_matrix(m).T.contiguous()
