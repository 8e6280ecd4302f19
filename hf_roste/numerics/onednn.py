"""CPU int8 GEMM through oneDNN with the weight pre-packed once, and the per-process choice of
that route against ``torch._int_mm`` (both compute the same exact integer product)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["INT8_KERNEL_ENV", "onednn_int8_enabled"]

INT8_KERNEL_ENV = "HF_ROSTE_INT8_KERNEL"
_INT8_KERNEL_CHOICES = ("auto", "onednn", "int_mm")


def _time_best(fn: Callable[[], object], reps: int = 2) -> float:
    """Best wall time of ``reps`` calls of ``fn`` after one warm-up call (seconds)."""
    import time

    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=1)
def onednn_int8_enabled() -> bool:
    """Whether CPU weights get oneDNN's pre-packed int8 GEMM (decided once per process).

    ``HF_ROSTE_INT8_KERNEL``: ``int_mm`` always uses ``torch._int_mm``; ``onednn`` uses oneDNN
    wherever the op exists; ``auto`` (default) times one 16 x 512 x 512 product on both routes
    and keeps oneDNN only if it is at most 1.25x slower.  Both routes compute the same exact
    integer product, so the choice changes speed, never results.  Why measure: on one machine
    (Intel, AMX) oneDNN was 1.2-1.8x faster than ``_int_mm``; on another (AMD EPYC, AVX-512 VNNI,
    no AMX) the same torch build ran oneDNN's int8 GEMM about 1000x slower (2048 x 768, M=1..2048).
    """
    choice = os.environ.get(INT8_KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in _INT8_KERNEL_CHOICES:
        raise ValueError(
            f"{INT8_KERNEL_ENV}={os.environ[INT8_KERNEL_ENV]!r} is not one of {_INT8_KERNEL_CHOICES}; "
            f"unset it or pick one (auto measures both CPU routes once and keeps the faster)"
        )
    if choice == "int_mm" or not hasattr(torch.ops.onednn, "qlinear_prepack"):
        return False
    if choice == "onednn":
        return True
    try:
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(-8, 8, (512, 512), dtype=torch.int8, generator=gen)
        a = torch.randint(-8, 8, (16, 512), dtype=torch.int8, generator=gen)
        packed = torch.ops.onednn.qlinear_prepack(codes, [1, 512])
        ones, zeros = torch.ones(512), torch.zeros(512, dtype=torch.int64)
        t_mm = _time_best(lambda: torch._int_mm(a, codes.t()))
        t_dnn = _time_best(lambda: scaled_mm(a, packed, ones, zeros))
    except Exception:  # noqa: BLE001 - optional acceleration only
        return False
    return t_dnn <= 1.25 * t_mm


def prepack(codes: Tensor) -> Tensor | None:
    """Pre-pack int8 ``[N, K]`` codes for oneDNN (CPU), or None if the op is missing / fails / is
    not the faster route on this machine (:func:`onednn_int8_enabled`).

    ``torch._int_mm`` re-lays-out B on every call; where oneDNN's int8 GEMM is fast, packing the
    weight once made the same exact product 1.2-1.8x faster (2048^2, M=1..2048, Intel AMX).  A
    private op: any failure (older / newer torch, no oneDNN) silently keeps the ``_int_mm`` route.
    """
    if codes.device.type != "cpu" or codes.numel() == 0 or not onednn_int8_enabled():
        return None
    try:
        packed = torch.ops.onednn.qlinear_prepack(codes, [1, codes.shape[1]])
        probe = torch.ones(1, codes.shape[1], dtype=torch.int8)
        got = scaled_mm(probe, packed, torch.ones(codes.shape[0]))
        if not torch.equal(got, codes.sum(1, dtype=torch.int64).to(torch.float32).unsqueeze(0)):
            return None
        return packed
    except Exception:  # noqa: BLE001 - optional acceleration only
        return None


SMALL_M = 16  # row counts up to this use the route chosen by fast_at_small_m


def fast_at_small_m(codes: Tensor, packed: Tensor) -> bool:
    """Time one single-row product on each route (after a warm-up call) and keep oneDNN unless it is
    more than 1.5x slower than ``torch._int_mm`` for this weight shape."""
    a = torch.ones(1, codes.shape[1], dtype=torch.int8)
    ones, zeros = torch.ones(codes.shape[0]), torch.zeros(codes.shape[0], dtype=torch.int64)
    t_dnn = _time_best(lambda: scaled_mm(a, packed, ones, zeros))
    return t_dnn <= 1.5 * _time_best(lambda: torch._int_mm(a, codes.t()))


def prepack_groups(stored: Tensor) -> tuple[Tensor, ...] | None:
    """Pre-pack every group of int8 ``[N, G, n_g]`` codes; None unless all succeed."""
    packed = []
    for g in range(stored.shape[1]):
        p = prepack(stored[:, g].contiguous())
        if p is None:
            return None
        packed.append(p)
    return tuple(packed) if packed else None


def scaled_mm(a: Tensor, packed: Tensor, col_scale: Tensor, zeros: Tensor | None = None) -> Tensor:
    """fp32 ``(a @ codes^T) * col_scale`` with the int32 accumulator converted once (exact < 2^24).

    ``zeros``: int64 ``[N]`` zeros (the weight zero points the op takes), built here when None.
    """
    if zeros is None:
        zeros = torch.zeros(col_scale.shape[0], dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(
        a, 1.0, 0, packed, col_scale, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )
