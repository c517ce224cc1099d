"""A compressed layer plus a low-rank correction of its error (EoRA): y = inner(x) + B (A x)."""

from __future__ import annotations

import torch
from torch import nn

from masa.nn.lowrank import LowRankLinear
from masa.nn.protocol import MasaLinear


class CompensatedLinear(MasaLinear):
    """Any layer standing for a dense ``nn.Linear`` (``inner``: a masa layer or a plain linear) plus its own
    low-rank ``correction`` (no bias; the inner layer keeps the bias)."""

    KINDS = {"correction.up": "factors", "correction.down": "factors"}

    def __init__(self, inner: nn.Module, correction: LowRankLinear):
        super().__init__()
        self.in_features, self.out_features = correction.in_features, correction.out_features
        self.inner = inner
        self.correction = correction

    def to_dense(self) -> torch.Tensor:
        return self.inner.weight + self.correction.to_dense()  # (d_out, d_in)

    def dense_numel(self) -> int:
        bias = getattr(self.inner, "bias", None)
        return self.in_features * self.out_features + (0 if bias is None else bias.numel())

    def stored_numel(self) -> int:
        extra = self.inner.extra_stored_numel() if isinstance(self.inner, MasaLinear) else 0
        return sum(p.numel() for p in self.parameters()) + extra

    def parameter_kinds(self) -> dict[str, str]:
        """The inner layer's kinds (prefixed ``inner.``) and ``factors`` for the correction."""
        if isinstance(self.inner, MasaLinear):
            kinds = {f"inner.{name}": kind for name, kind in self.inner.parameter_kinds().items()}
        else:
            kinds = {
                f"inner.{name}": "bias" if name == "bias" else "dense"
                for name, _ in self.inner.named_parameters()
            }
        return {**kinds, "correction.up": "factors", "correction.down": "factors"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.correction(x)  # (..., d_in) -> (..., d_out)
