"""Fused projections split into exact per-role linear layers (GPT-2's ``c_attn``)."""

from __future__ import annotations

import torch
from torch import nn


class SplitQKV(nn.Module):
    """GPT-2's fused ``c_attn`` as three exact ``nn.Linear`` (q_proj, k_proj, v_proj) concatenated."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.q_proj = nn.Linear(d_in, d_out, bias=bias, device=device, dtype=dtype)
        self.k_proj = nn.Linear(d_in, d_out, bias=bias, device=device, dtype=dtype)
        self.v_proj = nn.Linear(d_in, d_out, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # (..., 3 d_out)
