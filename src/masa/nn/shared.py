"""Matrix atoms shared across blocks, and the linear layer that combines them.

An :class:`AtomDictionary` owns S atoms of one projection type, each the shape of one projection
weight (d_out x d_in, the ``nn.Linear`` layout). It is registered exactly once in the model (under
``model.masa_bank``). Every block that shares it holds a :class:`SharedLinear`, which stores only its
S coefficients (and its own bias) plus a reference to the dictionary that is deliberately *not* a
registered submodule: ``state_dict()`` then holds one key per atom bank, and ``.to()``, ``deepcopy``
and autograd all see a single tensor.

Weight of block l:  W_l = sum_s c[l, s] * D_s   -- one contraction over the atoms per forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from masa.nn.lowrank import LowRankLinear
from masa.nn.protocol import MasaLinear


class CoefficientGenerator(nn.Module):
    """The paper's training-time coefficient generator: per-block embedding -> 3-layer MLP -> C.

    Produces the (n_blocks x n_atoms) coefficient matrix of one dictionary. After training it is
    collapsed into plain per-layer coefficients (:meth:`AtomDictionary.collapse_generator`).

    Initialisation: block embeddings N(0, 1), a zero output bias, and the last layer
    rescaled so that the generated coefficients have std 1/sqrt(S), the scale of plain coefficients.
    Every block then starts with its own coefficients; a shared output bias with a shrunken last
    layer (the first version) started every block with the same Q/K/V/O.
    """

    def __init__(self, n_blocks: int, n_atoms: int, embed_dim: int = 64, hidden: int = 64):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(n_blocks, embed_dim))
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, n_atoms),
        )
        with torch.no_grad():
            last = self.mlp[-1]
            last.bias.zero_()
            spread = self.mlp(self.embedding).std()  # over every (block, atom) entry; a tensor, so meta works
            last.weight.div_(spread * math.sqrt(n_atoms))

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding)  # (n_blocks, n_atoms)


class AtomDictionary(nn.Module):
    """Owner of the S matrix atoms of one projection type within one group of blocks.

    Args:
        n_atoms: S, number of atoms.
        out_features, in_features: shape of every projection that combines these atoms.
        n_blocks: how many blocks (layers) of the group share this dictionary.
        role: projection type it serves (``"q"``, ``"k"``, ``"v"``, ``"o"``, ``"up"`` ...).
        generator: attach the paper's coefficient generator (training only).
    """

    def __init__(
        self,
        n_atoms: int,
        out_features: int,
        in_features: int,
        n_blocks: int,
        role: str = "",
        generator: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if n_atoms < 1:
            raise ValueError(f"a dictionary needs at least one atom, got n_atoms={n_atoms}")
        if n_atoms > n_blocks:
            raise ValueError(
                f"{n_atoms} atoms for {n_blocks} blocks: a dictionary cannot have more atoms than the "
                "blocks that share it; lower the atoms (or raise the ratio) or enlarge the group"
            )
        self.n_atoms = n_atoms
        self.out_features = out_features
        self.in_features = in_features
        self.n_blocks = n_blocks
        self.role = role
        self.atoms = nn.Parameter(torch.empty(n_atoms, out_features, in_features, device=device, dtype=dtype))
        self.generator = CoefficientGenerator(n_blocks, n_atoms).to(device=device) if generator else None
        self._generated: tuple[tuple, torch.Tensor] | None = None  # see generated_coefficients()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_generated"] = None  # a cached graph node cannot be copied or pickled
        return state

    def extra_repr(self) -> str:
        return (
            f"role={self.role!r}, n_atoms={self.n_atoms}, shape=({self.out_features}, {self.in_features}), "
            f"n_blocks={self.n_blocks}, generator={self.generator is not None}"
        )

    def parameter_kinds(self) -> dict[str, str]:
        """``atoms``, and ``generator`` for the coefficient generator's parameters (``masa.nn.protocol``)."""
        return {name: "atoms" if name == "atoms" else "generator" for name, _ in self.named_parameters()}

    def generated_coefficients(self) -> torch.Tensor:
        """The generator's coefficients (n_blocks, S), computed once per forward pass for all its layers.

        Without this each of the n_blocks layers would run the generator MLP itself (and backpropagate
        through it). The cached output is dropped when a backward pass reaches it (its graph is freed
        then) and is recomputed whenever a generator parameter has changed (an optimizer step).
        """
        params = list(self.generator.parameters())
        key = (torch.is_grad_enabled(), *(p._version for p in params), *(p.data_ptr() for p in params))
        if self._generated is not None and self._generated[0] == key:
            return self._generated[1]
        coefficients = self.generator()  # (n_blocks, S)
        if coefficients.requires_grad:
            coefficients.register_hook(self._drop_generated)
        self._generated = (key, coefficients)
        return coefficients

    def _drop_generated(self, grad: torch.Tensor) -> None:
        self._generated = None

    def weights(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Combine atoms: coefficients (..., S) -> weights (..., d_out, d_in)."""
        return torch.tensordot(coefficients.to(self.atoms.dtype), self.atoms, dims=1)

    def collapse_generator(self, layers: list[SharedLinear]) -> None:
        """Write the generator's coefficients into the layers and drop the generator."""
        if self.generator is None:
            return
        with torch.no_grad():
            coeffs = self.generator()  # (n_blocks, S)
        for layer in layers:
            layer.coefficients = nn.Parameter(coeffs[layer.index].detach().clone())
        self.generator = None
        self._generated = None


class SharedLinear(MasaLinear):
    """A linear layer whose weight is a combination of shared atoms: W = sum_s c_s D_s.

    Holds its coefficients (S,) and optional bias (d_out,); the dictionary is an unregistered
    reference set with :meth:`bind`. Drop-in for ``nn.Linear`` (and GPT-2's ``Conv1D``):
    ``y = x W^T + b``. Its atoms are stored (and counted) once, by their :class:`AtomDictionary`.
    """

    KINDS = {"coefficients": "coefficients"}

    def __init__(
        self,
        dictionary: AtomDictionary,
        index: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = dictionary.in_features
        self.out_features = dictionary.out_features
        self.index = index
        self.bind(dictionary)
        self.coefficients: nn.Parameter | None = (
            None
            if dictionary.generator is not None
            else nn.Parameter(torch.empty(dictionary.n_atoms, device=device, dtype=dtype))
        )
        self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype)) if bias else None

    def bind(self, dictionary: AtomDictionary) -> None:
        """Point this layer at its (externally owned) dictionary without registering it."""
        object.__setattr__(self, "_dictionary", dictionary)

    @property
    def dictionary(self) -> AtomDictionary:
        return self._dictionary

    def current_coefficients(self) -> torch.Tensor:
        """This layer's coefficients (S,), from the generator while one is attached."""
        d = self._dictionary
        if d.generator is not None:
            return d.generated_coefficients()[self.index]
        return self.coefficients

    @property
    def weight(self) -> torch.Tensor:
        """The weight (d_out, d_in), built afresh from the atoms: a transient buffer, never cached
        (a cached copy beside the atoms would hold more than the dense layer it replaces)."""
        return self._dictionary.weights(self.current_coefficients())

    def runtime_problem(self, mode: str) -> str | None:
        if mode == "dense" and self._dictionary.generator is not None:
            return (
                f"{type(self).__name__} still has its training-time coefficient generator; fold it into "
                "plain coefficients first (masa.collapse_generators(model))"
            )
        return super().runtime_problem(mode)

    def to_dense(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Build the weight (S d_out d_in) and apply it (d_out d_in per token); or, with one atom or one
        token (decoding at batch 1), apply the atoms themselves and combine their outputs,
        y = sum_s c_s x D_s^T (S d_out d_in per token, no weight buffer written and read back)."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        coefficients = self.current_coefficients()
        n_atoms, tokens = coefficients.shape[-1], x.numel() // self.in_features
        if tokens * (n_atoms - 1) > n_atoms:  # building the weight is fewer operations
            return F.linear(x, self.weight.to(x.dtype), bias)
        atoms = self._dictionary.atoms.reshape(n_atoms * self.out_features, self.in_features)
        y = F.linear(x, atoms.to(x.dtype))  # (..., S d_out)
        if n_atoms == 1:
            y = y * coefficients.to(x.dtype)
        else:
            y = torch.einsum(
                "...so,s->...o", y.unflatten(-1, (n_atoms, self.out_features)), coefficients.to(x.dtype)
            )
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, index={self.index}, "
            f"n_atoms={self._dictionary.n_atoms}, bias={self.bias is not None}"
        )


class RefinedSharedLinear(MasaLinear):
    """A shared-atom projection plus its own low-rank correction: y = shared(x) + correction(x)."""

    KINDS = {"shared.coefficients": "coefficients", "correction.up": "factors", "correction.down": "factors"}

    def __init__(self, shared: SharedLinear, correction: LowRankLinear):
        super().__init__()
        self.in_features, self.out_features = shared.in_features, shared.out_features
        self.shared = shared
        self.correction = correction

    def to_dense(self) -> torch.Tensor:
        return self.shared.weight.addmm_(self.correction.up, self.correction.down)  # (d_out, d_in)

    def dense_bias(self) -> torch.Tensor | None:
        return self.shared.bias

    def runtime_problem(self, mode: str) -> str | None:
        return self.shared.runtime_problem(mode) or super().runtime_problem(mode)

    def dense_numel(self) -> int:
        """Stored numbers of the dense layer this replaces (for ``masa.count``)."""
        bias = self.shared.bias
        return self.in_features * self.out_features + (0 if bias is None else bias.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Many tokens: fold the correction into the transient shared weight (r d_out d_in more work,
        one matmul); few tokens (decoding): run it as two thin matmuls (r (d_in + d_out) per token)."""
        tokens = x.numel() // self.in_features
        if tokens * (self.in_features + self.out_features) > self.in_features * self.out_features:
            bias = self.shared.bias
            return F.linear(x, self.to_dense().to(x.dtype), None if bias is None else bias.to(x.dtype))
        return self.shared(x) + self.correction(x)  # (..., d_in) -> (..., d_out)
