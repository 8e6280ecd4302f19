"""Quantization-error statistics of the rotation search (one calibration forward, both settings).

The calibration forward runs with every fake quantizer OFF, so the activations are the
full-precision function of the model, which no rotation changes. The tensors the rotations act on
(down_proj input for R4, o_proj input and V for R2, Q/K for R3) are then observed in whatever state
the model is in and mapped exactly to both settings: `x_off` (rotation undone if it is on now) and
`x_on = x_off R`. The errors of "all off" and "all on" (the paper's two calibration passes) are
therefore measured in one forward, and the error of one rotation type depends on that type only
(R4: down_proj; R2: V and o_proj; R3: K, and Q for the scores), so the per-layer per-type choice is
exactly separable. (With quantized activations flowing through the network, as in the authors'
code, upstream quantization noise would leak into every downstream measurement.)

Errors (fp32, float64 accumulation), per layer, type and setting s in {off, on}:

- criterion "paper": R4 = ||Q_w(W_down,s) - W_down,s||^2 + mean_t ||Q_a(x_t,s) - x_t,s||^2;
  R2 = the same for o_proj + mean_t sum_heads ||Q_kv(v_t,s) - v_t,s||^2; R3 = the K-cache term.
- criterion "output": R4 / o_proj: mean_t ||Q_a(x_t,s) Q_w(W_s)^T - x_t W^T||^2 (the linear's
  output error); R2 adds the V-cache term above (the attention probabilities are not observable
  under sdpa); R3 = mean over query tokens of sum_{heads, keys} (q_s Q_kv(k_s)^T - q k^T)^2 *
  scaling^2 (the attention scores), over causal non-padding (query, key) pairs.

`mean_t` is over non-padding tokens (attention_mask == 1) of all calibration batches; weight errors
are data-independent totals (as in the paper's E). Padding tokens never enter a sum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PER_LAYER_ROTATIONS, SEARCH_CRITERIA
from ..modules.qat_linear import QATLinear
from ..numerics import QuantSpec, fake_quantize, quantization_error
from ..numerics.block_hadamard import r4_transform
from ..numerics.hadamard import hadamard_transform
from .fusion import r2_signs

TYPE_INDEX = {name: i for i, name in enumerate(PER_LAYER_ROTATIONS)}


def _rot_heads(x: Tensor, head_dim: int, signs: Tensor | None, transpose: bool) -> Tensor:
    """Per-head rotation of the last dim of `x` (`[..., heads * head_dim]` or `[..., head_dim]`)."""
    shape = x.shape
    y = hadamard_transform(x.reshape(*shape[:-1], shape[-1] // head_dim, head_dim), signs, transpose=transpose)
    return y.reshape(shape)


def _r4_rotation(down: QATLinear) -> Callable[[Tensor, bool], Tensor]:
    """The online R4 the module applies: full-size, or block-diagonal (`RoSTEConfig.r4_block_size`)."""
    block = getattr(down, "input_hadamard_block", None)
    return lambda t, transpose: r4_transform(t, block, transpose=transpose)


def _both(x: Tensor, is_on: bool, rotate: Callable[[Tensor, bool], Tensor]) -> tuple[Tensor, Tensor]:
    """`(x_off, x_on)` from a tensor observed in state `is_on`; `rotate(t, transpose)`."""
    if is_on:
        return rotate(x, True), x
    return x, rotate(x, False)


class ErrorCollector:
    """Forward hooks and attention observers accumulating the search statistics of one model.

    Use as a context manager around calibration forwards; set `mask` (`[batch, seq]` bool) before
    each forward. `sums[layer, type, setting]` holds token-summed errors (float64, CPU),
    `weight[layer, type, setting]` the data-independent weight errors, `tokens` the token count.
    """

    def __init__(self, model: nn.Module, state, criterion: str, searchable: list[dict[str, bool]]) -> None:
        if criterion not in SEARCH_CRITERIA:
            raise ValueError(f"criterion={criterion!r} is invalid: expected one of {SEARCH_CRITERIA}.")
        self.model, self.state, self.criterion, self.searchable = model, state, criterion, searchable
        adapter = state.adapter
        self.layers = list(adapter.decoder_layers(model))
        self.num_heads, self.kv_heads, self.head_dim = adapter.head_layout(model)
        n = len(self.layers)
        self.sums = torch.zeros(n, len(PER_LAYER_ROTATIONS), 2, dtype=torch.float64)
        self.weight = torch.zeros_like(self.sums)
        self.tokens = 0
        self.mask: Tensor | None = None
        self._handles: list = []
        self._observers: list = []
        self._queries: dict[int, Tensor] = {}
        self._signs = [r2_signs(self.head_dim, state.config.rotation_seed, i) for i in range(n)]

    # ---------------------------------------------------------------- plumbing
    def _add(self, layer: int, name: str, setting: int, value: Tensor) -> None:
        self.sums[layer, TYPE_INDEX[name], setting] += float(value)

    def _row_mask(self, shape: torch.Size) -> Tensor:
        mask = self.mask
        if mask is None:
            raise RuntimeError("ErrorCollector.mask must be set before each calibration forward.")
        if tuple(mask.shape) == tuple(shape):
            return mask
        if mask.numel() == torch.Size(shape).numel():
            return mask.reshape(shape)
        raise RuntimeError(f"Cannot match the attention mask {tuple(mask.shape)} to activations {tuple(shape)}.")

    def __enter__(self) -> ErrorCollector:
        adapter = self.state.adapter
        for i, layer in enumerate(self.layers):
            flags = self.searchable[i]
            down = adapter.get(layer, adapter.down_proj)
            o_proj = adapter.get(layer, adapter.o_proj)
            if flags["R4"] and isinstance(down, QATLinear):
                self._weight_errors(i, "R4", down, _r4_rotation(down), bool(down.input_hadamard))
                # hooked on the module the layer calls (a LoRA wrapper calls its base layer's pieces, not its forward)
                called = layer.get_submodule(adapter.down_proj)
                self._handles.append(called.register_forward_pre_hook(self._linear_hook(i, "R4", down)))
            if flags["R2"] and isinstance(o_proj, QATLinear):
                rot = self._o_rotation(i)
                self._weight_errors(i, "R2", o_proj, rot, self._r2_on(i))
                called = layer.get_submodule(adapter.o_proj)
                self._handles.append(called.register_forward_pre_hook(self._linear_hook(i, "R2", o_proj)))
            if flags["R2"] or flags["R3"]:
                st = self.state.attention_states[i]
                obs = self._attention_observer(i, adapter.get(layer, adapter.attn))
                st.observers.append(obs)
                self._observers.append((st, obs, st.observe_query))
                if flags["R3"] and self.criterion == "output":
                    st.observe_query = True
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for st, obs, observe_query in self._observers:
            st.observers.remove(obs)
            st.observe_query = observe_query
        self._handles, self._observers, self._queries = [], [], {}

    def _r2_on(self, i: int) -> bool:
        return bool(self.state.applied["layers"][i]["R2"])

    def _o_rotation(self, i: int) -> Callable[[Tensor, bool], Tensor]:
        signs, hd = self._signs[i], self.head_dim
        return lambda t, transpose: _rot_heads(t, hd, signs.to(t.device), transpose)

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def _weight_errors(self, i: int, name: str, lin: QATLinear, rotate, is_on: bool) -> None:
        if self.criterion != "paper":
            return
        w_off, w_on = _both(lin.weight.detach().float(), is_on, rotate)
        for s, w in enumerate((w_off, w_on)):
            self.weight[i, TYPE_INDEX[name], s] += float(quantization_error(w, lin.weight_spec))

    # ---------------------------------------------------------------- linears
    def _linear_hook(self, i: int, name: str, lin: QATLinear):
        if name == "R4":
            rotate = _r4_rotation(lin)

            def input_is_rotated() -> bool:
                return False  # the module input is before the online R4
        else:
            rotate = self._o_rotation(i)

            def input_is_rotated() -> bool:
                return self._r2_on(i)

        def hook(module, args):
            x = args[0].detach().float()
            mask = self._row_mask(x.shape[:-1])
            if name == "R4":
                x_off, x_on = x, rotate(x, False)
            else:
                x_off, x_on = _both(x, input_is_rotated(), rotate)
            if self.criterion == "paper":
                for s, xs in enumerate((x_off, x_on)):
                    self._add(i, name, s, quantization_error(xs, lin.act_spec, row_mask=mask))
                return None
            w_cur = lin.weight.detach().float()
            w_is_on = bool(lin.input_hadamard) if name == "R4" else self._r2_on(i)
            w_off, w_on = _both(w_cur, w_is_on, rotate)
            y_ref = F.linear(x_off, w_off)
            for s, (xs, ws) in enumerate(((x_off, w_off), (x_on, w_on))):
                y = F.linear(fake_quantize(xs, lin.act_spec), fake_quantize(ws, lin.weight_spec))
                err = (y - y_ref).square_().sum(-1)
                self._add(i, name, s, torch.where(mask, err, 0.0).sum(dtype=torch.float64))
            return None

        return hook

    # ---------------------------------------------------------------- attention
    def _attention_observer(self, i: int, attn: nn.Module):
        flags = self.searchable[i]
        st = self.state.attention_states[i]
        kv_spec: QuantSpec = st.kv_spec
        hd = self.head_dim
        scaling = float(getattr(attn, "scaling", hd**-0.5))

        def r3(t, transpose):
            return hadamard_transform(t, None, transpose=transpose)

        def r2(t, transpose):
            return hadamard_transform(t, self._signs[i].to(t.device), transpose=transpose)

        def observer(name: str, t: Tensor) -> None:
            with torch.no_grad():
                t = t.detach().float()
                if name == "q":
                    self._queries[i] = t
                    return
                b, heads, seq, _ = t.shape
                rows = self._row_mask(torch.Size((b, seq)))[:, None, :].expand(b, heads, seq)
                if name == "v" and flags["R2"]:
                    for s, vs in enumerate(_both(t, self._r2_on(i), r2)):
                        self._add(i, "R2", s, quantization_error(vs, kv_spec, row_mask=rows))
                if name == "k" and flags["R3"]:
                    k_off, k_on = _both(t, bool(st.r3), r3)
                    if self.criterion == "paper":
                        for s, ks in enumerate((k_off, k_on)):
                            self._add(i, "R3", s, quantization_error(ks, kv_spec, row_mask=rows))
                    else:
                        q = self._queries.pop(i)
                        self._score_errors(i, q, (k_off, k_on), bool(st.r3), kv_spec, scaling, rows[:, 0])

        return observer

    def _score_errors(self, i, q, ks, r3_on, kv_spec, scaling, valid) -> None:
        q_off, q_on = _both(q, r3_on, lambda t, tr: hadamard_transform(t, None, transpose=tr))
        rep = q.shape[1] // ks[0].shape[1]
        seq = q.shape[2]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
        pairs = valid[:, None, :, None] & valid[:, None, None, :] & causal
        k_ref = ks[0].repeat_interleave(rep, dim=1)
        ref = q_off @ k_ref.transpose(-1, -2)
        for s, (qs, k) in enumerate(((q_off, ks[0]), (q_on, ks[1]))):
            kq = fake_quantize(k, kv_spec).repeat_interleave(rep, dim=1)
            err = (qs @ kq.transpose(-1, -2) - ref).square_().mul_(scaling * scaling)
            self._add(i, "R3", s, torch.where(pairs, err, 0.0).sum(dtype=torch.float64))

    # ---------------------------------------------------------------- result
    def errors(self, tokens: int | float | None = None) -> Tensor:
        """`[layers, 3, 2]` float64: weight errors + token-summed errors / tokens."""
        n = self.tokens if tokens is None else tokens
        return self.weight + self.sums / max(float(n), 1.0)
