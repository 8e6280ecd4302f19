"""Wiring the quantized KV caches into attention modules and `generate()`.

The caches: `RoSTEQuantizedCache` (dynamic, `kv_cache`) and `RoSTEQuantizedStaticCache` (static
shapes, `kv_static_cache`); both store K/V as packed codes.

- `install_kv_cache_hooks`: a forward pre-hook on every attention module sets
  `AttentionQuantState.kv_quantized_by_cache` when the call's cache is one of them (K/V then arrive
  rotated and quantized, so the attention wrapper must not do it again); a forward hook clears it.
- `install_generation_cache`: on a RoSTE model instance whose K/V are quantized, `generate()` builds
  `RoSTEQuantizedCache` when no cache and no `cache_implementation` is given, and
  `RoSTEQuantizedStaticCache` (instead of transformers' model-dtype `StaticCache`) for
  `cache_implementation="static"`; every other choice keeps transformers' behaviour.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Sequence

from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from ..state import get_state
from .kv_cache import _CACHE_KWARGS, RoSTEQuantizedCache
from .kv_static_cache import RoSTEQuantizedStaticCache

__all__ = [
    "QUANTIZED_KV_CACHES",
    "install_generation_cache",
    "install_kv_cache_hooks",
    "output_cache",
    "wants_quantized_cache",
]

# caches whose update() rotates (R3) and quantizes K/V itself
QUANTIZED_KV_CACHES: tuple[type[Cache], ...] = (RoSTEQuantizedCache, RoSTEQuantizedStaticCache)


def _kv_cache_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    state = getattr(module, "roste_attention", None)
    if state is None:
        return None
    names = module._roste_cache_kwargs
    cache = next((kwargs[k] for k in names if kwargs.get(k) is not None), None)
    if cache is None:
        cache = next((a for a in args if isinstance(a, Cache)), None)
    flag = isinstance(cache, QUANTIZED_KV_CACHES)
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


def _roste_prepare_static_cache(self, *args, **kwargs) -> Cache:
    """``_prepare_static_cache`` of a RoSTE model: :class:`RoSTEQuantizedStaticCache` for ``"static"``.

    Same sizing as transformers (the larger of this call's length and the previous static call's, kept
    in ``_previous_max_cache_length`` so compiled graphs are reused) and the same eager allocation when
    the prefill is chunked; transformers' own method runs for ``"offloaded_static"``, encoder-decoder
    models and models whose K/V are not quantized per token.
    """
    original = type(self)._prepare_static_cache
    bound = inspect.signature(original).bind(self, *args, **kwargs)
    arguments = bound.arguments
    if (
        arguments.get("cache_implementation") != "static"
        or "max_cache_len" not in arguments
        or self.config.is_encoder_decoder
        or not wants_quantized_cache(self)
    ):
        return original(self, *args, **kwargs)
    length = max(int(arguments["max_cache_len"]), getattr(self, "_previous_max_cache_length", -1))
    cache = RoSTEQuantizedStaticCache(self, max_cache_len=length)
    init_shape = getattr(self, "_get_static_cache_init_shape", lambda: None)()
    if arguments.get("prefill_chunk_size") is not None and init_shape is not None:
        num_heads, head_dim = init_shape  # a compiled chunked prefill: allocate now, as transformers does
        cache.early_initialization(batch_size=arguments["batch_size"], num_heads=num_heads, head_dim=head_dim,
                                   dtype=self.dtype, device=self.device)
    self._previous_max_cache_length = length
    return cache


def output_cache(output) -> Cache | None:  # noqa: ANN001 - a ModelOutput / GenerateOutput
    """The KV cache of a model or ``generate()`` output: ``output.cache`` from transformers 5.24,
    ``output.past_key_values`` before; None when the output holds no cache."""
    if "cache" in getattr(output, "__dataclass_fields__", ()):  # 5.24+: never touch the deprecated alias
        return output.cache
    return getattr(output, "past_key_values", None)


def install_generation_cache(model: nn.Module) -> None:
    """Make ``generate()`` of ``model`` (this instance only) store K/V as packed codes when they are quantized.

    No cache and no ``cache_implementation``: :class:`RoSTEQuantizedCache`; ``cache_implementation="static"``:
    :class:`RoSTEQuantizedStaticCache`.  Whether K/V are quantized is decided at each ``generate`` call
    (:func:`wants_quantized_cache`), so ``set_quantization_enabled(model, False)`` gets transformers' caches.
    """
    if hasattr(type(model), "_prepare_cache_for_generation"):
        model._prepare_cache_for_generation = types.MethodType(_roste_prepare_cache_for_generation, model)
    if hasattr(type(model), "_prepare_static_cache"):
        model._prepare_static_cache = types.MethodType(_roste_prepare_static_cache, model)

