"""Sharing one input quantization among the linears that read the same activation."""

from __future__ import annotations

import torch


class SharedInputQuant:
    """Memo of the last quantized input, shared by linears that read the same tensor (q/k/v, gate/up).

    Quantizing the same activation once instead of three times is exact (same tensor, same spec)
    and saves a third of the activation-quantization work. A hit requires the very same tensor
    object at the same version, the same spec, online-R4 flag and grad mode; the entry holds a
    reference to that input until the next call replaces it.
    """

    __slots__ = ("key", "source", "value")

    def __init__(self) -> None:
        self.key = None
        self.source = None
        self.value = None

    def lookup(self, x: torch.Tensor, key: tuple) -> torch.Tensor | None:
        if self.source is x and self.key == (x._version, *key):
            return self.value
        return None

    def store(self, x: torch.Tensor, key: tuple, value: torch.Tensor) -> None:
        self.source, self.key, self.value = x, (x._version, *key), value

    def clear(self) -> None:
        self.key = self.source = self.value = None
