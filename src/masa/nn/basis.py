"""Layers over a matrix shared by several layers: Basis Sharing's basis and CoSpaDi's sparse-code dictionary."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from masa.nn.protocol import MasaLinear


class SharedBasis(nn.Module):
    """An input-side matrix (k, d_in) shared by several layers: registered once, in its first layer.

    The other layers hold it as an unregistered reference (like an atom dictionary), so
    ``state_dict()`` has one key for it and ``parameters()``, ``.to()``, ``deepcopy`` and autograd see
    one tensor.
    """

    def __init__(self, rank: int, in_features: int, device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"a shared basis needs at least one row, got rank={rank}")
        self.rank, self.in_features = rank, in_features
        self.weight = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, in_features={self.in_features}"


class _BasisUser(MasaLinear):
    """A layer y = U (B x) + b over a :class:`SharedBasis` B; registers B only when ``owner``."""

    def __init__(self, basis: SharedBasis, out_features: int, bias: bool, owner: bool, device, dtype):
        super().__init__()
        self.in_features, self.out_features, self.owner = basis.in_features, out_features, owner
        if owner:
            self.basis = basis
        object.__setattr__(self, "_basis_ref", basis)  # unregistered: every member sees the same module
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @property
    def shared(self) -> SharedBasis:
        return self._basis_ref

    def codes(self) -> torch.Tensor:
        """The dense (d_out, k) matrix mapping the basis outputs to this layer's outputs."""
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        return self.codes() @ self.shared.weight  # (d_out, k) @ (k, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.shared.weight), self.codes(), self.bias)  # d_in -> k -> d_out


class BasisLinear(_BasisUser):
    """Basis Sharing's layer: a shared basis B (k, d_in) and this layer's dense coefficients ``up`` (d_out, k)."""

    KINDS = {"up": "coefficients", "basis.weight": "basis"}

    def __init__(self, basis: SharedBasis, out_features: int, bias: bool = False, owner: bool = True,
                 device=None, dtype=None):  # fmt: skip
        super().__init__(basis, out_features, bias, owner, device, dtype)
        self.up = nn.Parameter(torch.empty(out_features, basis.rank, device=device, dtype=dtype))

    def codes(self) -> torch.Tensor:
        return self.up

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.shared.rank}, owner={self.owner}"


def index_dtype(n_atoms: int) -> torch.dtype:
    """Smallest integer dtype holding atom indices 0..n_atoms-1."""
    return torch.uint8 if n_atoms <= 256 else torch.int16 if n_atoms <= 2**15 else torch.int32


class SparseCodeLinear(_BasisUser):
    """CoSpaDi's layer: a dictionary D (k, d_in) of atoms and ``sparsity`` codes per output row.

    W[i] = sum_j values[i, j] D[indices[i, j]]. Values are parameters (d_out, s); indices a buffer
    (d_out, s) of the smallest integer dtype (or ``indices_dtype``); :meth:`extra_stored_numel` counts the index storage in
    numbers of the values' width (e.g. uint8 indices with float32 values: a quarter number each).
    """

    KINDS = {"values": "codes", "basis.weight": "basis"}

    def __init__(self, basis: SharedBasis, out_features: int, sparsity: int, bias: bool = False,
                 owner: bool = True, indices_dtype: torch.dtype | None = None, device=None, dtype=None):  # fmt: skip
        super().__init__(basis, out_features, bias, owner, device, dtype)
        if not 1 <= sparsity <= basis.rank:
            raise ValueError(f"sparsity must be in [1, {basis.rank}] (the atoms), got {sparsity}")
        self.sparsity = sparsity
        self.values = nn.Parameter(torch.empty(out_features, sparsity, device=device, dtype=dtype))
        indices_dtype = indices_dtype or index_dtype(basis.rank)  # (d_out, s) atom numbers
        self.register_buffer(
            "indices", torch.zeros(out_features, sparsity, device=device, dtype=indices_dtype)
        )

    def codes(self) -> torch.Tensor:
        dense = self.values.new_zeros(self.out_features, self.shared.rank)  # (d_out, k)
        return dense.scatter_add(1, self.indices.long(), self.values)  # W[i] sums its codes, repeats too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Few tokens (decoding): gather the s dictionary outputs each row uses (s per output, no dense
        codes); many tokens: scatter the codes into a transient (d_out, k) matrix and run one matmul."""
        z = F.linear(x, self.shared.weight)  # (..., k)
        if z.numel() // self.shared.rank * self.sparsity > self.shared.rank:
            return F.linear(z, self.codes(), self.bias)  # (..., d_out)
        y = (z[..., self.indices.long()] * self.values).sum(-1)  # (..., d_out, s) -> (..., d_out)
        return y if self.bias is None else y + self.bias

    def extra_stored_numel(self) -> int:
        """Index storage in stored numbers: bytes of the indices / bytes of one value (rounded up)."""
        return math.ceil(self.indices.numel() * self.indices.element_size() / self.values.element_size())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.shared.rank}, "
            f"sparsity={self.sparsity}, owner={self.owner}"
        )
