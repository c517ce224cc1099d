"""``basis-sharing``: one whitened basis per group of consecutive blocks (Basis Sharing, Wang et al. 2024).

For a projection role and a group of n consecutive blocks with weights W_l (d_out, d_in; y = W x) and
calibration inputs X_l, the group's inputs are whitened together (G = sum_l X_l^T X_l = L L^T) and the
whitened weights are stacked, [W_1 L; ...; W_n L] (n d_out, d_in) = U S V^T. The top k right singular
vectors give the basis the group shares, B = S_k^{1/2} V_k^T L^-1 (k, d_in), and each block keeps its
coefficients U_{l,k} S_k^{1/2} (d_out, k) (in our layout the paper's d_in x k basis is B^T). Stored
numbers: k d_in + n k d_out, so k = floor((1 - CR) n d_in d_out / (d_in + n d_out)) (``uniform``).
Roles not shared (default ``o`` and ``down``, as the paper) get SVD-LLM's per-layer truncation.
``refit=True`` refits each block's coefficients by least squares on its own Gram.

The group and target bookkeeping here is shared with ``cospadi``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from masa import surgery
from masa.arch import find_blocks, get_adapter, linear_weight, set_submodule
from masa.compress.allocation import ALLOCATIONS, Knob, allocate, apply_ranks, max_useful_rank, rank_knobs
from masa.compress.calibration import CalibrationStats
from masa.compress.config import CompressConfig
from masa.compress.methods import get_method, options_from_config, refit_up, register_method
from masa.compress.whitening import cholesky_factor, whitened_lowrank
from masa.nn import BasisLinear, SharedBasis

# ------------------------------------------------------------------------------------------ groups


@dataclass
class Group:
    """The targeted layers of one role in one group of consecutive blocks (float64 copies)."""

    role: str
    names: list[str]
    weights: list[torch.Tensor]  # each (d_out, d_in)
    grams: list[torch.Tensor]  # each (d_in, d_in)
    bias: bool
    _chol: torch.Tensor | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weights[0].shape)

    @property
    def chol(self) -> torch.Tensor:
        """Cholesky factor of the group's summed Gram (its inputs whitened together)."""
        if self._chol is None:
            self._chol = cholesky_factor(sum(g.to(torch.float64) for g in self.grams))
        return self._chol

    def stacked(self) -> torch.Tensor:
        """The whitened weights stacked: (n d_out, d_in)."""
        return torch.cat(self.weights) @ self.chol

    def spec(self, **knobs: int) -> dict:
        """JSON-able description for the surgery log and the report."""
        return {
            "role": self.role,
            "members": self.names,
            "shape": list(self.shape),
            "bias": self.bias,
            **knobs,
        }


def _role_of(model: nn.Module, names: list[str], method: str) -> dict[str, tuple[int, str]]:
    """name -> (block index, role); raises for a target that is no block projection."""
    blocks_path, _ = find_blocks(model)
    roles = {path: role for role, path in get_adapter(model).roles.items()}
    found = {}
    for name in names:
        index, _, path = name.removeprefix(blocks_path + ".").partition(".")
        if not name.startswith(blocks_path + ".") or not index.isdigit() or path not in roles:
            raise ValueError(
                f"method {method!r} compresses block projections only ({', '.join(roles.values())} of "
                f"{blocks_path}.N), not {name}: exclude it or target these roles"
            )
        found[name] = (int(index), roles[path])
    return found


def check_group_size(group_size: int, model: nn.Module) -> int:
    """The number of blocks; raises unless 1 <= group_size <= it."""
    n_blocks = len(find_blocks(model)[1])
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not 1 <= group_size <= n_blocks:
        raise ValueError(
            f"option group_size={group_size!r} must be an int between 1 and the model's {n_blocks} blocks"
        )
    return n_blocks


def block_groups(
    model: nn.Module,
    stats: CalibrationStats,
    names: list[str],
    group_size: int,
    shared_roles: tuple[str, ...] | None,
    method: str,
) -> tuple[list[Group], list[str]]:
    """Groups of ``group_size`` consecutive blocks per role in ``shared_roles`` (None: every role), and
    the names of the targeted layers of the other roles."""
    check_group_size(group_size, model)
    where = _role_of(model, names, method)
    groups: dict[tuple[str, int], Group] = {}
    singles = []
    for name in names:
        block, role = where[name]
        if shared_roles is not None and role not in shared_roles:
            singles.append(name)
            continue
        weight, bias = linear_weight(model.get_submodule(name))
        gram = stats.grams[name]
        weight = weight.detach().to(device=gram.device, dtype=torch.float64)
        group = groups.setdefault((role, block // group_size), Group(role, [], [], [], bias is not None))
        if group.weights and (weight.shape != group.shape or (bias is not None) != group.bias):
            raise ValueError(
                f"{name} differs in shape or bias from {group.names[0]}; they cannot share a basis"
            )
        group.names.append(name)
        group.weights.append(weight)
        group.grams.append(gram)
    return list(groups.values()), singles


def install(model: nn.Module, members: list[str], make: Callable[[bool], nn.Module]) -> list[nn.Module]:
    """Replace each member by ``make(owner)``: the first owns (registers) the shared part."""
    layers = []
    for i, name in enumerate(members):
        layer = make(i == 0)
        set_submodule(model, name, layer)
        layers.append(layer)
    return layers


def _basis_layers(model: nn.Module, spec: dict) -> list[BasisLinear]:
    d_out, d_in = spec["shape"]
    like, _ = linear_weight(model.get_submodule(spec["members"][0]))
    basis = SharedBasis(spec["rank"], d_in, device=like.device, dtype=like.dtype)
    return install(
        model,
        spec["members"],
        lambda owner: BasisLinear(basis, d_out, spec["bias"], owner, device=like.device, dtype=like.dtype),
    )


@surgery.register_replay("basis_share")
def _replay(model: nn.Module, op: dict) -> None:
    for spec in op["groups"]:
        _basis_layers(model, spec)
    surgery.record(model, op)


# ------------------------------------------------------------------------------------------ options


@dataclass
class BasisSharingOptions:
    """Options of ``basis-sharing``.

    Attributes:
        group_size: consecutive blocks sharing one basis per role (the paper: 2 to 8).
        shared: roles whose groups share a basis; the others get per-layer SVD-LLM (paper: q, k, v, up, gate).
        refit: refit each block's coefficients by least squares on its own calibration Gram.
        allocation: ``uniform`` (the paper's k per group) or ``whitened-error`` (``masa.compress.allocation``).
    """

    group_size: int = 2
    shared: list[str] = field(default_factory=lambda: ["q", "k", "v", "up", "gate"])
    refit: bool = False
    allocation: str = "uniform"

    def __post_init__(self):
        if not isinstance(self.shared, (list, tuple)) or not all(isinstance(r, str) for r in self.shared):
            raise ValueError(f"option shared must be a list of roles such as ['q', 'k'], got {self.shared!r}")
        if not isinstance(self.refit, bool):
            raise ValueError(f"option refit must be true or false, got {self.refit!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"option allocation={self.allocation!r} is not one of {', '.join(ALLOCATIONS)}")

    @classmethod
    def from_config(cls, config: CompressConfig) -> BasisSharingOptions:
        return options_from_config(cls, config)


# ---------------------------------------------------------------------------------------- the method


def _group_knob(group: Group, spectra: bool) -> Knob:
    """The basis size k of a group: a rank of the stacked (n d_out, d_in) matrix."""
    (d_out, d_in), n = group.shape, len(group.names)
    fixed = n * d_out * group.bias
    gains = torch.linalg.svdvals(group.stacked()).square()[1:] if spectra else None
    return Knob(n * d_out + d_in, n * d_out * d_in + fixed, fixed, 1, max_useful_rank(n * d_out, d_in), gains)


def _apply_group(model: nn.Module, group: Group, rank: int, refit: bool) -> None:
    up, down = whitened_lowrank(torch.cat(group.weights), group.chol, rank)  # (n d_out, k), (k, d_in)
    biases = [linear_weight(model.get_submodule(n))[1] for n in group.names]
    layers = _basis_layers(model, group.spec(rank=rank))
    ups = up.split(group.shape[0])  # n x (d_out, k)
    with torch.no_grad():
        layers[0].basis.weight.copy_(down)
        for layer, block_up, weight, gram, bias in zip(
            layers, ups, group.weights, group.grams, biases, strict=True
        ):
            layer.up.copy_(refit_up(weight, down, gram) if refit else block_up)
            if bias is not None:
                layer.bias.copy_(bias.detach())


@register_method("basis-sharing", needs=("grams",))
def basis_sharing(
    model: nn.Module, stats: CalibrationStats, names: list[str], config: CompressConfig
) -> dict:
    """A whitened basis per role and group of blocks; per-layer SVD-LLM for the roles not shared."""
    options = BasisSharingOptions.from_config(config)
    groups, singles = block_groups(
        model, stats, names, options.group_size, tuple(options.shared), config.method
    )
    spectra = options.allocation == "whitened-error"
    knobs = {f"group{i}": _group_knob(g, spectra) for i, g in enumerate(groups)}
    knobs.update(rank_knobs(model, singles, stats, spectra))
    ranks = allocate(knobs, config.ratio, options.allocation)
    for i, group in enumerate(groups):
        _apply_group(model, group, ranks[f"group{i}"], options.refit)
    if groups:
        specs = [g.spec(rank=ranks[f"group{i}"]) for i, g in enumerate(groups)]
        surgery.record(model, {"op": "basis_share", "groups": specs})
    svd_llm = get_method("svd-llm").fn
    singles_config = replace(config, method="svd-llm", options={})
    report = apply_ranks(svd_llm, model, stats, knobs, {n: ranks[n] for n in singles}, singles_config)
    return {
        "allocation": options.allocation,
        "group_size": options.group_size,
        "groups": [
            {"role": g.role, "members": g.names, "rank": ranks[f"group{i}"]} for i, g in enumerate(groups)
        ],
        "ranks": report.get("ranks", {}),
    }
