"""``basis-sharing``: one whitened basis per group of consecutive blocks (Basis Sharing, Wang et al. 2024).

For a projection role and a group of n consecutive blocks with weights W_l (d_out, d_in; y = W x) and
calibration inputs X_l, the group's inputs are whitened together (G = sum_l X_l^T X_l = L L^T) and the
whitened weights are stacked, [W_1 L; ...; W_n L] (n d_out, d_in) = U S V^T. The top k right singular
vectors give the basis the group shares, B = S_k^{1/2} V_k^T L^-1 (k, d_in), and each block keeps its
coefficients U_{l,k} S_k^{1/2} (d_out, k) (in our layout the paper's d_in x k basis is B^T). Stored
numbers: k d_in + n k d_out, so k = floor((1 - CR) n d_in d_out / (d_in + n d_out)) (``uniform``).
Roles not shared (default ``o`` and ``down``, as the paper) get SVD-LLM's per-layer truncation.
``refit=True`` refits each block's coefficients by least squares on its own Gram.

The groups of blocks built here serve ``cospadi`` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from masa.budget import ALLOCATIONS, Knob, allocate, max_useful_rank
from masa.compress.calibration import CalibrationStats
from masa.compress.config import CompressConfig
from masa.compress.install import Replacement
from masa.compress.layout import Layout, Target
from masa.compress.methods.lowrank import per_input, rank_knobs, refit_up, truncate
from masa.compress.registry import method_options, register_method
from masa.compress.whitening import cholesky_factor, whiten, whitened_lowrank

# ------------------------------------------------------------------------------------------ groups


@dataclass
class Group:
    """The targeted layers of one role in one group of consecutive blocks, with their Grams."""

    role: str
    targets: list[Target]
    grams: list[torch.Tensor]  # each (d_in, d_in)
    _chol: torch.Tensor | None = field(default=None, repr=False)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    @property
    def shape(self) -> tuple[int, int]:
        return self.targets[0].shape

    @property
    def bias(self) -> bool:
        return self.targets[0].bias is not None

    @property
    def weights(self) -> list[torch.Tensor]:
        """Each (d_out, d_in) in float64 on the Gram's device."""
        return [
            t.weight.to(device=g.device, dtype=torch.float64)
            for t, g in zip(self.targets, self.grams, strict=True)
        ]

    @property
    def chol(self) -> torch.Tensor:
        """Cholesky factor of the group's summed Gram (its inputs whitened together)."""
        if self._chol is None:
            self._chol = cholesky_factor(sum(g.to(torch.float64) for g in self.grams))
        return self._chol

    def stacked(self) -> torch.Tensor:
        """The whitened weights stacked: (n d_out, d_in)."""
        return whiten(torch.cat(self.weights), self.chol)

    def spec(self, **knobs: int) -> dict:
        """JSON-able description for the surgery log and the report."""
        return {
            "role": self.role,
            "members": self.names,
            "shape": list(self.shape),
            "bias": self.bias,
            **knobs,
        }


def check_group_size(group_size: int, n_blocks: int) -> None:
    """Raises unless 1 <= group_size <= n_blocks."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not 1 <= group_size <= n_blocks:
        raise ValueError(
            f"option group_size={group_size!r} must be an int between 1 and the model's {n_blocks} blocks"
        )


def block_groups(
    layout: Layout,
    stats: CalibrationStats,
    group_size: int,
    shared_roles: tuple[str, ...] | None,
    method: str,
) -> tuple[list[Group], list[Target]]:
    """Groups of ``group_size`` consecutive blocks per role in ``shared_roles`` (None: every role), and
    the targets of the other roles."""
    check_group_size(group_size, layout.n_blocks)
    layout.by_role(method)  # every target inside the blocks, equal shapes per role
    groups: dict[tuple[str, int], Group] = {}
    singles = []
    for t in layout.targets:  # groups in the order their first layer appears
        if shared_roles is not None and t.role not in shared_roles:
            singles.append(t)
            continue
        group = groups.setdefault((t.role, t.block // group_size), Group(t.role, [], []))
        group.targets.append(t)
        group.grams.append(stats.grams[t.name])
    return list(groups.values()), singles


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


# ---------------------------------------------------------------------------------------- the method


def _group_knob(group: Group, spectra: bool) -> Knob:
    """The basis size k of a group: a rank of the stacked (n d_out, d_in) matrix."""
    (d_out, d_in), n = group.shape, len(group.names)
    fixed = n * d_out * group.bias
    gains = torch.linalg.svdvals(group.stacked()).square()[1:] if spectra else None
    return Knob(n * d_out + d_in, n * d_out * d_in + fixed, fixed, 1, max_useful_rank(n * d_out, d_in), gains)


def _group_tensors(group: Group, rank: int, refit: bool) -> dict[str, torch.Tensor]:
    """The shared basis (in the first member) and each member's coefficients and bias."""
    weights = group.weights
    up, down = whitened_lowrank(torch.cat(weights), group.chol, rank)  # (n d_out, k), (k, d_in)
    tensors = {f"{group.names[0]}.basis.weight": down}
    for t, block_up, weight, gram in zip(
        group.targets, up.split(group.shape[0]), weights, group.grams, strict=True
    ):
        tensors[f"{t.name}.up"] = refit_up(weight, down, gram) if refit else block_up  # (d_out, k)
        if t.bias is not None:
            tensors[f"{t.name}.bias"] = t.bias
    return tensors


@register_method("basis-sharing", needs=("grams",), options=BasisSharingOptions)
def basis_sharing(layout: Layout, stats: CalibrationStats, config: CompressConfig) -> Replacement:
    """A whitened basis per role and group of blocks; per-layer SVD-LLM for the roles not shared."""
    options = method_options(BasisSharingOptions, config)
    groups, singles = block_groups(layout, stats, options.group_size, tuple(options.shared), config.method)
    spectra = options.allocation == "whitened-error"
    knobs = {f"group{i}": _group_knob(g, spectra) for i, g in enumerate(groups)}
    knobs.update(rank_knobs(singles, stats, spectra))
    steps = allocate(knobs, config.ratio, options.allocation)
    result = Replacement()
    if groups:
        specs = [g.spec(rank=steps[f"group{i}"]) for i, g in enumerate(groups)]
        tensors = {}
        for i, group in enumerate(groups):
            tensors.update(_group_tensors(group, steps[f"group{i}"], options.refit))
        result = Replacement([{"op": "basis_share", "groups": specs}], tensors)
    ranks = {t.name: steps[t.name] for t in singles}
    result = result.extend(truncate(singles, ranks, per_input(cholesky_factor, stats.grams)))
    result.report = {
        "allocation": options.allocation,
        "group_size": options.group_size,
        "groups": [
            {"role": g.role, "members": g.names, "rank": steps[f"group{i}"]} for i, g in enumerate(groups)
        ],
        "ranks": ranks,
    }
    return result
