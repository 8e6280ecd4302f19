"""Packed low-bit linear layer computing with a real integer kernel.

State (all in ``state_dict``):

* ``weight_packed``      uint8 ``[out, packed_length(in, bits)]`` unsigned codes (symmetric codes are
  shifted by ``2^(b-1)``); 4-bit codes are two per byte, low nibble first.
* ``weight_scale``       fp32 ``[out, G]``  (``G = 1`` per channel, ``in / group_size`` per group).
* ``weight_zero_point``  fp32 ``[out, G]``  integer-valued (all zeros for symmetric weights).
* ``bias``               optional float ``[out]`` parameter.
* ``weight``             an EMPTY uint8 marker (shape ``[0]``): a loader that does not know RoSTE
  expects a float ``[out, in]`` weight there, sees a shape mismatch and raises, instead of
  silently random-initialising the layer (transformers' behaviour for an unknown quant_method).

The int8 kernel layout (:class:`~hf_roste.numerics.int_matmul.IntWeight`) and, in weight-only
mode (``act_spec.bits == 16``), the dequantized weight are built LAZILY on first use and kept in a
plain attribute (never in ``state_dict``).  They are rebuilt whenever a weight buffer's storage
or version counter changes (``load_state_dict``, in-place writes, ``.to(device)``), or after
:meth:`PackedLinear.invalidate_cache`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from hf_roste.numerics.int_matmul import (
    IntWeight,
    check_linear_input,
    int_linear_unchecked,
    prepare_int_weight,
    quantize_activation,
)

from ..numerics.block_hadamard import r4_transform
from ..numerics.hadamard import hadamard_transform
from ..numerics.kernels import use_triton
from .shared_input import SharedInputQuant

__all__ = ["PackedLinear", "fused_r4_block"]

_WEIGHT_BITS = (2, 3, 4, 8)


def check_features(in_features: object, out_features: object) -> None:
    """`in_features` and `out_features` of a packed linear must be positive ints."""
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_specs(weight_spec: object, act_spec: object) -> None:
    if not isinstance(weight_spec, QuantSpec):
        raise TypeError(f"weight_spec must be a QuantSpec, got {type(weight_spec).__name__}")
    if not isinstance(act_spec, QuantSpec):
        raise TypeError(f"act_spec must be a QuantSpec, got {type(act_spec).__name__}")
    if weight_spec.bits not in _WEIGHT_BITS:
        raise ValueError(f"weight_spec.bits must be one of {_WEIGHT_BITS}, got {weight_spec.bits}")
    if weight_spec.granularity not in ("channel", "group"):
        raise ValueError(
            f"weight_spec.granularity must be 'channel' or 'group', got {weight_spec.granularity!r}"
        )
    if act_spec.enabled and act_spec.granularity not in ("token", "tensor"):
        raise ValueError(
            f"act_spec.granularity must be 'token' or 'tensor' (or bits=16 for weight-only), "
            f"got {act_spec.granularity!r}"
        )


def fused_r4_block(transform: Callable[[Tensor], Tensor] | None, in_features: int) -> int | None:
    """Hadamard block of an online R4 ``transform`` that the fused rotate + quantize kernel can run, or None.

    Recognised: :func:`~hf_roste.numerics.hadamard.hadamard_transform` (full-size R4: one block of
    ``in_features``) and ``functools.partial(r4_transform, block=b)`` (block-diagonal R4, as
    :func:`hf_roste.convert.finish_packed_model` sets them), when
    :func:`~hf_roste.numerics.kernels.rotate_quant.fused_r4_supported` accepts the block (a power of two up
    to 8192 dividing ``in_features``).  Any other callable (signs, transposes, non-power-of-two sizes) keeps
    the unfused route: the transform, then the activation quantizer.
    """
    from ..numerics.kernels.rotate_quant import fused_r4_supported

    if transform is hadamard_transform:
        block: int | None = in_features
    elif (isinstance(transform, functools.partial) and transform.func is r4_transform and not transform.args
          and set(transform.keywords) <= {"block", "transpose"} and not transform.keywords.get("transpose", False)):
        block = transform.keywords.get("block")
        block = in_features if block is None else block
    else:
        return None
    return block if fused_r4_supported(block, in_features) else None


class PackedLinear(nn.Module):
    """``y = x @ W_hat^T + b`` with ``W_hat`` stored as packed integer codes.

    Args:
        in_features, out_features: layer sizes.
        weight_spec: weight :class:`QuantSpec` (bits 2/3/4/8, granularity "channel" or "group").
        act_spec: activation spec; bits 2..8 with granularity "token" runs the integer kernel,
            bits 16 runs weight-only (dequantized weight cached once, then ``F.linear``).
        bias: whether the layer has a bias parameter.
        bias_dtype: dtype of the bias parameter.
        device: device of the buffers.
        input_transform: optional callable applied to ``x`` before activation quantization
            (e.g. an online Hadamard rotation); it must preserve the last dim.  On the Triton route an
            online R4 that :func:`fused_r4_block` recognises runs fused with the activation quantizer
            (:mod:`hf_roste.numerics.kernels.rotate_quant`).

    Forward: ``x [..., in]`` fp32/bf16/fp16 -> ``[..., out]`` in ``x.dtype``.  Inference only
    (the integer path has no meaningful gradient).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_spec: QuantSpec,
        act_spec: QuantSpec,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        input_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        check_features(in_features, out_features)
        _check_specs(weight_spec, act_spec)
        self.in_features = in_features
        self.out_features = out_features
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self.input_transform = input_transform
        groups = weight_spec.num_groups(in_features)
        nbytes = packed_length(in_features, weight_spec.bits)
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, nbytes, dtype=torch.uint8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer(
            "weight_zero_point", torch.zeros(out_features, groups, dtype=torch.float32, device=device)
        )
        self.register_buffer("weight", torch.zeros(0, dtype=torch.uint8, device=device))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        self._cache: Any = None
        self._cache_key: tuple | None = None
        self.shared_input: SharedInputQuant | None = None

        self._fused_r4_memo: tuple[Any, int | None] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        weight_spec: QuantSpec,
        act_spec: QuantSpec,
        input_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> PackedLinear:
        """Quantize a float weight ``[out, in]`` (and copy ``bias [out]``) into a new layer.

        ``dequantized_weight(torch.float32)`` of the result equals ``fake_quantize(weight, weight_spec)``.
        """
        if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
            got = (weight.dtype, tuple(weight.shape)) if isinstance(weight, Tensor) else type(weight).__name__
            raise TypeError(f"weight must be a 2-D float tensor [out, in], got {got}")
        out_f, in_f = weight.shape
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (out_f,)):
            raise ValueError(
                f"bias must be None or a tensor of shape ({out_f},), got "
                f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}"
            )
        layer = cls(
            in_f,
            out_f,
            weight_spec,
            act_spec,
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            device=weight.device,
            input_transform=input_transform,
        )
        with torch.no_grad():
            codes, scale, zero = quantize(weight.detach(), weight_spec)
            unsigned = to_unsigned(codes, weight_spec) if weight_spec.symmetric else codes
            layer.weight_packed.copy_(pack_codes(unsigned, weight_spec.bits))
            layer.weight_scale.copy_(scale)
            layer.weight_zero_point.copy_(zero)
            if bias is not None:
                assert layer.bias is not None
                layer.bias.copy_(bias.detach())
        return layer

    # ------------------------------------------------------------------ weight views
    def weight_codes(self) -> Tensor:
        """Unpacked codes ``[out, in]``: uint8 (asymmetric) or int8 (symmetric), as ``quantize`` returns."""
        codes = unpack_codes(self.weight_packed, self.weight_spec.bits, self.in_features)
        return from_unsigned(codes, self.weight_spec) if self.weight_spec.symmetric else codes

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Float weight ``[out, in]``; in fp32 exactly ``fake_quantize(W, weight_spec)``."""
        return dequantize(
            self.weight_codes(), self.weight_scale, self.weight_zero_point, self.weight_spec, dtype=dtype
        )

    # ------------------------------------------------------------------ lazy kernel cache
    def _current_key(self) -> tuple:
        bufs = (self.weight_packed, self.weight_scale, self.weight_zero_point)
        return tuple((b.data_ptr(), b._version, b.device) for b in bufs)

    def invalidate_cache(self) -> None:
        """Drop the kernel-layout / dequantized-weight cache (rebuilt on the next forward)."""
        self._cache = None
        self._cache_key = None

    def _cached(self, kind: str, dtype: torch.dtype | None = None) -> Any:
        key = (kind, dtype, self._current_key())
        if self._cache_key != key:
            with torch.no_grad():
                if kind == "triton":
                    from hf_roste.numerics.kernels.packed_gemm import prepare_packed_weight

                    # None (layer keeps the PyTorch path) is cached too
                    self._cache = prepare_packed_weight(
                        self.weight_packed, self.weight_scale, self.weight_zero_point, self.weight_spec,
                        self.in_features,
                    )
                elif kind == "int":
                    self._cache = prepare_int_weight(
                        self.weight_codes(), self.weight_scale, self.weight_zero_point, self.weight_spec,
                        codes_source=self.weight_codes,
                    )
                else:
                    assert dtype is not None
                    self._cache = self.dequantized_weight(torch.float32).to(dtype)
            self._cache_key = key
        return self._cache

    def __getstate__(self) -> dict[str, Any]:
        # the cache may hold an opaque (oneDNN-packed) tensor that cannot be copied or pickled;
        # deepcopy / torch.save get a cache-free copy that rebuilds lazily
        state = self.__dict__.copy()
        state["_cache"] = None
        state["_cache_key"] = None
        state["_fused_r4_memo"] = None
        return state

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        """Device moves apply to every buffer, but dtype casts (``model.to(torch.bfloat16)``,
        ``.half()``) must not round the fp32 scales and zero points: they define the quantized
        weight.  Those two buffers follow the new device and stay fp32."""
        keep = {name: self._buffers[name] for name in ("weight_scale", "weight_zero_point")}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new is not None and old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def kernel_weight(self) -> IntWeight:
        """The (lazily built, cached) int8 kernel layout of the weight."""
        return self._cached("int")

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features)  # once: the kernel call below does not check again
        if self.act_spec.enabled and self.act_spec.granularity == "token" and use_triton(x.device) \
                and self._triton_ok():
            return self._forward_triton(x)  # applies input_transform itself (fused when it can)
        if self.input_transform is not None:
            x = self.input_transform(x)
        if not self.act_spec.enabled:
            w = self._cached("float", x.dtype)
            b = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, w, b)
        act = None
        shared = self.shared_input
        if shared is not None and self.input_transform is None and x.numel():
            key = (self.act_spec,)
            act = shared.lookup(x, key)
            if act is None:
                act = quantize_activation(x, self.act_spec)
                shared.store(x, key, act)
        return int_linear_unchecked(x, self.kernel_weight(), self.act_spec, self.bias, act)

    def _triton_weight(self) -> Any:
        """The Triton layout (None: this layer keeps the PyTorch path).  Under ``torch.compile`` the
        layout built by an eager call is used as is (the staleness check reads storage pointers,
        which Dynamo cannot trace); a layer never run eagerly is prepared on the spot."""
        if torch.compiler.is_compiling() and self._cache_key is not None and self._cache_key[0] == "triton":
            return self._cache
        return self._cached("triton")

    def _triton_ok(self) -> bool:
        from hf_roste.numerics.kernels.packed_gemm import packed_weight_supported

        return packed_weight_supported(self.weight_spec, self.in_features) and self._triton_weight() is not None

    def _fused_r4(self) -> int | None:
        """:func:`fused_r4_block` of the current ``input_transform``, memoised on the transform's identity
        (under ``torch.compile`` the memo of an eager call is read, never written)."""
        transform = self.input_transform
        if transform is None:
            return None
        memo = self.__dict__.get("_fused_r4_memo")  # absent on layers pickled before the fused route
        if memo is None or memo[0] is not transform:
            memo = (transform, fused_r4_block(transform, self.in_features))
            if not torch.compiler.is_compiling():
                self._fused_r4_memo = memo
        return memo[1]

    def _forward_triton(self, x: Tensor) -> Tensor:
        """Triton route (:mod:`hf_roste.numerics.kernels.packed_gemm`): reads the packed bytes directly; the
        same codes and, bit for bit, the same outputs as the PyTorch integer path.  An online R4 that
        :func:`fused_r4_block` recognises is applied by the activation kernel itself
        (:mod:`hf_roste.numerics.kernels.rotate_quant`: bit for bit the Triton Hadamard, then the quantizer)."""
        from hf_roste.numerics.kernels.packed_gemm import packed_linear_triton, quantize_activation_triton

        block = self._fused_r4()
        if block is not None:
            from hf_roste.numerics.kernels.rotate_quant import rotate_quantize_activation_triton

            act = rotate_quantize_activation_triton(x, self.act_spec, block)
            return packed_linear_triton(act, self._triton_weight(), self.bias, x.dtype)
        if self.input_transform is not None:
            x = self.input_transform(x)
        act = None
        shared = None if torch.compiler.is_compiling() else self.shared_input  # compiled: one graph, no memo
        key = (self.act_spec, "triton")
        if shared is not None and self.input_transform is None:
            act = shared.lookup(x, key)
        if act is None:
            act = quantize_activation_triton(x, self.act_spec)
            if shared is not None and self.input_transform is None:
                shared.store(x, key, act)
        return packed_linear_triton(act, self._triton_weight(), self.bias, x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight_spec={self.weight_spec}, act_spec={self.act_spec}"
        )
