"""Finding a family's blocks and projections in a model (the table itself is ``masa.arch.families``)."""

from __future__ import annotations

import torch
from torch import nn

from masa.arch.families import ADAPTERS, ATTENTION_ROLES, MLP_ROLES, Adapter
from masa.nn.fused import SplitQKV


def supported_families() -> str:
    """A one-line list of supported model types, for error messages."""
    return ", ".join(t for a in ADAPTERS for t in a.model_types)


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter row for ``model``; raises with the supported list and the explicit escape hatch."""
    mtype = model_type(model)
    for adapter in ADAPTERS:
        if mtype in adapter.model_types:
            return adapter
    raise ValueError(
        f"no adapter for model_type {mtype!r} ({type(model).__name__}). Supported: {supported_families()}. "
        "For another architecture name the blocks and projections explicitly, e.g. "
        "share(model, blocks='model.layers', targets=['self_attn.q_proj', 'self_attn.k_proj'])"
    )


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The dotted path and ``ModuleList`` of the model's blocks (``path`` overrides the adapter)."""
    candidates = (path,) if path else get_adapter(model).blocks
    for candidate in candidates:
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return candidate, module
    raise ValueError(
        f"no block list at {' or '.join(candidates)} in {type(model).__name__}: pass blocks='dotted.path' to "
        "the ModuleList holding the transformer blocks"
    )


def resolve_role(model: nn.Module, target: str) -> tuple[str, str]:
    """Map a target to (role, path inside a block). Roles come from the adapter; other names pass through."""
    try:
        roles = get_adapter(model).roles
    except ValueError:
        roles = {}
    if target in roles:
        return target, roles[target]
    if target in ATTENTION_ROLES + MLP_ROLES:
        raise ValueError(
            f"target {target!r} has no module in {type(model).__name__} (available roles: {sorted(roles)}); "
            "name the projection by its path inside a block instead"
        )
    return target, target


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (d_out, d_in), bias (d_out,) or None) of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x W + b, W (d_in, d_out)
        return module.weight.t(), module.bias
    raise TypeError(
        f"{type(module).__name__} is not a linear projection (nn.Linear or Conv1D); only linear layers can "
        "share a dictionary"
    )


def unfuse_qkv(model: nn.Module, blocks_path: str | None = None) -> bool:
    """Split fused Q/K/V projections into :class:`SplitQKV` in place. Returns whether anything changed."""
    adapter = get_adapter(model)
    if adapter.fused_qkv is None:
        return False
    _, blocks = find_blocks(model, blocks_path)
    changed = False
    for block in blocks:
        fused = block.get_submodule(adapter.fused_qkv)
        if isinstance(fused, SplitQKV):
            continue
        weight, bias = linear_weight(fused)  # (3 d, d_in)
        d3, d_in = weight.shape
        split = SplitQKV(d_in, d3 // 3, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        if weight.device.type != "meta":
            with torch.no_grad():
                for i, proj in enumerate((split.q_proj, split.k_proj, split.v_proj)):
                    proj.weight.copy_(weight[i * d3 // 3 : (i + 1) * d3 // 3])
                    if bias is not None:
                        proj.bias.copy_(bias[i * d3 // 3 : (i + 1) * d3 // 3])
        set_submodule(block, adapter.fused_qkv, split)
        changed = True
    return changed


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (find the parent, ``setattr``)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)
