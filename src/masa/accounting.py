"""``masa.count``: parameters and compression ratios, with shared atoms counted once (the accounting of docs/compression.md).

Every projection role of every block is looked up through the architecture adapter (attribute
walk, so blocks that hold unregistered references to shared modules are seen too). A module's stored
numbers are its own unique parameters, plus its dictionary's atoms once; a module that replaces a
dense layer (a ``masa.nn.MasaLinear``) reports what it replaced through ``dense_numel()``. A model may override the attention
figures with two hooks: ``attention_parameters()`` and ``dense_attention_params()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from masa.arch import ATTENTION_ROLES, find_blocks, get_adapter
from masa.nn import MasaLinear, SharedLinear, SplitLinear
from masa.nn.protocol import dense_numel
from masa.runtime import require_module


@dataclass
class ParamCount:
    """Stored numbers, before (dense) and after, overall and per projection role."""

    attention: int
    attention_dense: int
    total: int
    total_dense: int
    by_role: dict[str, tuple[int, int]] = field(default_factory=dict)  # role -> (stored, dense)

    @property
    def attention_ratio(self) -> float:
        """Attention compression ratio: 1 - attention stored / attention dense."""
        return 1.0 - self.attention / self.attention_dense if self.attention_dense else 0.0

    @property
    def total_ratio(self) -> float:
        return 1.0 - self.total / self.total_dense if self.total_dense else 0.0

    def ratio(self, roles: tuple[str, ...] | None = None) -> float:
        """Compression ratio over the given roles (all projection roles by default)."""
        chosen = [v for r, v in self.by_role.items() if roles is None or r in roles]
        stored, dense = sum(s for s, _ in chosen), sum(d for _, d in chosen)
        return 1.0 - stored / dense if dense else 0.0

    def as_dict(self) -> dict:
        return {
            "attention_params": self.attention,
            "attention_params_dense": self.attention_dense,
            "attention_ratio": self.attention_ratio,
            "total_params": self.total,
            "total_params_dense": self.total_dense,
            "total_ratio": self.total_ratio,
            "by_role": {r: {"stored": s, "dense": d} for r, (s, d) in self.by_role.items()},
        }


def _walk(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _params(module: nn.Module) -> list[nn.Parameter]:
    """The module's own parameters plus the atoms (and generator) of any dictionary it references."""
    params = list(module.parameters())
    for sub in module.modules():
        if isinstance(sub, SharedLinear):
            params.append(sub.dictionary.atoms)
            if sub.dictionary.generator is not None:
                params.extend(sub.dictionary.generator.parameters())
    return params


def count(model: nn.Module) -> ParamCount:
    """Count attention and total parameters of ``model`` and its ratios against the unshared model."""
    require_module(model, "masa.count")
    total = sum(p.numel() for p in model.parameters())  # parameters() yields each tensor once
    extra = sum(m.extra_stored_numel() for m in model.modules() if isinstance(m, MasaLinear))
    total += extra
    _, blocks = find_blocks(model)
    seen: set[int] = set()
    by_role: dict[str, tuple[int, int]] = {}
    for role, path in get_adapter(model).roles.items():
        stored = dense = 0
        for block in blocks:
            module = _walk(block, path)
            if module is None:  # e.g. GPT-2's q/k/v before unfusing: counted by _fused_attention
                continue
            dense += dense_numel(module)
            for p in _params(module):
                if id(p) not in seen:
                    seen.add(id(p))
                    stored += p.numel()
            stored += sum(m.extra_stored_numel() for m in module.modules() if isinstance(m, MasaLinear))
        if dense:
            by_role[role] = (stored, dense)
    fused = _fused_attention(model, blocks, seen)
    attention = sum(by_role.get(r, (0, 0))[0] for r in ATTENTION_ROLES) + fused
    attention_dense = sum(by_role.get(r, (0, 0))[1] for r in ATTENTION_ROLES) + fused
    if hasattr(model, "attention_parameters"):
        attention = sum(p.numel() for p in {id(p): p for p in model.attention_parameters()}.values())
    if hasattr(model, "dense_attention_params"):
        attention_dense = model.dense_attention_params()
    stored_all = sum(s for s, _ in by_role.values())
    dense_all = sum(d for _, d in by_role.values())
    total_dense = total - stored_all + dense_all
    if hasattr(model, "dense_attention_params"):
        total_dense += attention_dense - sum(by_role.get(r, (0, 0))[1] for r in ATTENTION_ROLES)
    return ParamCount(attention, attention_dense, total, total_dense, by_role)


def _fused_attention(model: nn.Module, blocks: nn.ModuleList, seen: set[int]) -> int:
    """Parameters of still-fused projections holding attention roles (GPT-2 ``c_attn`` before unfusing)."""
    adapter = get_adapter(model)
    paths = [p for p in adapter.fused if set(adapter.fused_roles(p)) & set(ATTENTION_ROLES)]
    numel = 0
    for block in blocks:
        for path in paths:
            module = _walk(block, path)
            if module is not None and not isinstance(module, SplitLinear):
                numel += sum(p.numel() for p in module.parameters() if id(p) not in seen)
    return numel
