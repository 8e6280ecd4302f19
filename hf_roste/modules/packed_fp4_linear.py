"""Packed FP4 (NVFP4 / MXFP4) linear layer with a CPU reference kernel (dequantize, then matmul).

State (all in ``state_dict``), the layout of compressed-tensors' ``nvfp4-pack-quantized`` /
``mxfp4-pack-quantized``:

* ``weight_packed``        uint8 ``[out, in / 2]``: e2m1 codes (bit 3 sign), two per byte, the even
  input index in the low nibble.
* ``weight_scale``         ``[out, in / block]``: float8_e4m3fn (NVFP4) or uint8 e8m0 codes (MXFP4).
* ``weight_global_scale``  fp32 ``[1]`` (NVFP4 only): the block scales are divided by it.
* ``bias``                 optional float ``[out]``.
* ``weight``               an EMPTY uint8 marker, as in :class:`~hf_roste.modules.packed_linear.PackedLinear`
  (a loader that does not know RoSTE fails on the shape instead of random-initialising the layer).

Forward: ``y = Q_a(T(x)) @ W_hat^T + b`` where ``W_hat`` is :func:`~hf_roste.numerics.fp4.dequantize_fp4`
of the stored codes (built lazily, cached per dtype, rebuilt when a buffer changes), ``T`` the optional
online Hadamard (R4) and ``Q_a`` the activation fake quantizer of the trained model (FP4 or int):
the same numbers as :class:`~hf_roste.modules.qat_linear.QATLinear`'s forward, bit for bit in fp32.
FP4 tensor-core kernels (Blackwell) are the serving engines' job; this is the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..numerics import QuantSpec, fake_quantize
from ..numerics.fp4 import FP4Spec, dequantize_fp4, pack_fp4, quantize_fp4, unpack_fp4
from .packed_linear import check_features
from .shared_input import SharedInputQuant

__all__ = ["PackedFP4Linear"]

_KEEP_DTYPE = ("weight_scale", "weight_global_scale")


class PackedFP4Linear(nn.Module):
    """``y = x @ W_hat^T + b`` with ``W_hat`` stored as packed FP4 codes and encoded block scales.

    Args:
        in_features, out_features: layer sizes (``in_features`` a multiple of the block size).
        weight_spec: the weight :class:`FP4Spec` (``global_scale="tensor"``).
        act_spec: activation quantizer (:class:`FP4Spec` or int :class:`QuantSpec`; bits 16 = none).
        bias: whether the layer has a bias. bias_dtype: its dtype. device: of the buffers.
        input_transform: optional callable applied to ``x`` first (the online R4 Hadamard).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_spec: FP4Spec,
        act_spec: QuantSpec | FP4Spec,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        input_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        check_features(in_features, out_features)
        if not isinstance(weight_spec, FP4Spec) or weight_spec.global_scale != "tensor":
            raise TypeError(f"weight_spec must be an FP4Spec with global_scale='tensor', got {weight_spec!r}")
        if not isinstance(act_spec, (QuantSpec, FP4Spec)):
            raise TypeError(f"act_spec must be a QuantSpec or FP4Spec, got {type(act_spec).__name__}")
        groups = weight_spec.num_groups(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self.input_transform = input_transform
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                          device=device))
        scale = torch.ones(out_features, groups, device=device).to(torch.float8_e4m3fn) \
            if weight_spec.format == "nvfp4" else torch.full((out_features, groups), 127, dtype=torch.uint8,
                                                             device=device)
        self.register_buffer("weight_scale", scale)
        if weight_spec.has_global_scale:
            self.register_buffer("weight_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.weight_global_scale = None
        self.register_buffer("weight", torch.zeros(0, dtype=torch.uint8, device=device))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._cache: Tensor | None = None
        self._cache_key: tuple | None = None
        self.shared_input: SharedInputQuant | None = None

    @classmethod
    def from_float(
        cls, weight: Tensor, bias: Tensor | None, weight_spec: FP4Spec, act_spec: QuantSpec | FP4Spec,
        input_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> PackedFP4Linear:
        """Quantize a float weight ``[out, in]``; ``dequantized_weight()`` then equals
        ``fake_quantize(weight.float(), weight_spec)`` bit for bit."""
        if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
            raise TypeError(f"weight must be a 2-D float tensor [out, in], got {getattr(weight, 'shape', weight)!r}")
        out_f, in_f = weight.shape
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias must be None or of shape ({out_f},), got {tuple(bias.shape)}")
        layer = cls(in_f, out_f, weight_spec, act_spec, bias=bias is not None,
                    bias_dtype=bias.dtype if bias is not None else torch.float32, device=weight.device,
                    input_transform=input_transform)
        with torch.no_grad():
            enc = quantize_fp4(weight.detach(), weight_spec)
            layer.weight_packed.copy_(pack_fp4(enc.codes))
            layer.weight_scale.copy_(enc.block_scale)
            if enc.global_scale is not None:
                layer.weight_global_scale.copy_(enc.global_scale)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def weight_codes(self) -> Tensor:
        """Unpacked uint8 e2m1 codes ``[out, in]``."""
        return unpack_fp4(self.weight_packed, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Float weight ``[out, in]``: ``e2m1(code) * block scale (/ global scale)``, computed in fp32."""
        return dequantize_fp4(self.weight_codes(), self.weight_scale, self.weight_global_scale, self.weight_spec,
                              dtype=dtype)

    def invalidate_cache(self) -> None:
        """Drop the cached dequantized weight (rebuilt on the next forward)."""
        self._cache, self._cache_key = None, None

    def _weight_for(self, dtype: torch.dtype) -> Tensor:
        bufs = [self.weight_packed, self.weight_scale] + ([self.weight_global_scale]
                                                          if self.weight_global_scale is not None else [])
        key = (dtype, *((b.data_ptr(), b._version, b.device) for b in bufs))
        if self._cache_key != key:
            with torch.no_grad():
                self._cache = self.dequantized_weight(torch.float32).to(dtype)
            self._cache_key = key
        assert self._cache is not None
        return self._cache

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"], state["_cache_key"] = None, None
        return state

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        """Device moves apply to every buffer; dtype casts (``model.to(torch.bfloat16)``) must not touch the
        encoded scales, which define the quantized weight: they follow the device and keep their dtype."""
        keep = {name: self._buffers[name] for name in _KEEP_DTYPE if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def quantize_input(self, x: Tensor) -> Tensor:
        """Online R4 (if set) then the activation quantizer: what the matmul sees."""
        shared = self.shared_input
        key = (self.act_spec, torch.is_grad_enabled())
        if shared is not None and self.input_transform is None:
            hit = shared.lookup(x, key)
            if hit is not None:
                return hit
        source = x
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.act_spec.enabled:
            x = fake_quantize(x, self.act_spec)
        if shared is not None and self.input_transform is None:
            shared.store(source, key, x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must be a tensor [..., {self.in_features}], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        xq = self.quantize_input(x)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(xq, self._weight_for(x.dtype), b)

    def extra_repr(self) -> str:
        a = self.act_spec.format if isinstance(self.act_spec, FP4Spec) else f"int{self.act_spec.bits}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.weight_spec.format}, act={a}")
