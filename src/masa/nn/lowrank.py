"""Factorised linear layers that replace dense ones (native low-rank attention, training-free compression)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from masa.nn.protocol import MasaLinear


class LowRankLinear(MasaLinear):
    """Linear map through a rank-r bottleneck: y = (x B^T) A^T + b.

    B = ``down`` (r x d_in), A = ``up`` (d_out x r), optional bias (d_out,). Stores r (d_in + d_out)
    numbers instead of d_in d_out.
    """

    KINDS = {"up": "factors", "down": "factors"}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank must be in [1, {min(in_features, out_features)}] for a {out_features}x{in_features} layer, got {rank}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def reset_parameters(self, std: float) -> None:
        """Normal factors with equal std, chosen so the product up @ down has entry std ``std``."""
        factor_std = math.sqrt(std / math.sqrt(self.rank))
        nn.init.normal_(self.down, 0.0, factor_std)
        nn.init.normal_(self.up, 0.0, factor_std)

    def to_dense(self) -> torch.Tensor:
        return self.up @ self.down  # (d_out, r) @ (r, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)  # (..., d_in) -> (..., r) -> (..., d_out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
