"""The model layout a compression works on, resolved once: which layers, in which block, in which role.

``resolve_layout`` turns ``CompressConfig.targets`` into :class:`Target` s (unfusing fused projections
first, as a recorded operation) and every method reads the layout instead of re-deriving it from the
model: methods never touch the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from masa import surgery
from masa.arch import (
    ATTENTION_ROLES,
    find_blocks,
    get_adapter,
    linear_weight,
    unfuse,
)
from masa.compress.config import TARGET_PRESETS, CompressConfig


@dataclass(frozen=True)
class Target:
    """One layer to compress.

    Attributes:
        name: full module name.
        block: index of its block, or None for a layer outside the blocks.
        role: ``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down`` (or its path inside the block when the
            family table has no role for it; the full name outside the blocks).
        path: its path inside the block (the full name outside the blocks).
        weight: (d_out, d_in) in the ``nn.Linear`` layout (a view of the model's tensor).
        bias: (d_out,) or None.
    """

    name: str
    block: int | None
    role: str
    path: str
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def dense(self) -> int:
        """Stored numbers of the layer: weight and bias."""
        return self.weight.numel() + (0 if self.bias is None else self.bias.numel())


@dataclass
class Layout:
    """The targets of one compression and the blocks they live in."""

    blocks_path: str | None
    n_blocks: int
    causal: bool
    targets: list[Target]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def by_role(self, method: str) -> dict[tuple[str, str], list[Target]]:
        """Targets grouped by (role, path), for methods that fit across blocks; raises for targets outside
        the blocks or of unequal shape across blocks (they cannot share)."""
        groups: dict[tuple[str, str], list[Target]] = {}
        for t in self.targets:
            if t.block is None:
                raise ValueError(
                    f"method {method!r} fits layers across blocks and {t.name} lies outside the blocks"
                    f"{f' at {self.blocks_path!r}' if self.blocks_path else ''}: exclude it, or compress it "
                    "with svd-llm"
                )
            groups.setdefault((t.role, t.path), []).append(t)
        for (_, path), targets in groups.items():
            if len({(t.shape, t.bias is None) for t in targets}) > 1:
                raise ValueError(
                    f"layers {path!r} differ in shape or bias across blocks; target them separately"
                )
        return groups


def _linear_kinds() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer

    return (nn.Linear, Conv1D)


def _find(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def resolve_layout(model: nn.Module, config: CompressConfig) -> Layout:
    """The layout of ``config.targets`` in ``model``; unfuses fused Q/K/V projections first (recorded)."""
    preset = config.targets[0] if config.targets[0] in TARGET_PRESETS else None
    try:
        adapter = get_adapter(model)
    except ValueError as err:
        if preset is not None:
            raise ValueError(f"--targets {preset} needs a known architecture: {err}") from err
        adapter = None
    blocks_path, blocks = find_blocks(model) if adapter is not None else (None, None)
    if adapter is not None and adapter.fused:
        unfuse(model, blocks_path)  # recorded
    if preset is None:
        names = surgery.match_modules(model, config.targets, config.exclude, kinds=_linear_kinds())
    else:
        roles = ATTENTION_ROLES if preset == "attn" else tuple(adapter.roles)
        names = [
            f"{blocks_path}.{i}.{adapter.roles[role]}"
            for i, block in enumerate(blocks)
            for role in roles
            if role in adapter.roles and isinstance(_find(block, adapter.roles[role]), _linear_kinds())
        ]
        excludes = [re.compile(p) for p in config.exclude]
        names = [n for n in names if not any(e.search(n) for e in excludes)]
        if not names:
            raise ValueError(
                f"--targets {preset} finds no linear layer to compress in {type(model).__name__} after "
                f"--exclude {list(config.exclude)}; relax the exclusions"
            )
    role_of = {path: role for role, path in adapter.roles.items()} if adapter is not None else {}
    targets = []
    for name in names:
        weight, bias = linear_weight(model.get_submodule(name))
        block, path = None, name
        if blocks_path is not None and name.startswith(blocks_path + "."):
            index, _, inner = name.removeprefix(blocks_path + ".").partition(".")
            if index.isdigit() and inner:
                block, path = int(index), inner
        role = role_of.get(path, path)
        targets.append(
            Target(name, block, role, path, weight.detach(), None if bias is None else bias.detach())
        )
    return Layout(
        blocks_path, 0 if blocks is None else len(blocks), adapter is None or adapter.causal, targets
    )
