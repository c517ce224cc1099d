"""Fused projections split into exact per-part linear layers (GPT-2 ``c_attn``, Phi-3 ``qkv_proj`` and
``gate_up_proj``, GPT-NeoX ``query_key_value``), so each part can be compressed or shared on its own."""

from __future__ import annotations

import torch
from torch import nn

from masa.nn.protocol import MasaLinear, dense_numel


class SplitLinear(MasaLinear):
    """One ``nn.Linear`` child per part; the forward rebuilds the fused layer's output exactly.

    The fused output rows are ``groups`` groups, each holding 1/groups of every part's rows in part
    order: groups=1 is plain concatenation [q, k, v]; groups=heads is GPT-NeoX's per-head interleaving
    [q_h0, k_h0, v_h0, q_h1, ...]. The layout is a reshape, so it needs no index buffer.
    """

    def __init__(
        self, d_in: int, parts: dict[str, int], bias: bool = True, groups: int = 1, device=None, dtype=None
    ):
        super().__init__()
        if bad := {name: rows for name, rows in parts.items() if rows < 1 or rows % groups}:
            raise ValueError(f"parts {bad} cannot be split into {groups} equal groups of rows")
        self.parts = tuple(parts)
        self.groups = groups
        self.in_features, self.out_features = d_in, sum(parts.values())
        for name, rows in parts.items():
            self.add_module(name, nn.Linear(d_in, rows, bias=bias, device=device, dtype=dtype))

    @classmethod
    def from_fused(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, parts: dict[str, int], groups: int = 1
    ) -> SplitLinear:
        """Split a fused ``weight`` (d_out, d_in) and ``bias`` (d_out,) into parts (meta: shapes only)."""
        d_out, d_in = weight.shape
        if sum(parts.values()) != d_out:
            raise ValueError(
                f"parts {parts} add up to {sum(parts.values())} rows, not the fused layer's {d_out}"
            )
        split = cls(d_in, parts, bias is not None, groups, weight.device, weight.dtype)
        if weight.device.type == "meta":
            return split
        order = fused_order(list(parts.values()), groups)  # fused row r = concatenated row order[r]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(d_out)  # concatenated row c = fused row inverse[c]
        with torch.no_grad():
            offset = 0
            for name, rows in parts.items():
                index = inverse[offset : offset + rows].to(weight.device)
                split.get_submodule(name).weight.copy_(weight[index])  # (rows, d_in)
                if bias is not None:
                    split.get_submodule(name).bias.copy_(bias[index])
                offset += rows
        return split

    def to_dense(self) -> torch.Tensor:
        """The fused weight (d_out, d_in) in the fused layer's row order (each part may be compressed)."""
        stacked = torch.cat([self.get_submodule(name).weight for name in self.parts])  # concatenated order
        return stacked[fused_order([self.get_submodule(n).out_features for n in self.parts], self.groups)]

    def dense_bias(self) -> torch.Tensor | None:
        """The fused bias (d_out,) in the fused layer's row order, or None."""
        parts = [self.get_submodule(name) for name in self.parts]
        biases = [p.dense_bias() if isinstance(p, MasaLinear) else p.bias for p in parts]
        if any(b is None for b in biases):
            return None
        return torch.cat(biases)[fused_order([p.out_features for p in parts], self.groups)]

    def runtime_problem(self, mode: str) -> str | None:
        parts = [self.get_submodule(name) for name in self.parts]
        problems = [p.runtime_problem(mode) for p in parts if isinstance(p, MasaLinear)]
        return next((p for p in problems if p), None) or super().runtime_problem(mode)

    def dense_numel(self) -> int:
        return sum(dense_numel(self.get_submodule(name)) for name in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.get_submodule(name)(x) for name in self.parts]  # (..., rows_p) each
        if self.groups == 1:
            return torch.cat(outs, dim=-1)  # (..., d_out)
        grouped = [out.unflatten(-1, (self.groups, -1)) for out in outs]  # (..., groups, rows_p / groups)
        return torch.cat(grouped, dim=-1).flatten(-2)  # (..., groups, d_out / groups) -> (..., d_out)


def fused_order(rows: list[int], groups: int) -> torch.Tensor:
    """(sum rows,) int64: for each fused output row, its row in the parts concatenated one after another."""
    starts = torch.tensor([0, *rows[:-1]]).cumsum(0)
    blocks = [start + torch.arange(n).reshape(groups, -1) for start, n in zip(starts, rows, strict=True)]
    return torch.cat(blocks, dim=1).reshape(-1)  # (groups, sum rows / groups) -> (sum rows,)
