"""transformers' hub kernels (``kernelize`` / ``use_kernels``) on RoSTE models.

From transformers 5.25, with the ``kernels`` package installed, ``from_pretrained`` kernelizes
models by default: ``kernelize`` swaps the ``forward`` of every module whose class carries a
``kernel_layer_name`` for a layer loaded from the Hub. For the families RoSTE supports (read in
transformers 5.25's modeling code and default mapping) these are:

* ``RMSNorm`` (Llama, Mistral, Qwen2, Qwen3 decoder/final norms and Qwen3's per-head q/k norms):
  Liger's RMSNorm on CUDA/ROCm, training and inference;
* ``rotary_pos_emb``: the ``apply_rotary_pos_emb`` function called inside the attention modules
  (Llama, Mistral, Qwen2, Qwen3), ``kernels-community/rotary`` on CUDA/XPU;
* activations (``SiLU``, GELU variants): ``kernels-community/activation``, inference mode only.

GPT-NeoX has no kernelizable module. None of these bypasses RoSTE: the folded norms keep their
(unit) weights and compute the same function, RoPE runs before the attention function in which
RoSTE applies R3 and quantizes K/V, and activations run before ``down_proj``, whose ``QATLinear``
applies R4 and the activation quantizer itself. A custom ``kernel_config`` could map a layer that
does contain RoSTE code (an attention module, an MLP holding ``QATLinear``/``PackedLinear``
children, a linear); :func:`install_kernelize_guard` makes such a kernelization fail with a clear
error, after restoring the PyTorch forwards, instead of silently training or serving a model without
its quantizers or rotations.
"""

from __future__ import annotations

import types

from torch import nn

__all__ = ["bypassing_kernels", "install_kernelize_guard"]


def _is_roste_module(module: nn.Module) -> bool:
    from .modules.norm import RMSNorm
    from .modules.packed_linear import PackedLinear
    from .modules.qat_linear import QATLinear

    return isinstance(module, (QATLinear, PackedLinear, RMSNorm)) or hasattr(module, "roste_attention")


def bypassing_kernels(model: nn.Module) -> list[str]:
    """Names of kernelized modules whose replaced forward would skip RoSTE code.

    A module is kernelized when ``kernels`` stored the repository it loaded the forward from
    (``module._kernel_repo``). It bypasses RoSTE when it is, or contains, a RoSTE linear or norm, or
    an attention module whose forward calls the RoSTE attention function (R3, K/V quantization).
    """
    bad = []
    for name, module in model.named_modules():
        if "_kernel_repo" not in module.__dict__:
            continue
        if any(_is_roste_module(m) for m in module.modules()):
            bad.append(f"{name or '<model>'} ({type(module).__name__} -> {module.__dict__['_kernel_repo']})")
    return bad


def _guarded_set_use_kernels(self, use_kernels, *args, **kwargs):  # noqa: ANN001, ANN202 - transformers' signature
    type(self).set_use_kernels(self, use_kernels, *args, **kwargs)
    bad = bypassing_kernels(self) if use_kernels else []
    if bad:
        self.reset_kernels()
        raise ValueError(
            "Hub kernels would replace the forward of module(s) that carry RoSTE quantizers, norms or rotations, "
            f"so the model would no longer compute the quantized function: {'; '.join(bad)}. The PyTorch forwards "
            "were restored. Load with use_kernels=False, or pass a kernel_config whose kernel_mapping leaves these "
            "layers out (RMSNorm, rotary and activation kernels are fine)."
        )


def install_kernelize_guard(model: nn.Module) -> None:
    """Make ``model.set_use_kernels`` (used by ``from_pretrained`` and ``model.train()``) refuse kernels that
    bypass RoSTE (see the module docstring). Only this instance is changed."""
    if hasattr(type(model), "set_use_kernels"):
        model.set_use_kernels = types.MethodType(_guarded_set_use_kernels, model)
