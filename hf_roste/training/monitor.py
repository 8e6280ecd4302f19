"""Per-layer quantization-error monitor for training logs.

Armed for one forward pass (the first micro-batch of a logging step), it records for every
decoder layer the relative error of its quantized linears' inputs, `||Q(x) - x||^2 / ||x||^2`
(after the online R4 where it is on), and of their weights, `||Q(W) - W||^2 / ||W||^2`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules.qat_linear import QATLinear
from ..numerics import quantization_error
from ..numerics.hadamard import hadamard_transform
from ..state import get_state


class QuantErrorMonitor:
    """Collects per-layer relative quantization errors when armed; `pop_metrics()` returns them."""

    def __init__(self, model: nn.Module) -> None:
        state = get_state(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._layers: list[list[QATLinear]] = [
            [m for m in layer.modules() if isinstance(m, QATLinear)] for layer in state.adapter.decoder_layers(base)
        ]
        self._armed = False
        self._input_err: dict[int, list[float]] = {}
        self._seen: set[int] = set()
        self._handles = []
        for idx, linears in enumerate(self._layers):
            for lin in linears:
                self._handles.append(lin.register_forward_pre_hook(self._make_hook(idx)))

    def _make_hook(self, layer_idx: int):
        def hook(module: QATLinear, args):
            if not self._armed or id(module) in self._seen or not module.act_spec.enabled:
                return
            self._seen.add(id(module))
            with torch.no_grad():
                x = args[0].detach()
                if module.input_hadamard:
                    x = hadamard_transform(x)
                x = x.reshape(-1, x.shape[-1]).float()
                denom = x.pow(2).sum().clamp_min(1e-30)
                err = quantization_error(x, module.act_spec) / denom
            self._input_err.setdefault(layer_idx, []).append(float(err))

        return hook

    def arm(self) -> None:
        self._armed = True
        self._seen.clear()
        self._input_err.clear()

    def pop_metrics(self, prefix: str = "roste/") -> dict[str, float]:
        """Metrics of the last armed forward (empty if nothing was measured); disarms."""
        self._armed = False
        if not self._input_err:
            return {}
        out: dict[str, float] = {}
        inp, wts = [], []
        with torch.no_grad():
            for idx, linears in enumerate(self._layers):
                errs = self._input_err.get(idx)
                if errs:
                    out[f"{prefix}input_qerr/layer_{idx}"] = sum(errs) / len(errs)
                    inp.append(out[f"{prefix}input_qerr/layer_{idx}"])
                w_errs = []
                for lin in linears:
                    if lin.weight_spec.enabled:
                        w = lin.weight.detach().float()
                        w_errs.append(float(quantization_error(w, lin.weight_spec) / w.pow(2).sum().clamp_min(1e-30)))
                if w_errs:
                    out[f"{prefix}weight_qerr/layer_{idx}"] = sum(w_errs) / len(w_errs)
                    wts.append(out[f"{prefix}weight_qerr/layer_{idx}"])
        if inp:
            out[f"{prefix}input_qerr/mean"] = sum(inp) / len(inp)
        if wts:
            out[f"{prefix}weight_qerr/mean"] = sum(wts) / len(wts)
        self._input_err.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
