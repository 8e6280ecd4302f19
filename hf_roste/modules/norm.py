"""RMSNorm used where a LayerNorm model's norms are made rotation-invariant (GPT-NeoX)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """`y = x / sqrt(mean(x^2) + eps) * weight`, computed in fp32, output in the input dtype.

    Once the residual stream is zero-mean, a LayerNorm without affine part computes exactly this,
    and unlike LayerNorm it commutes with the R1 rotation.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
