"""A KV cache that really stores K and V as packed b-bit codes: :class:`RoSTEQuantizedCache`.

What is stored (per layer, for K and for V, shapes ``[batch, kv_heads, seq, ...]``):

* ``codes``: uint8 ``[b, h, s, packed_length(head_dim, bits)]``, the layer's ``kv_spec`` codes of
  ``R3(K)`` (K after RoPE and, when the layer's ``r3`` flag is on, the online Hadamard) and of
  ``V``, mapped to unsigned codes (:func:`~hf_roste.numerics.to_unsigned`) and packed
  (:func:`~hf_roste.numerics.pack_codes`: 4-bit = two per byte);
* ``scale``: one per token per head (``[b, h, s, G]``, ``G = 1`` for "token_head"), fp32 by
  default (``scale_dtype``);
* ``zero`` (asymmetric specs only): the integer zero points, stored as int8 while every zero point
  of the layer fits (the usual case: a row whose range contains 0 has ``0 <= z <= 2^b - 1``) and
  promoted losslessly to int32 the first time one does not (``|z| <= 2^20`` always fits).
  Symmetric specs store no zero point.

Exactness.  ``update`` quantizes the new tokens once with :func:`~hf_roste.numerics.quantize` (the
one quantizer definition), appends their codes and returns ``dequantize`` of the whole cache cast
to the key dtype.  With fp32 scales this is bit for bit ``fake_quantize(R3(K), kv_spec)``, i.e.
exactly what the QAT attention wrapper computes from a plain ``DynamicCache``: quantization is per
token per head, so quantizing each token once when it is cached equals quantizing the full cache
again at every step.  With ``scale_dtype=torch.float16`` the scales are rounded (cheaper, NOT the
QAT function any more).  There is no full-precision residual window.

Cost.  Each step quantizes the new tokens' K and V in one call, writes their codes into
preallocated buffers that grow by a quarter when full (:mod:`hf_roste.modules.kv_store`), and
dequantizes the whole cached K/V of the layer (O(seq) work per step, like attention itself).  ``nbytes`` counts the stored tokens; ``allocated_nbytes`` also the
growth reserve.

Wiring (in :mod:`hf_roste.modules.kv_cache_wiring`):

* The attention wrapper must not rotate / quantize K and V a second time: :func:`install_kv_cache_hooks`
  registers a forward pre-hook on every attention module that sets
  ``AttentionQuantState.kv_quantized_by_cache`` when the call's cache (``past_key_values``, or
  the family's own keyword, ``ArchAdapter.attn_cache_kwarg``) is a :class:`RoSTEQuantizedCache` (or the
  static twin), and a forward hook that clears it.
  :meth:`RoSTEQuantizedCache.update` refuses to run when the flag is not set (hooks missing), since
  the wrapper would then apply R3 and the quantizer twice.
* ``generate()``: :func:`install_generation_cache` overrides, on the model instance only,
  ``_prepare_cache_for_generation`` so that when no cache is passed, ``use_cache`` is on and
  ``generation_config.cache_implementation`` is None, a :class:`RoSTEQuantizedCache` is created
  (when every layer quantizes K/V, i.e. ``kv_bits < 16`` and quantization is enabled), and
  ``cache_implementation="static"`` builds the static twin,
  :class:`~hf_roste.modules.kv_static_cache.RoSTEQuantizedStaticCache` (packed codes in preallocated
  buffers, for torch.compile / CUDA graphs) instead of transformers' model-dtype ``StaticCache``;
  otherwise transformers' own logic runs unchanged (user caches, ``cache_implementation="dynamic"``
  for a fake-quant ``DynamicCache``, ``"offloaded_static"``, ...).  transformers 5.23 validates
  ``cache_implementation`` against a fixed list, so a registered name is not an option.
  ``prepare_model`` installs both.

Sliding-window layers (Mistral) keep ``DynamicSlidingWindowLayer``'s semantics: the mask handles
the window, the layer keeps the last ``sliding_window - 1`` tokens' codes (all of them, until
``crop``, after ``activate_past_recording``) and returns the kept tokens plus the new ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..numerics import QuantSpec
from ..numerics.hadamard import hadamard_transform
from ..numerics.kernels import use_triton
from ..state import get_state
from .attention import AttentionQuantState
from .kv_store import KVStore, encode_kv

__all__ = [
    "PackedKV",
    "RoSTEQuantizedCache",
    "RoSTEQuantizedLayer",
    "RoSTEQuantizedSlidingWindowLayer",
    "cache_bytes_per_token",
    "expected_bytes_per_token",
]

_SCALE_DTYPES = (torch.float32, torch.float16)
# the cache argument of attention forwards: "cache" from transformers 5.24, "past_key_values" before
# (and as the deprecated alias until 5.40); a family's own name comes from ArchAdapter.attn_cache_kwarg
_CACHE_KWARGS = ("cache", "past_key_values")


def _check_kv_spec(spec: QuantSpec, where: str) -> None:
    from ..numerics import Fp8Spec

    if isinstance(spec, Fp8Spec):
        raise ValueError(f"{where}: fp8 K/V (kv_format='fp8_e4m3') has no integer codes to store; use a DynamicCache.")
    if not spec.enabled:
        raise ValueError(
            f"{where}: kv_spec has bits=16 (K/V not quantized): nothing to store as codes; use a DynamicCache."
        )
    if spec.granularity == "tensor":
        raise ValueError(
            f"{where}: a per-tensor K/V quantizer depends on every cached token, so codes cannot be stored "
            "incrementally without changing the function; RoSTE's K/V quantizer is per token per head."
        )


def _query_length(query: int | Tensor) -> int:
    """The number of new tokens, from transformers' ``get_mask_sizes`` argument: an int (``query_length``,
    transformers 5.25) or the new tokens' ``cache_position`` tensor (releases that pass positions)."""
    return int(query.shape[0]) if isinstance(query, Tensor) else int(query)


# --------------------------------------------------------------------------- packed storage
@dataclass
class PackedKV:
    """Packed codes of a ``[batch, heads, seq, head_dim]`` tensor quantized with ``spec``.

    Attributes:
        codes: uint8 ``[b, h, s, packed_length(head_dim, bits)]`` (unsigned storage codes).
        scale: ``[b, h, s, G]`` in ``scale_dtype`` (fp32: exact).
        zero: int8 / int32 ``[b, h, s, G]`` integer zero points (None for a symmetric spec).
        spec: the quantizer; head_dim: the unpacked last dim.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    spec: QuantSpec
    head_dim: int

    @property
    def seq_len(self) -> int:
        return self.codes.shape[-2]

    @property
    def batch_size(self) -> int:
        return self.codes.shape[0]

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.codes, self.scale, self.zero) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


# --------------------------------------------------------------------------- cache layers
class RoSTEQuantizedLayer(CacheLayerMixin):
    """One full-attention layer of :class:`RoSTEQuantizedCache` (see the module docstring).

    Args:
        state: the attention module's :class:`AttentionQuantState` (``r3`` and ``kv_spec`` are read
            at every ``update``).
        scale_dtype: storage dtype of the scales: torch.float32 (exact, default) or torch.float16.

    K and V live in one :class:`~hf_roste.modules.kv_store.KVStore` (preallocated, growing buffers);
    ``packed_keys`` / ``packed_values`` are :class:`PackedKV` views of the stored tokens.
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, state: AttentionQuantState, scale_dtype: torch.dtype = torch.float32, **kwargs):
        super().__init__()
        if scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {_SCALE_DTYPES}, got {scale_dtype}")
        self.state = state
        self.scale_dtype = scale_dtype
        self._store: KVStore | None = None

    def __repr__(self):
        return f"{type(self).__name__}(r3={self.state.r3}, kv_spec={self.state.kv_spec}, tokens={self.stored_length})"

    # -- bookkeeping
    def _packed(self, i: int) -> PackedKV | None:
        views = None if self._store is None else self._store.views()
        if views is None:
            return None
        codes, scale, zero = views
        return PackedKV(codes[i], scale[i], None if zero is None else zero[i], self._store.spec, self._store.head_dim)

    @property
    def packed_keys(self) -> PackedKV | None:
        """The stored keys' codes, scales and zero points (views), or None when empty."""
        return self._packed(0)

    @property
    def packed_values(self) -> PackedKV | None:
        """The stored values' codes, scales and zero points (views), or None when empty."""
        return self._packed(1)

    @property
    def stored_length(self) -> int:
        """Number of tokens whose codes are stored now."""
        return 0 if self._store is None else self._store.length

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tokens' K and V (codes, scales, zero points)."""
        return 0 if self._store is None else self._store.nbytes

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of the allocated buffers (stored tokens plus the growth reserve)."""
        return 0 if self._store is None else self._store.allocated_nbytes

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _append_new(self, key_states: Tensor, value_states: Tensor) -> None:
        """Rotate (R3) and quantize the new tokens' K and V in one call and append their codes."""
        st = self.state
        if not (st.quant_enabled and st.kv_spec.enabled):
            raise RuntimeError(
                "RoSTEQuantizedCache: K/V quantization is disabled on this layer (kv_bits=16 or "
                "set_quantization_enabled(model, False)); use a DynamicCache instead."
            )
        _check_kv_spec(st.kv_spec, "RoSTEQuantizedCache")
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"RoSTEQuantizedCache needs K and V of the same shape, got {tuple(key_states.shape)} and "
                f"{tuple(value_states.shape)}"
            )
        head_dim = key_states.shape[-1]
        if self._store is None:
            self._store = KVStore(st.kv_spec, head_dim, self.scale_dtype)
        elif self._store.spec != st.kv_spec or self._store.head_dim != head_dim:
            raise ValueError(
                f"cannot append codes of {st.kv_spec}/{head_dim} to {self._store.spec}/{self._store.head_dim}"
            )
        with torch.no_grad():
            key = hadamard_transform(key_states) if st.r3 else key_states
            self._store.append(*encode_kv(torch.stack((key, value_states.to(key.dtype))), st.kv_spec))

    def _decode(self, start: int = 0) -> tuple[Tensor, Tensor]:
        assert self._store is not None
        kv = self._store.decode(start)
        if self.dtype != torch.float32:
            kv = kv.to(self.dtype)
        return kv[0], kv[1]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> None:
        views = None if self._store is None else self._store.views()
        if views is not None:  # fn sees [b, h, s, ...] per K / V, as with separate tensors
            codes, scale, zero = (None if t is None else torch.stack([fn(t[0]), fn(t[1])]) for t in views)
            self._store.load((codes, scale, zero))

    # -- CacheLayerMixin API
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Quantize and append the new tokens; return the dequantized full K/V (key dtype).

        On the device path (:func:`~hf_roste.numerics.kernels.use_triton`, one new token, 4-bit codes)
        nothing is dequantized: the layer hands its store to the attention wrapper, which reads the
        codes with :func:`~hf_roste.numerics.kernels.kv_attention.packed_kv_attention`, and returns
        the new K/V unchanged (the wrapper does not use them).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append_new(key_states, value_states)
        if self._fused_attention(key_states):
            self.state.packed_kv = self._store
            return key_states, value_states
        return self._decode()

    def _fused_attention(self, key_states: Tensor) -> bool:
        if self.is_sliding or not use_triton(key_states.device):
            return False
        from ..numerics.kernels.kv_attention import packed_kv_attention_supported

        assert self._store is not None
        return packed_kv_attention_supported(self._store.spec, self._store.head_dim, key_states.shape[-2])

    def get_mask_sizes(self, query_length: int | Tensor) -> tuple[int, int]:
        return self.get_seq_length() + _query_length(query_length), 0

    def get_seq_length(self) -> int:
        return self.stored_length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        """The same as ``get_max_length`` under the name some transformers releases use."""
        return self.get_max_length()

    def reset(self) -> None:
        self._store = None
        self.is_initialized = False
        super().reset()

    def offload(self):
        if self.is_initialized:
            self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.stored_length > 0:
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.stored_length > 0:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.stored_length > 0:
            self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative int, like ``DynamicLayer.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Use a negative integer to remove that number of tokens from the cache instead."
            )
        if tokens_to_remove == 0 or self.stored_length == 0:
            return
        assert self._store is not None
        self._store.length = max(self.stored_length + tokens_to_remove, 0)  # buffers kept for reuse


class RoSTEQuantizedSlidingWindowLayer(RoSTEQuantizedLayer):
    """Sliding-window layer with ``DynamicSlidingWindowLayer``'s semantics, storing packed codes."""

    is_sliding = True

    def __init__(self, state: AttentionQuantState, sliding_window: int, scale_dtype: torch.dtype = torch.float32,
                 **kwargs):
        super().__init__(state, scale_dtype)
        self.sliding_window = int(sliding_window)
        self.cumulative_length = 0
        self.record_past = False

    def activate_past_recording(self, **kwargs) -> None:
        """Keep every stored token until the next ``crop`` (prompt-lookup / assisted decoding roll back).

        Keyword arguments are accepted and ignored, as ``DynamicSlidingWindowLayer`` does: transformers
        from 5.25 calls ``Cache.activate_past_recording(recurrent_states_to_keep=...)``, which forwards the
        keyword to every layer, and it only concerns layers with recurrent states (linear attention); 5.20
        to 5.24 call it without arguments.
        """
        self.record_past = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self._append_new(key_states, value_states)
        if not self.record_past:
            out = self._decode()
            keep = self.sliding_window - 1
            if self.stored_length > keep:
                start = max(self.stored_length - keep, 0)
                self._map(lambda t: t[:, :, start:])
            return out
        visible = self.sliding_window - 1 + key_states.shape[-2]
        return self._decode(max(self.stored_length - visible, 0))

    def get_mask_sizes(self, query_length: int | Tensor) -> tuple[int, int]:
        query_length = _query_length(query_length)
        is_full = self.cumulative_length >= self.sliding_window
        kv_offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        kv_length = (self.sliding_window - 1 if is_full else self.cumulative_length) + query_length
        return kv_length, kv_offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if self.get_seq_length() >= self.sliding_window:
            if not self.record_past:
                raise RuntimeError(
                    "`crop` was called, but this layer does not track past states and the sliding window size was "
                    "already reached. Call `activate_past_recording` before `crop` to be able to roll back the cache."
                )
            if tokens_to_remove > 0:
                raise RuntimeError(
                    "Once the sliding window size has been reached, the layer can only be cropped by a negative int "
                    "(the number of tokens to remove)."
                )
            keep, drop = self.sliding_window - 1, -tokens_to_remove
            n = self.stored_length

            def window(t: Tensor) -> Tensor:
                end = max(n - drop, 0)  # dropping more than is stored leaves nothing (no negative slice)
                return t[:, :, max(end - keep, 0) : end]

            self._map(window)
            self.cumulative_length -= drop
        else:
            super().crop(tokens_to_remove)
            self.cumulative_length = self.stored_length


# --------------------------------------------------------------------------- the cache
class RoSTEQuantizedCache(Cache):
    """KV cache of a RoSTE model storing K/V as packed codes (see the module docstring).

    Args:
        model: a model prepared for RoSTE (``from_pretrained(..., quantization_config=RoSTEConfig(...))``,
            possibly PEFT-wrapped); its attention states give each layer's ``r3`` flag and ``kv_spec``.
        scale_dtype: torch.float32 (default: generation computes exactly the QAT model's function) or
            torch.float16 (2 bytes less per token per head and K/V, but scales are rounded).

    Raises:
        ValueError: the model was not prepared for RoSTE, K/V are not quantized (kv_bits=16), or a
            layer type has no quantized-cache equivalent.
    """

    def __init__(self, model: nn.Module, scale_dtype: torch.dtype = torch.float32):
        states = get_state(model).attention_states
        config = model.config.get_text_config(decoder=True)
        layers = self._build_layers(states, config, scale_dtype)
        super().__init__(layers=layers)

    @classmethod
    def from_states(
        cls, states: Sequence[AttentionQuantState], config, scale_dtype: torch.dtype = torch.float32
    ) -> RoSTEQuantizedCache:
        """Build from per-layer attention states and a (text) model config, without a model."""
        cache = cls.__new__(cls)
        Cache.__init__(cache, layers=cls._build_layers(states, config, scale_dtype))
        return cache

    @staticmethod
    def _build_layers(states: Sequence[AttentionQuantState], config, scale_dtype: torch.dtype) -> list:
        return build_cache_layers(
            "RoSTEQuantizedCache", states, config,
            lambda st: RoSTEQuantizedLayer(st, scale_dtype),
            lambda st, window: RoSTEQuantizedSlidingWindowLayer(st, window, scale_dtype))

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        return checked_update("RoSTEQuantizedCache", self.layers[layer_idx], key_states, value_states, *args, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes held by all stored codes, scales and zero points."""
        return sum(layer.nbytes for layer in self.layers)


# --------------------------------------------------------------------------- shared by the dynamic and static caches
def build_cache_layers(cache_name: str, states: Sequence[AttentionQuantState], config,
                       full: Callable[[AttentionQuantState], CacheLayerMixin],
                       sliding: Callable[[AttentionQuantState, int], CacheLayerMixin]) -> list:
    """One cache layer per decoder layer of `config` (its text config): `full(state)` for full attention,
    `sliding(state, window)` for sliding / chunked attention; every state's kv_spec must store codes."""
    if not states:
        raise ValueError(f"{cache_name}: the model has no RoSTE attention states.")
    for st in states:
        _check_kv_spec(st.kv_spec, cache_name)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    if len(layer_types) != len(states):
        raise ValueError(
            f"{cache_name}: the config describes {len(layer_types)} layers but the model has "
            f"{len(states)} RoSTE attention states."
        )
    layers = []
    for i, (kind, kw, st) in enumerate(zip(layer_types, layer_kwargs, states, strict=True)):
        if kind == "full_attention":
            layers.append(full(st))
        elif kind in ("sliding_attention", "chunked_attention"):
            layers.append(sliding(st, kw["sliding_window"]))
        else:
            raise ValueError(f"{cache_name}: layer {i} has type {kind!r}, which it does not support.")
    return layers


def checked_update(cache_name: str, layer, key_states: Tensor, value_states: Tensor, *args, **kwargs):
    """`layer.update(...)`, refused when the attention hooks did not tell the wrapper that the cache quantizes K/V."""
    if not layer.state.kv_quantized_by_cache:
        raise RuntimeError(
            f"{cache_name}.update was called while the attention module's RoSTE state does not know "
            "that the cache quantizes K/V (the wrapper would rotate and quantize them twice). Load the model "
            "with quantization_config=RoSTEConfig(...) (hf_roste.convert.prepare_model installs the hooks, with "
            "hf_roste.modules.kv_cache_wiring.install_kv_cache_hooks(attention_modules, cache_kwarg))."
        )
    return layer.update(key_states, value_states, *args, **kwargs)


# --------------------------------------------------------------------------- memory accounting
def _layer_bytes_and_tokens(layer) -> tuple[int, int]:
    if getattr(layer, "token_slots", None) is not None:  # RoSTEQuantizedStaticLayer: its allocated slots
        return layer.nbytes, layer.token_slots
    if isinstance(layer, RoSTEQuantizedLayer):
        n = layer.packed_keys.batch_size * layer.stored_length if layer.packed_keys is not None else 0
        return layer.nbytes, n
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None or keys.dim() != 4:
        return 0, 0
    return keys.numel() * keys.element_size() + values.numel() * values.element_size(), keys.shape[0] * keys.shape[-2]


def cache_bytes_per_token(cache: Cache) -> float:
    """KV bytes per cached token (all layers, K and V, scales and zero points), from the actual tensors.

    Works for :class:`RoSTEQuantizedCache`, for
    :class:`~hf_roste.modules.kv_static_cache.RoSTEQuantizedStaticCache` and for ``DynamicCache`` /
    ``StaticCache``-like caches (``layer.keys`` / ``layer.values``).  Per layer: stored bytes /
    (batch * stored tokens); summed over layers (sliding layers count the tokens they keep; static
    layers count every allocated slot, used or not, since their buffers hold them all).  0.0 for an
    empty cache.
    """
    total = 0.0
    for layer in cache.layers:
        nbytes, tokens = _layer_bytes_and_tokens(layer)
        if tokens:
            total += nbytes / tokens
    return total


def expected_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, spec: QuantSpec,
                             scale_dtype: torch.dtype = torch.float32, zero_bytes: int = 1) -> float:
    """Analytic bytes per token of :class:`RoSTEQuantizedCache`: ``2 * layers * kv_heads * per_head``.

    ``per_head = packed_length(head_dim, bits) + G * (scale bytes + zero bytes)`` (zero bytes: 1 for
    int8 zero points, 4 once promoted, 0 for symmetric specs).
    """
    from ..numerics import packed_length

    groups = spec.num_groups(head_dim)
    zb = 0 if spec.symmetric else zero_bytes
    sb = torch.empty((), dtype=scale_dtype).element_size()
    return 2.0 * num_layers * kv_heads * (packed_length(head_dim, spec.bits) + groups * (sb + zb))
