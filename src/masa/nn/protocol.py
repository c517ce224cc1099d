"""The protocol every masa layer follows, and the one classifier of parameters by kind.

A masa layer replaces a dense ``nn.Linear`` (y = W x + b, W (d_out, d_in)) by something that stores
fewer numbers. Every such layer is a :class:`MasaLinear`: it knows the dense layer it stands for
(``dense_numel``), what it stores itself (``stored_numel``, ``stored_bytes``; a part shared with other
layers is counted by the one module that registers it), its equivalent dense weight (``to_dense``),
and the kind of each of its parameters (``parameter_kinds``). Counting (``masa.count``), healing and
per-kind learning rates read these, never the layers' internals.

Run time (``docs/compression.md``, "Run time"): a layer offers the runtime modes in ``RUNTIMES``. ``compact``
holds only what was saved and computes from it; ``dense`` is reached by replacing the layer with
:meth:`MasaLinear.to_linear` (see :func:`masa.nn.runtime.set_runtime`), so no layer ever holds both.
"""

from __future__ import annotations

import torch
from torch import nn

# the kinds a parameter can be; "dense" is anything masa did not put there (embeddings, heads, linears)
KINDS = ("atoms", "coefficients", "generator", "factors", "basis", "codes", "bias", "norm", "dense")
# compact: hold what was saved, compute from it; dense: one plain nn.Linear per layer, factors freed
RUNTIMES = ("compact", "dense")


class MasaLinear(nn.Module):
    """Base of every layer that stands for a dense linear map. Subclasses set ``in_features``,
    ``out_features`` and ``KINDS`` (local parameter name -> kind) and implement :meth:`to_dense`."""

    in_features: int
    out_features: int
    KINDS: dict[str, str] = {}
    RUNTIMES: tuple[str, ...] = RUNTIMES  # the runtime modes this layer type offers

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight (d_out, d_in)."""
        raise NotImplementedError

    def dense_bias(self) -> torch.Tensor | None:
        """The equivalent dense bias (d_out,), or None."""
        return getattr(self, "bias", None)

    def runtime_problem(self, mode: str) -> str | None:
        """Why this layer cannot run in ``mode`` now (None when it can)."""
        if mode not in self.RUNTIMES:
            return f"{type(self).__name__} offers only the runtime modes {', '.join(self.RUNTIMES)}"
        return None

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes (its dense runtime form)."""
        weight, bias = self.to_dense().detach(), self.dense_bias()  # (d_out, d_in), (d_out,)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.contiguous())
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach())  # the bias this layer held, not a copy
        return linear

    @property
    def weight(self) -> torch.Tensor:
        """The equivalent dense weight (d_out, d_in), like ``nn.Linear.weight``."""
        return self.to_dense()

    def dense_numel(self) -> int:
        """Stored numbers of the dense layer this replaces: d_out d_in, plus the bias it keeps."""
        bias = getattr(self, "bias", None)
        return self.in_features * self.out_features + (0 if bias is None else bias.numel())

    def extra_stored_numel(self) -> int:
        """Numbers stored beside the parameters (e.g. integer code indices), in units of one value."""
        return 0

    def stored_numel(self) -> int:
        """Numbers this layer registers (shared parts only where it owns them), plus the extra ones."""
        return sum(p.numel() for p in self.parameters()) + self.extra_stored_numel()

    def stored_bytes(self) -> int:
        """Bytes of every tensor this layer registers (parameters and persistent buffers)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def parameter_kinds(self) -> dict[str, str]:
        """Local parameter name -> kind (one of ``KINDS``), for every parameter this layer registers."""
        kinds = {}
        for name, _ in self.named_parameters():
            leaf = name.rpartition(".")[2]
            kinds[name] = "bias" if leaf == "bias" else self.KINDS.get(name, self.KINDS.get(leaf, "dense"))
        return kinds


def dense_numel(module: nn.Module) -> int:
    """Stored numbers of the dense layer ``module`` stands for (itself when it is a plain layer)."""
    if isinstance(module, MasaLinear):
        return module.dense_numel()
    return sum(p.numel() for p in module.parameters())


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """Full parameter name -> kind for every parameter of ``model`` (each tensor once).

    masa's modules say it themselves (``parameter_kinds()``: layers, and atom dictionaries with their
    ``atoms`` and training-time ``generator``); parameters of normalisation modules are ``norm``; other
    biases ``bias``; the rest ``dense``.
    """
    kinds: dict[str, str] = {}
    for prefix, module in model.named_modules():
        dotted = f"{prefix}." if prefix else ""
        if callable(getattr(module, "parameter_kinds", None)):
            for name, kind in module.parameter_kinds().items():
                kinds.setdefault(dotted + name, kind)
        elif "norm" in type(module).__name__.lower():
            for name, _ in module.named_parameters(recurse=False):
                kinds.setdefault(dotted + name, "norm")
    for name, _ in model.named_parameters():
        kinds.setdefault(name, "bias" if name.endswith(".bias") else "dense")
    return {name: kinds[name] for name, _ in model.named_parameters()}
