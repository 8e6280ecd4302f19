"""Bit packing of unsigned quantization codes along the last dim.

Byte order (``codes[..., i]`` is element ``i`` of the last dim; all widths are little-endian,
the lower-indexed element always lands in the lower bits):

* 8-bit: identity copy, ``packed[..., i] = codes[..., i]``.
* 4-bit: two codes per byte, ``packed[..., j] = codes[..., 2j] | codes[..., 2j+1] << 4``
  (element ``2j`` in the LOW nibble).
* 2-bit: four codes per byte, ``packed[..., j] = sum_k codes[..., 4j+k] << 2k``.
* 3-bit: eight codes per three bytes.  For group ``g`` the 24-bit value
  ``v = sum_k codes[..., 8g+k] << 3k`` (element ``8g`` in the lowest bits) is stored
  little-endian: ``packed[..., 3g] = v & 0xFF``, ``packed[..., 3g+1] = (v >> 8) & 0xFF``,
  ``packed[..., 3g+2] = v >> 16``.

A last dim that is not a multiple of the codes-per-unit (2, 4 or 8) is zero-padded at the end,
so ``packed_length(n, bits)`` is ``n``, ``ceil(n/2)``, ``ceil(n/4)`` or ``3 * ceil(n/8)`` for
8, 4, 2 and 3 bits.  Signed (symmetric) codes are mapped to unsigned ones with
:func:`to_unsigned` (add ``2^(b-1)``) before packing and back with :func:`from_unsigned`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .spec import QuantSpec

__all__ = ["pack_codes", "unpack_codes", "packed_length", "to_unsigned", "from_unsigned"]

_PACK_BITS = (2, 3, 4, 8)


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int in {_PACK_BITS}, got {type(bits).__name__} {bits!r}")
    if bits not in _PACK_BITS:
        raise ValueError(f"bits must be one of {_PACK_BITS}, got {bits!r}")
    return bits


def _check_uint8(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"{name} must have dtype torch.uint8, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dimension, got 0-dim")
    return t


def packed_length(length: int, bits: int) -> int:
    """Number of bytes along the last dim after packing ``length`` codes of width ``bits``.

    Raises:
        TypeError: non-int ``length`` / ``bits``.
        ValueError: negative ``length`` or ``bits`` not in (2, 3, 4, 8).
    """
    bits = _check_bits(bits)
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"length must be an int >= 0, got {type(length).__name__} {length!r}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if bits == 8:
        return length
    if bits == 3:
        return 3 * ((length + 7) // 8)
    per_byte = 8 // bits
    return (length + per_byte - 1) // per_byte


def _pad_last(t: Tensor, multiple: int) -> Tensor:
    rem = t.shape[-1] % multiple
    return t if rem == 0 else F.pad(t, (0, multiple - rem))


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes along the last dim (byte order in the module docstring).

    Args:
        codes: uint8 tensor ``[..., n]`` with values in ``[0, 2^bits)``.
        bits: 2, 3, 4 or 8.

    Returns:
        uint8 tensor ``[..., packed_length(n, bits)]`` (a copy, also for 8 bits).

    Raises:
        TypeError: ``codes`` is not a uint8 tensor or ``bits`` is not an int.
        ValueError: ``bits`` unsupported, 0-dim ``codes`` or a code ``>= 2^bits``.
    """
    bits = _check_bits(bits)
    codes = _check_uint8(codes, "codes")
    if codes.numel() > 0 and bits < 8:
        hi = int(codes.max())
        if hi >= (1 << bits):
            raise ValueError(f"codes must be in [0, {(1 << bits) - 1}] for bits={bits}, got max value {hi}")
    if bits == 8:
        return codes.clone()
    lead = codes.shape[:-1]
    if bits == 3:
        c = _pad_last(codes, 8).to(torch.int32)
        c = c.reshape(*lead, c.shape[-1] // 8, 8)  # explicit sizes: -1 is ambiguous for 0-size leads
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=codes.device)
        v = (c << shifts).sum(dim=-1, dtype=torch.int32)  # disjoint bit fields: sum == OR
        out = torch.stack((v & 0xFF, (v >> 8) & 0xFF, v >> 16), dim=-1)
        return out.to(torch.uint8).reshape(*lead, out.shape[-2] * 3)
    per_byte = 8 // bits
    c = _pad_last(codes, per_byte)
    c = c.reshape(*lead, c.shape[-1] // per_byte, per_byte)
    out = c[..., 0].clone()
    for k in range(1, per_byte):
        out |= c[..., k] << (bits * k)
    return out


def unpack_codes(packed: Tensor, bits: int, length: int) -> Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        packed: uint8 tensor ``[..., packed_length(length, bits)]``.
        bits: 2, 3, 4 or 8.
        length: number of codes ``n`` to return along the last dim (drops the padding).

    Returns:
        uint8 tensor ``[..., length]`` with values in ``[0, 2^bits)``.

    Raises:
        TypeError: ``packed`` is not a uint8 tensor, non-int ``bits`` / ``length``.
        ValueError: unsupported ``bits`` or last dim != ``packed_length(length, bits)``.
    """
    bits = _check_bits(bits)
    packed = _check_uint8(packed, "packed")
    expected = packed_length(length, bits)
    if packed.shape[-1] != expected:
        raise ValueError(f"packed last dim must be packed_length({length}, {bits}) = {expected}, "
                         f"got {packed.shape[-1]}")
    if bits == 8:
        return packed.clone()
    lead = packed.shape[:-1]
    if bits == 3:
        b = packed.to(torch.int32).reshape(*lead, packed.shape[-1] // 3, 3)
        v = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
        out = (v.unsqueeze(-1) >> shifts) & 0x7
        return out.to(torch.uint8).reshape(*lead, out.shape[-2] * 8)[..., :length]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * k)) & mask for k in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*lead, packed.shape[-1] * per_byte)[..., :length]


def _check_codes_spec(codes: object, spec: object) -> tuple[Tensor, QuantSpec]:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not spec.enabled:
        raise ValueError(f"spec.bits=16 means quantization is disabled (no integer codes); got {spec}")
    if not isinstance(codes, Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    return codes, spec


def unsigned_offset(spec: QuantSpec) -> int:
    """What :func:`to_unsigned` adds to a code: ``2^(bits-1)`` for symmetric specs, 0 for asymmetric ones.

    Storage codecs that work on other dtypes (fp32 codes in the KV cache, int16 in the export) use
    this offset so every stored code is the same unsigned value ``to_unsigned`` gives.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    return -spec.qmin if spec.symmetric else 0


def to_unsigned(codes: Tensor, spec: QuantSpec) -> Tensor:
    """Map codes to unsigned storage codes in ``[0, 2^bits)``.

    Symmetric: int8 codes in ``[-2^(b-1), 2^(b-1) - 1]`` -> uint8 ``codes + 2^(b-1)``.
    Asymmetric: uint8 codes are returned unchanged (same tensor, range checked).

    Args:
        codes: int8 (symmetric) or uint8 (asymmetric) tensor of any shape.
        spec: enabled :class:`QuantSpec` the codes were produced with.

    Returns:
        uint8 tensor of the same shape.

    Raises:
        TypeError: wrong dtype for the spec.  ValueError: codes outside the spec's code range
        or disabled spec.
    """
    codes, spec = _check_codes_spec(codes, spec)
    want = torch.int8 if spec.symmetric else torch.uint8
    if codes.dtype != want:
        raise TypeError(f"codes must have dtype {want} for symmetric={spec.symmetric}, got {codes.dtype}")
    if codes.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(codes))
        if lo < spec.qmin or hi > spec.qmax:
            raise ValueError(f"codes must be in [{spec.qmin}, {spec.qmax}] for {spec.bits}-bit "
                             f"symmetric={spec.symmetric}, got range [{lo}, {hi}]")
    if not spec.symmetric:
        return codes
    return (codes.to(torch.int16) + unsigned_offset(spec)).to(torch.uint8)


def from_unsigned(codes: Tensor, spec: QuantSpec) -> Tensor:
    """Inverse of :func:`to_unsigned`.

    Args:
        codes: uint8 tensor with values in ``[0, 2^bits)``.
        spec: enabled :class:`QuantSpec`.

    Returns:
        int8 ``codes - 2^(b-1)`` (symmetric) or ``codes`` unchanged (asymmetric).

    Raises:
        TypeError: ``codes`` not uint8.  ValueError: value ``>= 2^bits`` or disabled spec.
    """
    codes, spec = _check_codes_spec(codes, spec)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must have dtype torch.uint8, got {codes.dtype}")
    if codes.numel() > 0:
        hi = int(codes.max())
        if hi >= (1 << spec.bits):
            raise ValueError(f"codes must be in [0, {(1 << spec.bits) - 1}] for bits={spec.bits}, got max {hi}")
    if not spec.symmetric:
        return codes
    return (codes.to(torch.int16) - unsigned_offset(spec)).to(torch.int8)
