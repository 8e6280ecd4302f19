"""Tests for hf_roste.numerics.packing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_roste.numerics import (
    QuantSpec,
    dequantize,
    from_unsigned,
    pack_codes,
    packed_length,
    quantize,
    to_unsigned,
    unpack_codes,
)

PROPS = settings(max_examples=80, deadline=None)


@PROPS
@given(
    st.sampled_from([2, 3, 4, 8]),
    st.lists(st.integers(1, 3), min_size=0, max_size=2),
    st.integers(0, 40),
    st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, lead, n, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, n), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packed_length(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("bits, n, expected", [(8, 5, 5), (4, 5, 3), (4, 4, 2), (2, 5, 2), (2, 8, 2),
                                               (3, 1, 3), (3, 8, 3), (3, 9, 6), (4, 0, 0)])
def test_packed_length(bits, n, expected):
    assert packed_length(n, bits) == expected


def test_documented_byte_order():
    u8 = lambda v: torch.tensor(v, dtype=torch.uint8)  # noqa: E731
    assert torch.equal(pack_codes(u8([0x1, 0xA, 0x3]), 4), u8([0xA1, 0x03]))  # 2i low nibble, pad 0
    assert torch.equal(pack_codes(u8([1, 2, 3, 0, 3]), 2), u8([0b00111001, 0b00000011]))
    # 3-bit: v = sum c_k << 3k, bytes little endian
    c = [1, 2, 3, 4, 5, 6, 7, 0]
    v = sum(ck << (3 * k) for k, ck in enumerate(c))
    assert torch.equal(pack_codes(u8(c), 3), u8([v & 0xFF, (v >> 8) & 0xFF, v >> 16]))
    assert torch.equal(pack_codes(u8([7]), 3), u8([7, 0, 0]))
    assert torch.equal(pack_codes(u8([200, 3]), 8), u8([200, 3]))


def test_pack_is_a_copy_for_8_bits():
    c = torch.arange(6, dtype=torch.uint8)
    p = pack_codes(c, 8)
    p[0] = 99
    assert c[0] == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_quantize_pack_dequantize_pipeline(bits, sym):
    spec = QuantSpec(bits, sym, 0.9, "group", 8)
    x = torch.randn(3, 5, 24)
    codes, s, z = quantize(x, spec)
    packed = pack_codes(to_unsigned(codes, spec), bits)
    restored = from_unsigned(unpack_codes(packed, bits, 24), spec)
    assert restored.dtype == codes.dtype and torch.equal(restored, codes)
    assert torch.equal(dequantize(restored, s, z, spec), dequantize(codes, s, z, spec))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_unsigned_mapping(bits):
    spec = QuantSpec(bits, symmetric=True)
    codes = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.int8)
    u = to_unsigned(codes, spec)
    assert u.dtype == torch.uint8 and torch.equal(u, torch.arange(0, 2**bits).to(torch.uint8))
    assert torch.equal(from_unsigned(u, spec), codes)
    asym = QuantSpec(bits)
    cu = torch.arange(0, 2**bits).to(torch.uint8)
    assert to_unsigned(cu, asym) is cu and from_unsigned(cu, asym) is cu


def test_validation_errors():
    with pytest.raises(ValueError, match=r"codes must be in \[0, 15\].*16"):
        pack_codes(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"\[0, 7\].*8"):
        pack_codes(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(TypeError, match="uint8.*int8"):
        pack_codes(torch.tensor([1], dtype=torch.int8), 4)
    with pytest.raises(TypeError, match="Tensor"):
        pack_codes([1, 2], 4)
    with pytest.raises(ValueError, match="bits.*5"):
        pack_codes(torch.tensor([1], dtype=torch.uint8), 5)
    with pytest.raises(TypeError, match="bits"):
        packed_length(4, 4.0)
    with pytest.raises(ValueError, match="length.*-1"):
        packed_length(-1, 4)
    with pytest.raises(ValueError, match=r"packed_length\(5, 4\) = 3.*got 2"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, 5)
    with pytest.raises(TypeError, match="packed"):
        unpack_codes(torch.zeros(2, dtype=torch.int32), 4, 4)
    sym = QuantSpec(4, symmetric=True)
    with pytest.raises(TypeError, match="int8"):
        to_unsigned(torch.tensor([1], dtype=torch.uint8), sym)
    with pytest.raises(ValueError, match=r"\[-8, 7\].*\[-9, 0\]"):
        to_unsigned(torch.tensor([-9, 0], dtype=torch.int8), sym)
    with pytest.raises(ValueError, match=r"\[0, 15\].*20"):
        from_unsigned(torch.tensor([20], dtype=torch.uint8), sym)
    with pytest.raises(ValueError, match="bits=16"):
        to_unsigned(torch.tensor([1], dtype=torch.uint8), QuantSpec(16))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 7), (0, 0, 3)])
def test_zero_size_leading_dims(bits, shape):
    codes = torch.zeros(shape, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (*shape[:-1], packed_length(shape[-1], bits))
    assert unpack_codes(packed, bits, shape[-1]).shape == shape
