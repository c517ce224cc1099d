"""``masa.share``: convert a model in place so its projections combine atoms shared across blocks.

For each target projection type and each group of consecutive blocks, one :class:`AtomDictionary`
is registered under ``model.masa_bank`` and every block's projection is replaced by a
:class:`SharedLinear`. Atoms are fitted to the current weights (matrix PCA across the blocks), drawn
fresh for training, or left empty (the loader fills them).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from masa import surgery
from masa.arch import find_blocks, linear_weight, resolve_role, set_submodule, unfuse
from masa.budget import atoms_for_ratio, check_ratio
from masa.nn import AtomDictionary, SharedLinear
from masa.runtime import require_module
from masa.sharing.pca import matrix_pca, unexplained_energy

INITS = ("pca", "random", "empty")


@dataclass
class ShareConfig:
    """What to share and how much.

    Attributes:
        targets: roles (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``) or module paths inside a block.
        atoms: atoms S per dictionary (an int, or a dict role -> int). Exclusive with ``ratio``.
        ratio: target compression ratio of the shared weights, in (0, 1); S is chosen per dictionary.
        groups: None (one group of all blocks), an int (that many groups of consecutive blocks), or
            explicit lists of block indices; each group gets its own dictionary per projection type.
        exclude: regexes over full module names; matching projections stay unshared.
        init: ``pca`` (fit the current weights), ``random`` (fresh, for training), ``empty`` (loader).
        generator: attach the paper's coefficient generator (embedding -> 3-layer MLP) for training.
        blocks: dotted path of the block ``ModuleList`` (default: from the architecture adapter).
    """

    targets: tuple[str, ...] = ("q", "k", "v", "o")
    atoms: int | dict[str, int] | None = None
    ratio: float | None = None
    groups: int | list[list[int]] | None = None
    exclude: tuple[str, ...] = ()
    init: str = "pca"
    generator: bool = False
    blocks: str | None = None

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(
                f"targets must be a non-empty list of role names or module paths, got {self.targets!r}"
            )
        if (self.atoms is None) == (self.ratio is None):
            raise ValueError("give exactly one budget: atoms=S (atoms per dictionary) or ratio=R in (0, 1)")
        if self.ratio is not None:
            self.ratio = check_ratio(self.ratio)
        counts = self.atoms.values() if isinstance(self.atoms, dict) else [self.atoms]
        if self.atoms is not None and not all(isinstance(s, int) and not isinstance(s, bool) for s in counts):
            raise TypeError(f"atoms must be an int (or a dict of ints per role), got {self.atoms!r}")
        if self.atoms is not None and min(counts) < 1:
            raise ValueError(f"atoms must be >= 1, got {self.atoms!r}: a dictionary needs at least one atom")
        if isinstance(self.atoms, dict) and (missing := [t for t in self.targets if t not in self.atoms]):
            raise ValueError(f"atoms dict has no entry for targets {missing}; give one per target")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if isinstance(self.groups, int) and not isinstance(self.groups, bool) and self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        self.exclude = tuple([self.exclude] if isinstance(self.exclude, str) else self.exclude)
        for pattern in self.exclude:
            re.compile(pattern)

    def atoms_for(self, target: str) -> int | None:
        return self.atoms.get(target) if isinstance(self.atoms, dict) else self.atoms


@dataclass
class DictionaryPlan:
    """One dictionary to build: which blocks share it and its shape. JSON-able (saved in config.json)."""

    key: str
    role: str
    path: str  # projection path inside a block
    members: list[int]  # block indices, in order; position in this list = SharedLinear.index
    n_atoms: int
    shape: list[int]  # [d_out, d_in]
    bias: bool
    generator: bool = False
    unexplained: float | None = field(default=None, compare=False)


@dataclass
class ShareReport:
    """What :func:`share` built."""

    blocks: str
    dictionaries: list[DictionaryPlan]

    def __str__(self) -> str:
        lines = [f"shared {len(self.dictionaries)} dictionaries over blocks at {self.blocks!r}:"]
        for d in self.dictionaries:
            energy = "" if d.unexplained is None else f", unexplained energy {d.unexplained:.1%}"
            lines.append(
                f"  {d.key}: {d.n_atoms} atoms of {tuple(d.shape)} for blocks {d.members[0]}..{d.members[-1]}{energy}"
            )
        return "\n".join(lines)


class MasaBank(nn.Module):
    """Owns every atom dictionary of a model, registered once (``model.masa_bank``)."""

    def __init__(self):
        super().__init__()
        self.dictionaries = nn.ModuleDict()


def bank_of(model: nn.Module, create: bool = False) -> MasaBank | None:
    bank = getattr(model, "masa_bank", None)
    if bank is None and create:
        bank = MasaBank()
        model.masa_bank = bank
    return bank


def shared_layers(model: nn.Module) -> list[SharedLinear]:
    return [m for m in model.modules() if isinstance(m, SharedLinear)]


def resolve_groups(groups: int | list[list[int]] | None, n_blocks: int) -> list[list[int]]:
    if groups is None:
        return [list(range(n_blocks))]
    if isinstance(groups, int):
        if groups > n_blocks:
            raise ValueError(f"{groups} groups for {n_blocks} blocks: use at most one group per block")
        size = n_blocks / groups
        return [
            list(range(math.floor(g * size + 0.5), math.floor((g + 1) * size + 0.5))) for g in range(groups)
        ]
    flat = [i for g in groups for i in g]
    if not all(isinstance(g, (list, tuple)) and g for g in groups) or len(set(flat)) != len(flat):
        raise ValueError(f"groups must be disjoint non-empty lists of block indices, got {groups!r}")
    if bad := [i for i in flat if not 0 <= i < n_blocks]:
        raise ValueError(f"group indices {bad} are outside the model's {n_blocks} blocks")
    return [list(g) for g in groups]


def plan_sharing(model: nn.Module, config: ShareConfig) -> tuple[str, list[DictionaryPlan]]:
    """Decide the dictionaries (members, shapes, atoms) without touching the model."""
    blocks_path, blocks = find_blocks(model, config.blocks)
    groups = resolve_groups(config.groups, len(blocks))
    excludes = [re.compile(p) for p in config.exclude]
    plans: list[DictionaryPlan] = []
    for target in config.targets:
        role, path = resolve_role(model, target)
        found = False
        for g, group in enumerate(groups):
            members, shapes, biases = [], set(), set()
            for i in group:
                name = f"{blocks_path}.{i}.{path}"
                if any(e.search(name) for e in excludes):
                    continue
                try:
                    module = blocks[i].get_submodule(path)
                except AttributeError:
                    continue
                if isinstance(module, SharedLinear):
                    raise ValueError(f"{name} is already shared in this model; share each projection once")
                weight, bias = linear_weight(module)
                members.append(i)
                shapes.add(tuple(weight.shape))
                biases.add(bias is not None)
            if not members:
                continue
            found = True
            if len(shapes) > 1:
                raise ValueError(
                    f"projections {path!r} of blocks {members} have shapes {sorted(shapes)} that cannot share "
                    "one dictionary; split them into groups of equal shape with groups=[[...], [...]]"
                )
            (d_out, d_in), n = shapes.pop(), len(members)
            n_atoms = config.atoms_for(target)
            if n_atoms is None:
                n_atoms = atoms_for_ratio(n, d_out, d_in, config.ratio)
            elif n_atoms > n:
                raise ValueError(
                    f"{n_atoms} atoms for {path!r} in a group of {n} blocks: a dictionary cannot have more atoms "
                    f"than blocks sharing it; use atoms <= {n} or fewer, larger groups"
                )
            key = re.sub(r"\W", "_", role) + f"_g{g}"
            plans.append(
                DictionaryPlan(
                    key, role, path, members, n_atoms, [d_out, d_in], True in biases, config.generator
                )
            )
        if not found:
            raise ValueError(
                f"target {target!r} (path {path!r} inside each block of {blocks_path!r}) matches no linear "
                "module; check the name or the exclude patterns"
            )
    return blocks_path, plans


def build_sharing(model: nn.Module, blocks_path: str, plans: list[DictionaryPlan], init: str) -> None:
    """Create the planned dictionaries and swap in :class:`SharedLinear` layers."""
    _, blocks = find_blocks(model, blocks_path)
    bank = bank_of(model, create=True)
    for plan in plans:
        if plan.key in bank.dictionaries:
            raise ValueError(f"{plan.key!r} is already shared in this model; share each projection once")
        originals = [blocks[i].get_submodule(plan.path) for i in plan.members]
        weight0, _ = linear_weight(originals[0])
        device, dtype = weight0.device, weight0.dtype
        dictionary = AtomDictionary(
            plan.n_atoms, *plan.shape, len(plan.members), plan.role, plan.generator, device, dtype
        )
        layers = [SharedLinear(dictionary, pos, plan.bias, device, dtype) for pos in range(len(plan.members))]
        if init != "empty" and device.type != "meta":
            _initialise(dictionary, layers, originals, init, plan)
        bank.dictionaries[plan.key] = dictionary
        for i, layer in zip(plan.members, layers, strict=True):
            set_submodule(blocks[i], plan.path, layer)


@torch.no_grad()
def _initialise(
    dictionary: AtomDictionary, layers: list[SharedLinear], originals: list[nn.Module], init: str, plan
) -> None:
    pairs = [linear_weight(m) for m in originals]
    weights = torch.stack([w.detach() for w, _ in pairs])  # (L, d_out, d_in)
    if init == "pca":
        atoms, coeffs = matrix_pca(weights, plan.n_atoms)  # (S, d_out, d_in), (L, S)
        plan.unexplained = unexplained_energy(weights, plan.n_atoms)
    else:  # random: keep the original init scale, Var(W_l) = S * Var(c) * Var(D) = Var(W)
        std = float(weights.float().std()) or 0.02
        atoms = torch.randn(plan.n_atoms, *weights.shape[1:], device=weights.device) * std
        coeffs = torch.randn(len(layers), plan.n_atoms, device=weights.device) / math.sqrt(plan.n_atoms)
    dictionary.atoms.copy_(atoms)
    for layer, (_, bias), c in zip(layers, pairs, coeffs, strict=True):
        if layer.coefficients is not None:
            layer.coefficients.copy_(c)
        if bias is not None:
            layer.bias.copy_(bias)


def share(
    model: nn.Module, config: ShareConfig | None = None, *, record: bool = True, **kwargs
) -> ShareReport:
    """Convert ``model`` in place so the target projections share matrix atoms across blocks.

    Pass a :class:`ShareConfig` or its fields as keywords, e.g. ``share(model, atoms=4)`` or
    ``share(model, targets=["q", "k", "v"], ratio=0.5, init="random")``. ``record=False`` leaves the
    operation out of the saved surgery log (for architectures that share by construction).
    """
    require_module(model, "masa.share")
    config = config or ShareConfig(**kwargs)
    blocks_path = config.blocks or find_blocks(model)[0]
    if config.blocks is None:
        unfuse(model, blocks_path, record=record)
    blocks_path, plans = plan_sharing(model, config)
    build_sharing(model, blocks_path, plans, config.init)
    if record:
        entries = [{k: v for k, v in asdict(p).items() if k != "unexplained"} for p in plans]
        surgery.record(model, {"op": "share", "blocks": blocks_path, "dictionaries": entries})
    return ShareReport(blocks_path, plans)


def collapse_generators(model: nn.Module) -> None:
    """Replace every coefficient generator by the plain coefficients it produces (after training)."""
    bank = bank_of(model)
    if bank is None:
        return
    layers = shared_layers(model)
    for dictionary in bank.dictionaries.values():
        dictionary.collapse_generator([la for la in layers if la.dictionary is dictionary])
    for op in surgery.operations(model):
        for entry in op.get("dictionaries", []):
            entry["generator"] = False
    config = getattr(model, "config", None)
    if getattr(config, "coef_generator", False):  # native models build the generator from their config
        config.coef_generator = False


@surgery.register_replay("share")
def _replay_share(model: nn.Module, op: dict) -> None:
    plans = [DictionaryPlan(**entry) for entry in op["dictionaries"]]
    build_sharing(model, op["blocks"], plans, init="empty")
    surgery.record(model, op)
