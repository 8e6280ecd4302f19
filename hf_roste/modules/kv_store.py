"""Storage and fast codec of :class:`~hf_roste.modules.kv_cache.RoSTEQuantizedLayer`.

One :class:`KVStore` per cache layer holds K and V together in preallocated buffers
(``[2, batch, heads, capacity, ...]``, index 0 = K, 1 = V) that grow by a quarter of their size
when full, so appending a decode step writes one token instead of re-concatenating the whole cache.
Only the first ``length`` positions are stored tokens; ``nbytes`` counts those (the format's cost)
and ``allocated_nbytes`` the whole buffers (at most ~25% + 16 tokens more).

The codec quantizes K and V of a step in ONE call of the shared quantizer
(:func:`~hf_roste.numerics.quantize_fp32`, the function ``quantize`` / ``fake_quantize``
use), packs with one small matmul (exact: integers below 256) and decodes the whole cache by
writing each byte's bit fields straight into the fp32 output, a few large ops per step.  Both produce exactly what
:class:`~hf_roste.modules.kv_cache.PackedKV` ``encode`` / ``decode`` produce (same byte layout as
:func:`~hf_roste.numerics.pack_codes`, same fp32 ``(codes - zero) * scale``); the tests compare them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..numerics import QuantSpec, pack_codes, packed_length, quantize_fp32, unpack_codes, unsigned_offset

__all__ = ["KVStore", "encode_kv", "decode_kv"]

_INT8_ZERO_MAX = 127
_MIN_GROWTH = 16


@functools.lru_cache(maxsize=32)
def _pack_weights(bits: int) -> Tensor:
    """fp32 ``[8 // bits]``: ``2^(bits * k)``, so ``codes @ w`` is the packed byte (exact integers)."""
    return torch.tensor([float(1 << (bits * k)) for k in range(8 // bits)], dtype=torch.float32)


def encode_kv(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor | None]:
    """Quantize ``x [..., d]`` per row with ``spec``; return packed bytes, scale and zero.

    Returns ``(packed, scale, zero)``: ``packed`` holds the storage bytes of
    :func:`~hf_roste.numerics.pack_codes` (``[..., packed_length(d, bits)]``; fp32 integer values
    for 2/4/8 bits, uint8 for 3 bits), ``scale`` fp32 ``[..., G]``, ``zero`` fp32 ``[..., G]``
    (None for symmetric specs).  Non-finite rows get code 0 (as ``quantize``).
    """
    d = x.shape[-1]
    lead = x.shape[:-1]
    if x.numel() == 0:  # e.g. a step with no new tokens
        groups = 1 if spec.granularity != "group" else max(1, d // spec.group_size)
        empty = x.new_zeros(*lead, groups, dtype=torch.float32)
        packed = x.new_zeros(*lead, packed_length(d, spec.bits),
                             dtype=torch.uint8 if spec.bits == 3 else torch.float32)
        return packed, empty, None if spec.symmetric else empty.clone()
    codes, scale, zero = quantize_fp32(x, spec)  # grouped layout, fp32 integer-valued codes
    codes = codes.nan_to_num_(nan=0.0).view(*lead, d)
    scale = scale.reshape(*lead, -1)
    if spec.symmetric:
        codes.add_(float(unsigned_offset(spec)))  # to_unsigned's storage codes
    if spec.bits == 8:
        packed = codes
    elif spec.bits == 3:
        packed = pack_codes(codes.to(torch.uint8), 3)
    else:
        per_byte = 8 // spec.bits
        if d % per_byte:
            codes = F.pad(codes, (0, per_byte - d % per_byte))
        # Dynamo traces the lru_cache-wrapped function itself (with a warning): call the function directly
        weights = _pack_weights.__wrapped__(spec.bits) if torch.compiler.is_compiling() else _pack_weights(spec.bits)
        packed = codes.view(*lead, -1, per_byte) @ weights.to(codes.device)
    return packed, scale, None if spec.symmetric else zero.reshape(*lead, -1)


def decode_kv(codes: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec, head_dim: int) -> Tensor:
    """fp32 ``(codes - zero) * scale`` of stored bytes ``codes [..., P]`` (``dequantize``'s arithmetic)."""
    lead = codes.shape[:-1]
    offset = unsigned_offset(spec)
    if spec.bits == 3:
        vals = unpack_codes(codes.contiguous(), 3, head_dim).to(torch.float32)
        if offset:
            vals.sub_(float(offset))  # from_unsigned
    elif spec.bits == 8:
        vals = codes.to(torch.float32)
    else:  # each byte's fields written straight into the fp32 output (measured fastest on CPU)
        per_byte, mask = 8 // spec.bits, (1 << spec.bits) - 1
        vals = torch.empty(*codes.shape, per_byte, dtype=torch.float32, device=codes.device)
        for k in range(per_byte):
            vals[..., k].copy_((codes >> (spec.bits * k)) & mask if k else codes & mask)
        vals = vals.view(*lead, -1)
        if vals.shape[-1] != head_dim:
            vals = vals[..., :head_dim].contiguous()
    if offset and spec.bits != 3:
        vals.sub_(float(offset))  # from_unsigned
    groups = scale.shape[-1]
    grouped = vals.view(*lead, groups, head_dim // groups)
    if zero is not None:
        grouped.sub_(zero.to(torch.float32).unsqueeze(-1))
    grouped.mul_(scale.to(torch.float32).unsqueeze(-1))
    return vals


class KVStore:
    """Packed K and V of one layer: ``codes [2, b, h, cap, P]`` uint8, ``scale [2, b, h, cap, G]``
    (``scale_dtype``) and, for asymmetric specs, ``zero [2, b, h, cap, G]`` int8 (promoted losslessly
    to int32 the first time a zero point does not fit).  Positions ``>= length`` are unused."""

    def __init__(self, spec: QuantSpec, head_dim: int, scale_dtype: torch.dtype) -> None:
        self.spec = spec
        self.head_dim = head_dim
        self.scale_dtype = scale_dtype
        self.codes: Tensor | None = None
        self.scale: Tensor | None = None
        self.zero: Tensor | None = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.codes is None else self.codes.shape[3]

    def _views(self) -> tuple[Tensor, Tensor, Tensor | None]:
        assert self.codes is not None and self.scale is not None
        n = self.length
        zero = None if self.zero is None else self.zero[:, :, :, :n]
        return self.codes[:, :, :, :n], self.scale[:, :, :, :n], zero

    def tensors(self) -> list[Tensor]:
        """The stored (first ``length`` positions) codes, scales and zero points, K and V together."""
        return [] if self.codes is None else [t for t in self._views() if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def allocated_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)

    def _allocate(self, like: Tensor, batch: int, heads: int, groups: int, capacity: int,
                  zero_dtype: torch.dtype) -> None:
        dev = like.device
        nbytes = packed_length(self.head_dim, self.spec.bits)
        codes = torch.empty(2, batch, heads, capacity, nbytes, dtype=torch.uint8, device=dev)
        scale = torch.empty(2, batch, heads, capacity, groups, dtype=self.scale_dtype, device=dev)
        zero = None
        if not self.spec.symmetric:
            zero = torch.empty(2, batch, heads, capacity, groups, dtype=zero_dtype, device=dev)
        if self.length:
            old = self._views()
            codes[:, :, :, : self.length].copy_(old[0])
            scale[:, :, :, : self.length].copy_(old[1])
            if zero is not None:
                zero[:, :, :, : self.length].copy_(old[2])
        self.codes, self.scale, self.zero = codes, scale, zero

    def append(self, packed: Tensor, scale: Tensor, zero: Tensor | None) -> None:
        """Append ``s`` tokens: ``packed [2, b, h, s, P]`` bytes (any dtype holding them), fp32
        ``scale`` / integer-valued fp32 ``zero`` ``[2, b, h, s, G]`` from :func:`encode_kv`."""
        _, batch, heads, s, _ = packed.shape
        groups = scale.shape[-1]
        need = self.length + s
        zero_dtype = torch.int8 if self.zero is None else self.zero.dtype
        if zero is not None and zero_dtype == torch.int8 and zero.numel():
            lo, hi = torch.aminmax(zero)
            if max(-lo.item(), hi.item()) > _INT8_ZERO_MAX:
                zero_dtype = torch.int32
        if self.codes is not None and (self.codes.shape[1] != batch or self.codes.shape[2] != heads):
            raise ValueError(
                f"cannot append K/V of batch {batch} x {heads} heads to a cache holding "
                f"{self.codes.shape[1]} x {self.codes.shape[2]}"
            )
        if need > self.capacity or (self.zero is not None and zero_dtype != self.zero.dtype):
            grow = need if need > self.capacity else self.capacity
            cap = grow + max(_MIN_GROWTH, grow // 4) if need > self.capacity else self.capacity
            self._allocate(packed, batch, heads, groups, cap, zero_dtype)
        assert self.codes is not None and self.scale is not None
        sl = slice(self.length, need)
        self.codes[:, :, :, sl].copy_(packed)
        self.scale[:, :, :, sl].copy_(scale)
        if self.zero is not None and zero is not None:
            self.zero[:, :, :, sl].copy_(zero)
        self.length = need

    def decode(self, start: int = 0) -> Tensor:
        """fp32 ``[2, b, h, length - start, head_dim]`` dequantized K and V of tokens ``start..length``."""
        codes, scale, zero = self._views()
        if start:
            codes, scale = codes[:, :, :, start:], scale[:, :, :, start:]
            zero = None if zero is None else zero[:, :, :, start:]
        return decode_kv(codes, scale, zero, self.spec, self.head_dim)

    def load(self, tensors: tuple[Tensor, Tensor, Tensor | None]) -> None:
        """Replace the content by exactly-sized ``(codes, scale, zero)`` ``[2, b, h, n, ...]`` tensors."""
        codes, scale, zero = tensors
        self.codes, self.scale, self.zero = codes.contiguous(), scale.contiguous(), (
            None if zero is None else zero.contiguous())
        self.length = codes.shape[3]

    def views(self) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """The stored ``(codes, scale, zero)`` (views into the buffers), or None when empty."""
        return None if self.codes is None or self.length == 0 else self._views()
