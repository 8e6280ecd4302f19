"""Weight fake quantization computed once per optimizer step, not once per forward.

With gradient accumulation every micro-batch runs the forward again, and gradient checkpointing
runs each checkpointed forward a second time in the backward; the weights do not change in
between, so neither does ``Q_w(W)``. :class:`QuantizedWeightCache` keeps the last ``Q_w(W)`` of
one linear (detached) and hands it out again while the weight is unchanged, with a
straight-through gradient to ``W``.

"Unchanged" is decided by a key: the weight tensor's identity, its storage address, its version
counter (bumped by every in-place write through autograd-visible tensors: optimizer steps,
``copy_`` under ``no_grad``, ``load_state_dict``), the dtype the product will run in and a global
generation counter bumped after every ``torch.optim`` optimizer step
(:func:`torch.optim.optimizer.register_optimizer_step_post_hook`) and by :func:`invalidate_all`
(call it after writing weights through ``.data``, which bypasses the version counter).

Under autocast (CUDA/CPU, bfloat16 or float16) the cached value is ``Q_w(W)`` already cast to the
autocast dtype, exactly what autocast would have produced from the fp32 value, so the per-forward
fp32 -> bf16 copy of every weight disappears too. The cache is used only in training mode with
grad enabled, for weights that require grad (frozen weights, e.g. LoRA bases, are the ones tools
rewrite through ``.data``: they keep the uncached path), and never inside a ``torch.compile`` trace.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["QuantizedWeightCache", "invalidate_all", "optimizer_generation"]

_generation = itertools.count()
_current = [next(_generation)]
_hook_handle = None


def invalidate_all() -> None:
    """Drop every cached quantized weight (the next forward recomputes them)."""
    _current[0] = next(_generation)


def optimizer_generation() -> int:
    """The current generation (changes after every optimizer step and :func:`invalidate_all`)."""
    return _current[0]


def _after_optimizer_step(optimizer, args, kwargs) -> None:  # noqa: ANN001 - torch hook signature
    invalidate_all()


def _ensure_hook() -> None:
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)


class _CachedSTE(torch.autograd.Function):
    """Forward: the cached quantized weight; backward: the gradient, cast to the master weight's dtype."""

    @staticmethod
    def forward(ctx, weight: Tensor, quantized: Tensor) -> Tensor:  # type: ignore[override]
        ctx.weight_dtype = weight.dtype
        return quantized.detach()  # a fresh alias: each call's output gets its own grad_fn

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return (grad if grad.dtype == ctx.weight_dtype else grad.to(ctx.weight_dtype)), None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class QuantizedWeightCache:
    """The last ``Q_w(W)`` of one linear and the key it was computed for (see the module docstring)."""

    __slots__ = ("hits", "key", "misses", "value")

    def __init__(self) -> None:
        _ensure_hook()
        self.key: tuple | None = None
        self.value: Tensor | None = None
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.key = self.value = None

    def get(self, weight: Tensor, quantize) -> Tensor:  # noqa: ANN001 - Callable[[Tensor], Tensor]
        """``quantize(weight)`` (straight-through to ``weight``), from the cache when ``weight`` is unchanged.

        ``quantize`` must be a pure function of the weight's values (the linear's ``Q_w``).
        """
        amp = _autocast_dtype(weight.device.type)
        dtype = amp if amp is not None and weight.dtype == torch.float32 else weight.dtype
        key = (optimizer_generation(), id(weight), weight.data_ptr(), weight._version, dtype)
        if self.key == key and self.value is not None:
            self.hits += 1
        else:
            self.misses += 1
            with torch.no_grad():
                value = quantize(weight.detach())
                if value.dtype != dtype:
                    value = value.to(dtype)
            self.key, self.value = key, value
        if weight.requires_grad and torch.is_grad_enabled():
            return _CachedSTE.apply(weight, self.value)
        return self.value
