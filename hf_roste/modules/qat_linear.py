"""Train-time linear layer: fake-quantized weight and input with a straight-through backward.

`QATLinear` is an `nn.Linear` subclass with the same parameters (`weight`, `bias`), so checkpoints,
optimizers, FSDP and PEFT's LoRA treat it like any linear. Its forward computes

    y = Q_a(x R4?) @ Q_w(W)^T + b

where `Q_a` quantizes per token, `Q_w` per output channel (or group), both through
`hf_roste.numerics.fake_quantize` (the same definitions the packed int kernels use), and the
optional online Hadamard `R4` (down_proj input) is active when `input_hadamard` is True (its
transpose is then already fused into `weight`). In training, `Q_w(W)` is computed once per optimizer
step and reused by every micro-batch and checkpoint recomputation (`hf_roste.modules.weight_cache`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics import FP4Spec, QuantSpec, fake_quantize
from ..numerics.block_hadamard import r4_transform
from ..numerics.kernels import use_triton
from ..numerics.quantize import fake_quantize_op, fake_quantize_op_supports
from .shared_input import SharedInputQuant
from .weight_cache import QuantizedWeightCache


def _autocast_input_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype a float32 ``x`` will be cast to by the matmul, where the fused kernel (or a compile
    trace) produces it directly; None elsewhere (the eager CPU path keeps ``fake_quantize``)."""
    device_type = x.device.type
    if x.dtype != torch.float32 or device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    amp = torch.get_autocast_dtype(device_type)
    if amp not in (torch.bfloat16, torch.float16):
        return None
    return amp if torch.compiler.is_compiling() or use_triton(x.device) else None


class QATLinear(nn.Linear):
    """`nn.Linear` with straight-through fake quantization of its weight and input.

    Args:
        weight_spec: quantizer of `weight` `[out, in]` (granularity "channel" or "group"), or an `FP4Spec`
            (NVFP4 / MXFP4 blocks along `in`).
        act_spec: quantizer of the input `[..., in]` (granularity "token"), or an `FP4Spec`.
        input_hadamard: apply the online Hadamard transform (R4) to the input before quantizing.

    `input_hadamard_block` (None: full-size R4; a power of two: block-diagonal R4, see
    `hf_roste.numerics.block_hadamard`) is set by the converter from `RoSTEConfig.r4_block_size`.
    """

    input_hadamard_block: int | None = None
    cache_quantized_weight: bool = True
    """Reuse `Q_w(weight)` while the weight is unchanged in training (see `hf_roste.modules.weight_cache`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_spec: QuantSpec | FP4Spec,
        act_spec: QuantSpec | FP4Spec,
        input_hadamard: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self.input_hadamard = input_hadamard
        self.quant_enabled = True
        self.shared_input: SharedInputQuant | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weight_spec: QuantSpec | FP4Spec, act_spec: QuantSpec | FP4Spec,
        input_hadamard: bool = False
    ) -> QATLinear:
        """Wrap an existing linear, sharing (not copying) its `weight` and `bias` parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.weight_spec, new.act_spec = weight_spec, act_spec
        new.input_hadamard = input_hadamard
        new.quant_enabled = True
        new.shared_input = None
        for hook_dict in ("_forward_pre_hooks", "_forward_hooks"):
            getattr(new, hook_dict).update(getattr(linear, hook_dict))
        return new

    def quantized_weight(self) -> torch.Tensor:
        """`Q_w(weight)` (the weight the deployed model stores), with straight-through gradient."""
        if not (self.quant_enabled and self.weight_spec.enabled):
            return self.weight
        if self.cache_quantized_weight and self.training and torch.is_grad_enabled() \
                and self.weight.requires_grad and not torch.compiler.is_compiling():
            cache = self.__dict__.get("_weight_cache")
            if cache is None:
                cache = self.__dict__["_weight_cache"] = QuantizedWeightCache()
            spec = self.weight_spec
            return cache.get(self.weight, lambda w: fake_quantize(w, spec))
        return fake_quantize(self.weight, self.weight_spec)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Online R4 (if on) then `Q_a` per token: what the matmul of the deployed model sees."""
        shared = self.shared_input
        if shared is not None and torch.compiler.is_compiling():
            shared = None  # the memo keys on tensor identity and version, which a traced graph cannot guard on
        if shared is not None:
            key = (self.act_spec, self.input_hadamard, self.input_hadamard_block, self.quant_enabled, torch.is_grad_enabled())
            hit = shared.lookup(x, key)
            if hit is not None:
                return hit
        source = x
        if self.input_hadamard:
            x = r4_transform(x, self.input_hadamard_block)
        if self.quant_enabled and self.act_spec.enabled:
            amp = _autocast_input_dtype(x) if fake_quantize_op_supports(self.act_spec) else None
            if amp is not None:  # quantize straight into the dtype autocast would cast the result to
                x = fake_quantize_op(x, self.act_spec, out_dtype=amp)
            else:
                x = fake_quantize(x, self.act_spec)
        if shared is not None:
            shared.store(source, key, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        def describe(spec: QuantSpec | FP4Spec) -> str:
            if isinstance(spec, FP4Spec):
                return spec.format
            return f"{spec.bits}{'s' if spec.symmetric else 'a'}/{spec.granularity}"

        return (f"{super().extra_repr()}, w{describe(self.weight_spec)}, a{describe(self.act_spec)}, "
                f"R4_online={self.input_hadamard}")
