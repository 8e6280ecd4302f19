"""Wiring `RoSTEQuantizedCache` into attention modules and `generate()` (see `kv_cache` for the cache).

- `install_kv_cache_hooks`: a forward pre-hook on every attention module sets
  `AttentionQuantState.kv_quantized_by_cache` when the call's cache is a `RoSTEQuantizedCache`
  (K/V then arrive rotated and quantized, so the attention wrapper must not do it again); a forward
  hook clears it.
- `install_generation_cache`: makes the quantized cache the default `generate()` cache of a RoSTE
  model instance when K/V are quantized and no cache or `cache_implementation` is given.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Sequence

from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from ..state import get_state
from .kv_cache import _CACHE_KWARGS, RoSTEQuantizedCache

__all__ = ["install_generation_cache", "install_kv_cache_hooks", "output_cache", "wants_quantized_cache"]


def _kv_cache_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    state = getattr(module, "roste_attention", None)
    if state is None:
        return None
    names = module._roste_cache_kwargs
    cache = next((kwargs[k] for k in names if kwargs.get(k) is not None), None)
    if cache is None:
        cache = next((a for a in args if isinstance(a, Cache)), None)
    flag = isinstance(cache, RoSTEQuantizedCache)
    if state.kv_quantized_by_cache != flag:  # write only on change: no side effect in a traced (checkpointed) layer
        state.kv_quantized_by_cache = flag
    return None


def _kv_cache_post_hook(module: nn.Module, args: tuple, output) -> None:
    state = getattr(module, "roste_attention", None)
    if state is not None and state.kv_quantized_by_cache:
        state.kv_quantized_by_cache = False
        state.packed_kv = None
    return None


def install_kv_cache_hooks(attn_modules: Sequence[nn.Module], cache_kwarg: str | None = None) -> None:
    """Register (once per module) the hooks that set ``kv_quantized_by_cache`` for each forward call.

    ``cache_kwarg``: the family's own keyword for the cache argument (``ArchAdapter.attn_cache_kwarg``,
    e.g. GPT-NeoX's ``layer_past``), looked up after transformers' standard names.
    """
    for module in attn_modules:
        module._roste_cache_kwargs = _CACHE_KWARGS + ((cache_kwarg,) if cache_kwarg else ())
        if getattr(module, "_roste_kv_cache_hooks", None) is not None:
            continue
        pre = module.register_forward_pre_hook(_kv_cache_pre_hook, with_kwargs=True)
        post = module.register_forward_hook(_kv_cache_post_hook, always_call=True)
        module._roste_kv_cache_hooks = (pre, post)


def wants_quantized_cache(model: nn.Module) -> bool:
    """True when every RoSTE attention layer of ``model`` quantizes K/V per token (kv_bits < 16, enabled).

    fp8 K/V (``kv_format="fp8_e4m3"``) has a static scale: the attention wrapper's fake quantization of
    the whole cache at every step equals quantizing each token once, so a plain DynamicCache serves it.
    """
    from ..numerics import Fp8Spec

    try:
        states = get_state(model).attention_states
    except ValueError:
        return False
    return bool(states) and all(
        st.quant_enabled and st.kv_spec.enabled and st.kv_spec.granularity != "tensor"
        and not isinstance(st.kv_spec, Fp8Spec) for st in states
    )


_GENERATE_CACHE_KEYS = ("cache", "past_key_values")  # generate()'s model_kwargs key: 5.24+ / before


def _roste_prepare_cache_for_generation(self, *args, **kwargs):
    """``_prepare_cache_for_generation`` of a RoSTE model: default to :class:`RoSTEQuantizedCache`.

    transformers' own method runs first (it validates the arguments and stores its default
    ``DynamicCache`` under the key its version uses); when the user gave no cache and no
    ``cache_implementation``, that default is replaced by the quantized cache under the same key.
    """
    original = type(self)._prepare_cache_for_generation
    bound = inspect.signature(original).bind(self, *args, **kwargs)
    generation_config = bound.arguments["generation_config"]
    model_kwargs = bound.arguments["model_kwargs"]
    replace = (
        all(model_kwargs.get(key) is None for key in _GENERATE_CACHE_KEYS)
        and generation_config.use_cache is not False
        and generation_config.cache_implementation is None
        and not self.config.is_encoder_decoder
        and wants_quantized_cache(self)
    )
    result = original(self, *args, **kwargs)
    if replace:
        for key in _GENERATE_CACHE_KEYS:
            if isinstance(model_kwargs.get(key), DynamicCache):
                model_kwargs[key] = RoSTEQuantizedCache(self)
                if generation_config.is_assistant:
                    model_kwargs[key].activate_past_recording()
                break
    return result


def output_cache(output) -> Cache | None:  # noqa: ANN001 - a ModelOutput / GenerateOutput
    """The KV cache of a model or ``generate()`` output: ``output.cache`` from transformers 5.24,
    ``output.past_key_values`` before; None when the output holds no cache."""
    if "cache" in getattr(output, "__dataclass_fields__", ()):  # 5.24+: never touch the deprecated alias
        return output.cache
    return getattr(output, "past_key_values", None)


def install_generation_cache(model: nn.Module) -> None:
    """Make :class:`RoSTEQuantizedCache` the default ``generate()`` cache of ``model`` (this instance only)."""
    if not hasattr(type(model), "_prepare_cache_for_generation"):
        return
    model._prepare_cache_for_generation = types.MethodType(_roste_prepare_cache_for_generation, model)

