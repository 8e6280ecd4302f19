"""A static-shape KV cache storing K and V as packed b-bit codes: :class:`RoSTEQuantizedStaticCache`.

The static twin of :class:`~hf_roste.modules.kv_cache.RoSTEQuantizedCache`, for
``generate(cache_implementation="static")``, ``torch.compile`` and CUDA graphs.  Like transformers'
``StaticCache`` (which it subclasses, so code testing ``isinstance(cache, StaticCache)`` treats it as
one) every layer allocates its buffers once, for ``max_cache_len`` tokens, and writes new tokens in
place at the running position (``index_copy_`` with a position tensor: no data-dependent shape, no
reallocation, stable addresses for CUDA graphs).  What the buffers hold (per layer, K and V together,
index 0 = K, 1 = V):

* ``codes``: uint8 ``[2, batch, kv_heads, max_cache_len, packed_length(head_dim, bits)]``, the
  layer's ``kv_spec`` codes of ``R3(K)`` and ``V`` as unsigned storage codes, packed (4-bit: two per
  byte), produced by :func:`~hf_roste.modules.kv_store.encode_kv` (the shared quantizer);
* ``scale``: ``[2, batch, kv_heads, max_cache_len, G]`` in ``scale_dtype`` (fp32 by default: exact);
* ``zero`` (asymmetric specs only): integer zero points in the narrowest of int16 / int32 that holds
  every zero point the quantizer can produce for the K/V dtype (:func:`static_zero_point_dtype`:
  int16 for bf16 / fp16 K/V up to 4 bits, int32 for fp32 K/V).  A static buffer cannot be widened
  later, so it cannot use the dynamic cache's "int8, promoted on demand" (1 byte more per token per
  head and K/V than the dynamic cache's usual int8).

A slot that holds no token yet holds the codes of a zero vector, so it dequantizes to exactly 0.

``update`` quantizes the new tokens once (R3 first when the layer's flag is on), writes them and
returns ``dequantize`` of the WHOLE static buffer cast to the key dtype (``[b, h, max_cache_len, d]``),
as ``StaticLayer`` returns its whole buffer; the attention mask hides the unused slots.  With fp32
scales every returned row is bit for bit what the QAT attention wrapper computes from transformers'
``StaticCache`` (``fake_quantize(R3(K), kv_spec)``, and 0 for unused slots): generation computes the
QAT function.  The cost is one dequantization of the full static length per layer per step.

Sliding-window layers (Mistral) follow ``StaticSlidingWindowLayer`` (buffers of
``min(sliding_window, max_cache_len)`` tokens, rolled by one once full; its mask sizes and crop rules).

Wiring: :mod:`hf_roste.modules.kv_cache_wiring` makes ``generate(cache_implementation="static")`` build
this cache for a RoSTE model whose K/V are quantized, and its attention pre-hook recognises it (K/V
arrive already rotated and quantized, the wrapper must not do it again).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers.cache_utils import (
    Cache,
    StaticCache,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from ..numerics import QuantSpec, packed_length
from ..numerics.hadamard import hadamard_transform
from ..state import get_state
from .attention import AttentionQuantState
from .kv_cache import _SCALE_DTYPES, _check_kv_spec, build_cache_layers, checked_update
from .kv_store import decode_kv, encode_kv

__all__ = [
    "RoSTEQuantizedStaticCache",
    "RoSTEQuantizedStaticLayer",
    "RoSTEQuantizedStaticSlidingWindowLayer",
    "static_zero_point_dtype",
]

# significand precision (implicit bit included) of the K/V dtypes the quantizer reads natively
_SIGNIFICAND_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}
_ZERO_BOUND = 2**20  # the quantizer's relative scale floor keeps |z| <= 2^20 for any input


def static_zero_point_dtype(spec: QuantSpec, kv_dtype: torch.dtype) -> torch.dtype:
    """The narrowest integer dtype (int16 or int32) holding every zero point ``spec`` gives ``kv_dtype`` rows.

    Asymmetric rule: ``z = round(-c * mn / s)`` with ``s ~ c * (mx - mn) / L`` (``L = 2^bits - 1``).
    A row containing 0 has ``|z| <= L``; a row of one sign has ``|z| ~ L * |mn| / (mx - mn)``, and two
    distinct values of a float format with a ``p``-bit significand satisfy ``|mn| / (mx - mn) <= 2^p``.
    So ``|z| <= L * 2^p`` up to the rounding of ``s`` (relative error below ``2^-9`` for bf16 / fp16
    inputs, fp16 scales included, hence the ``1 + 2^-8`` margin), and never above ``2^20``.
    bf16 / fp16 K/V with up to 4 bits fit int16; fp32 K/V need int32.
    """
    p = _SIGNIFICAND_BITS.get(kv_dtype)
    if p is None:
        return torch.int32
    levels = spec.qmax - spec.qmin
    bound = min(_ZERO_BOUND, int(levels * 2**p * (1 + 2**-8)) + 2)
    return torch.int16 if bound <= torch.iinfo(torch.int16).max else torch.int32


class RoSTEQuantizedStaticLayer(StaticLayer):
    """One full-attention layer of :class:`RoSTEQuantizedStaticCache` (see the module docstring).

    Args:
        state: the attention module's :class:`AttentionQuantState` (``r3`` and ``kv_spec``).
        max_cache_len: number of token slots allocated.
        scale_dtype: storage dtype of the scales: torch.float32 (exact, default) or torch.float16.

    Sequence bookkeeping (``cumulative_length`` tensor, ``get_seq_length``, ``get_mask_sizes``, ``crop``)
    is ``StaticLayer``'s.  The buffers are allocated at the first ``update`` (or
    ``Cache.early_initialization``) from the K/V batch, heads, head_dim, dtype and device.
    """

    def __init__(self, state: AttentionQuantState, max_cache_len: int, scale_dtype: torch.dtype = torch.float32,
                 **kwargs):
        if scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {_SCALE_DTYPES}, got {scale_dtype}")
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int (token slots to allocate), got {max_cache_len!r}")
        super().__init__(max_cache_len=max_cache_len)
        self.state = state
        self.scale_dtype = scale_dtype
        self.spec: QuantSpec | None = None
        self.codes: Tensor | None = None
        self.scale: Tensor | None = None
        self.zero: Tensor | None = None

    def __repr__(self):
        return (f"{type(self).__name__}(r3={self.state.r3}, kv_spec={self.state.kv_spec}, "
                f"max_cache_len={self.max_cache_len})")

    # -- storage
    def _buffers(self) -> list[Tensor]:
        return [t for t in (self.codes, self.scale, self.zero) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated buffers (codes, scales, zero points of all ``max_cache_len`` slots, K and V)."""
        return sum(t.numel() * t.element_size() for t in self._buffers())

    @property
    def token_slots(self) -> int | None:
        """``batch * max_cache_len`` once the buffers exist (None before): what ``nbytes`` pays for."""
        return None if self.codes is None else self.codes.shape[1] * self.codes.shape[3]

    def _empty_slot(self, batch: int, heads: int, head_dim: int, device) -> tuple[Tensor, Tensor, Tensor | None]:
        """Codes, scale and zero point of a zero vector (what an unused slot holds: it decodes to 0)."""
        packed, scale, zero = encode_kv(torch.zeros(2, batch, heads, 1, head_dim, device=device), self.spec)
        return packed.to(torch.uint8), scale, zero

    def _fill_empty(self) -> None:
        assert self.codes is not None and self.scale is not None
        _, batch, heads, _, _ = self.codes.shape
        packed, scale, zero = self._empty_slot(batch, heads, self.head_dim, self.codes.device)
        self.codes.copy_(packed.expand_as(self.codes))
        self.scale.copy_(scale.expand_as(self.scale))
        if self.zero is not None:
            self.zero.copy_(zero.expand_as(self.zero))

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Allocate the buffers (all slots empty) for the K/V layout of ``key_states`` / ``value_states``."""
        st = self.state
        if not (st.quant_enabled and st.kv_spec.enabled):
            raise RuntimeError(
                "RoSTEQuantizedStaticCache: K/V quantization is disabled on this layer (kv_bits=16 or "
                "set_quantization_enabled(model, False)); use transformers' StaticCache instead."
            )
        _check_kv_spec(st.kv_spec, "RoSTEQuantizedStaticCache")
        if key_states.shape[:2] != value_states.shape[:2] or key_states.shape[-1] != value_states.shape[-1]:
            raise ValueError(
                f"RoSTEQuantizedStaticCache needs K and V of the same layout, got {tuple(key_states.shape)} and "
                f"{tuple(value_states.shape)}"
            )
        self.spec = spec = st.kv_spec
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.head_dim = self.k_head_dim = self.v_head_dim = key_states.shape[-1]
        groups = spec.num_groups(self.head_dim)
        shape = (2, self.batch_size, self.num_heads, self.max_cache_len)
        dev = self.device
        self.codes = torch.empty(*shape, packed_length(self.head_dim, spec.bits), dtype=torch.uint8, device=dev)
        self.scale = torch.empty(*shape, groups, dtype=self.scale_dtype, device=dev)
        self.zero = None if spec.symmetric else torch.empty(
            *shape, groups, dtype=static_zero_point_dtype(spec, self.dtype), device=dev)
        self._fill_empty()
        self.cumulative_length = self.cumulative_length.to(dev)
        if not torch.compiler.is_compiling():  # fixed addresses: in-place updates keep CUDA graphs valid
            for t in (*self._buffers(), self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def _encode(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """R3 (when on) and one quantizer call for the new K and V; storage dtypes of the buffers."""
        st = self.state
        if st.kv_spec != self.spec:
            raise ValueError(f"RoSTEQuantizedStaticCache: the layer's kv_spec changed from {self.spec} to "
                             f"{st.kv_spec} after its buffers were allocated; build a new cache.")
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"RoSTEQuantizedStaticCache needs K and V of the same shape, got {tuple(key_states.shape)} and "
                f"{tuple(value_states.shape)}"
            )
        if tuple(key_states.shape[:2]) != (self.batch_size, self.num_heads) or key_states.shape[-1] != self.head_dim:
            raise ValueError(
                f"RoSTEQuantizedStaticCache: K/V of shape {tuple(key_states.shape)} do not fit buffers allocated for "
                f"batch {self.batch_size} x {self.num_heads} heads x head_dim {self.head_dim}"
            )
        with torch.no_grad():
            key = hadamard_transform(key_states) if st.r3 else key_states
            packed, scale, zero = encode_kv(torch.stack((key, value_states.to(key.dtype))), self.spec)
        return (packed.to(torch.uint8), scale.to(self.scale_dtype),
                None if zero is None else zero.to(self.zero.dtype))

    def _decode(self, codes: Tensor, scale: Tensor, zero: Tensor | None) -> tuple[Tensor, Tensor]:
        kv = decode_kv(codes, scale, zero, self.spec, self.head_dim)
        if self.dtype != torch.float32:
            kv = kv.to(self.dtype)
        return kv[0], kv[1]

    def _decode_buffers(self) -> tuple[Tensor, Tensor]:
        return self._decode(self.codes, self.scale, self.zero)

    def _write(self, positions: Tensor, packed: Tensor, scale: Tensor, zero: Tensor | None) -> None:
        self.codes.index_copy_(3, positions, packed)
        self.scale.index_copy_(3, positions, scale)
        if self.zero is not None:
            self.zero.index_copy_(3, positions, zero)

    # -- CacheLayerMixin API
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Quantize the new tokens into their slots; return the dequantized K/V of all ``max_cache_len`` slots."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        packed, scale, zero = self._encode(key_states, value_states)
        n = key_states.shape[-2]
        positions = torch.arange(n, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(n)  # in place: a static address
        self._write(positions, packed, scale, zero)
        return self._decode_buffers()

    def reset(self) -> None:
        """Empty every slot (buffers kept, addresses unchanged) and set the length to 0."""
        if self.is_initialized:
            self._fill_empty()
        self.cumulative_length.zero_()

    def offload(self):
        if self.is_initialized:
            self.codes, self.scale = self.codes.to("cpu", non_blocking=True), self.scale.to("cpu", non_blocking=True)
            if self.zero is not None:
                self.zero = self.zero.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.is_initialized and self.codes.device != self.device:
            self.codes = self.codes.to(self.device, non_blocking=True)
            self.scale = self.scale.to(self.device, non_blocking=True)
            if self.zero is not None:
                self.zero = self.zero.to(self.device, non_blocking=True)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search) in place, keeping the buffers' addresses."""
        if self.is_initialized:
            for t in self._buffers():
                t.copy_(t.index_select(1, beam_idx.to(t.device)))


class RoSTEQuantizedStaticSlidingWindowLayer(RoSTEQuantizedStaticLayer):
    """Sliding-window layer with ``StaticSlidingWindowLayer``'s semantics, storing packed codes.

    Buffers of ``min(sliding_window, max_cache_len)`` slots; once full, a one-token step rolls them by
    one and writes the new token last; a multi-token step that overflows returns the kept tokens plus
    the new ones (dequantized) and keeps the last window.  Mask sizes, ``get_seq_length``, ``crop`` and
    ``is_croppable`` are ``StaticSlidingWindowLayer``'s.
    """

    is_sliding = True

    def __init__(self, state: AttentionQuantState, max_cache_len: int, sliding_window: int,
                 scale_dtype: torch.dtype = torch.float32, **kwargs):
        super().__init__(state, min(int(sliding_window), int(max_cache_len)), scale_dtype)
        self.sliding_window = int(sliding_window)
        self.cumulative_length_int = 0
        self._is_croppable = max_cache_len <= sliding_window

    get_mask_sizes = StaticSlidingWindowLayer.get_mask_sizes
    get_seq_length = StaticSlidingWindowLayer.get_seq_length
    is_croppable = StaticSlidingWindowLayer.is_croppable

    def crop(self, tokens_to_remove: int) -> None:
        """``StaticSlidingWindowLayer.crop``: exact while the window was never exceeded (``is_croppable``)."""
        super().crop(tokens_to_remove)
        self.cumulative_length_int -= abs(tokens_to_remove)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        packed, scale, zero = self._encode(key_states, value_states)
        n = key_states.shape[-2]
        current = self.cumulative_length_int
        self.cumulative_length_int += n
        window = self.max_cache_len
        if current < window and current + n <= window:  # still room: write in place
            positions = torch.arange(n, device=self.device) + self.cumulative_length
            self.cumulative_length.add_(n)
            self._write(positions, packed, scale, zero)
            return self._decode_buffers()
        if current >= window and n == 1:  # full, decode step: roll by one, new token last
            last = torch.tensor([window - 1], dtype=torch.long, device=self.device)
            for buf, new in ((self.codes, packed), (self.scale, scale), (self.zero, zero)):
                if buf is not None:
                    buf.copy_(buf.roll(-1, dims=3))
                    buf.index_copy_(3, last, new)
            return self._decode_buffers()
        # overflow with several tokens: attend to the kept tokens plus all new ones, keep the last window
        kept = slice(1, None) if current >= window else slice(0, current)
        full = [None if buf is None else torch.cat((buf[:, :, :, kept], new), dim=3)
                for buf, new in ((self.codes, packed), (self.scale, scale), (self.zero, zero))]
        for buf, states in zip((self.codes, self.scale, self.zero), full, strict=True):
            if buf is not None:
                buf.copy_(states[:, :, :, -window:])
        return self._decode(*full)

    def reset(self) -> None:
        super().reset()
        self.cumulative_length_int = 0


class RoSTEQuantizedStaticCache(StaticCache):
    """Static-shape KV cache of a RoSTE model storing K/V as packed codes (see the module docstring).

    Args:
        model: a model prepared for RoSTE (QAT or packed reload, possibly PEFT-wrapped) whose K/V are
            quantized per token (``kv_bits < 16``, ``kv_format="int"``, quantization enabled).
        max_cache_len: token slots per sequence (prompt + new tokens for ``generate``).
        scale_dtype: torch.float32 (default: generation computes exactly the QAT function) or
            torch.float16 (rounded scales: cheaper, not the QAT function).

    Raises:
        ValueError: the model was not prepared for RoSTE, K/V are not quantized per token, or a layer
            type has no static quantized equivalent.

    Example::

        cache = RoSTEQuantizedStaticCache(model, max_cache_len=ids.shape[1] + 64)
        out = model.generate(ids, cache=cache, max_new_tokens=64)  # ``past_key_values=`` before 5.24
    """

    def __init__(self, model: nn.Module, max_cache_len: int, scale_dtype: torch.dtype = torch.float32, **kwargs):
        states = get_state(model).attention_states
        layers = self._build_layers(states, model.config, max_cache_len, scale_dtype)
        Cache.__init__(self, layers=layers)

    @classmethod
    def from_states(cls, states: Sequence[AttentionQuantState], config, max_cache_len: int,
                    scale_dtype: torch.dtype = torch.float32) -> RoSTEQuantizedStaticCache:
        """Build from per-layer attention states and a (text) model config, without a model."""
        cache = cls.__new__(cls)
        Cache.__init__(cache, layers=cls._build_layers(states, config, max_cache_len, scale_dtype))
        return cache

    @staticmethod
    def _build_layers(states: Sequence[AttentionQuantState], config, max_cache_len: int,
                      scale_dtype: torch.dtype) -> list[RoSTEQuantizedStaticLayer]:
        return build_cache_layers(
            "RoSTEQuantizedStaticCache", states, config,
            lambda st: RoSTEQuantizedStaticLayer(st, max_cache_len, scale_dtype),
            lambda st, window: RoSTEQuantizedStaticSlidingWindowLayer(st, max_cache_len, window, scale_dtype))

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        return checked_update("RoSTEQuantizedStaticCache", self.layers[layer_idx], key_states, value_states,
                              *args, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes of all allocated codes, scales and zero points (every slot, used or not)."""
        return sum(layer.nbytes for layer in self.layers)
