"""Finding a family's blocks and projections in a model (the table itself is ``masa.arch.families``)."""

from __future__ import annotations

import torch
from torch import nn

from masa import surgery
from masa.arch.families import ADAPTERS, ATTENTION_ROLES, EXPERT_KEYS, MLP_ROLES, Adapter, Fused
from masa.nn.fused import SplitLinear


def supported_families() -> str:
    """A one-line list of supported model types, for error messages."""
    return ", ".join(t for a in ADAPTERS for t in a.model_types)


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _unsupported_kind(model: nn.Module) -> str | None:
    """Why a model no row can serve: a mixture of experts or a multimodal wrapper (None: neither)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if any(getattr(config, key, None) for key in EXPERT_KEYS):
        return "a mixture-of-experts model (its expert MLPs are not one linear layer per block)"
    get_text_config = getattr(config, "get_text_config", None)
    if get_text_config is not None and get_text_config() is not config:
        return "a multimodal wrapper (its language model is one part among vision/audio towers)"
    return None


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter row for ``model``; raises with the supported list and the explicit escape hatch."""
    mtype = model_type(model)
    kind = _unsupported_kind(model)
    for adapter in ADAPTERS:
        if mtype in adapter.model_types and kind is None:
            return adapter
    what = f"{type(model).__name__} (model_type {mtype!r})"
    problem = f"{what} is {kind}" if kind else f"no adapter for {what}"
    raise ValueError(
        f"{problem}. Supported: {supported_families()}. To use masa on it anyway, name the layers "
        "explicitly: masa compress --targets PATTERN ... (module-name suffixes or regexes, e.g. "
        "'self_attn.q_proj'), or share(model, blocks='model.layers', targets=['self_attn.q_proj', "
        "'self_attn.k_proj'])"
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


def fused_parts(model: nn.Module, spec: Fused, d_out: int) -> tuple[dict[str, int], int]:
    """({part: rows}, groups) of a fused projection with ``d_out`` rows, row counts read from the config."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    sizes = {
        "q": heads * head_dim,
        "kv": (getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        "equal": d_out // len(spec.parts),
    }
    parts = {name: sizes[size] for name, size in zip(spec.parts, spec.rows, strict=True)}
    if sum(parts.values()) != d_out:
        raise ValueError(
            f"{type(model).__name__}'s config gives fused parts {parts} ({sum(parts.values())} rows) but the "
            f"fused layer has {d_out}: the config does not match the weights"
        )
    return parts, heads if spec.per_head else 1


def unfuse(model: nn.Module, blocks_path: str | None = None, record: bool = True) -> bool:
    """Split every fused projection of the blocks into an exact :class:`SplitLinear`, in place.

    Records the replayable ``unfuse`` operation when something changed (and ``record``); returns
    whether anything changed (a second call is a no-op).
    """
    adapter = get_adapter(model)
    blocks_path, blocks = find_blocks(model, blocks_path)
    changed = False
    for block in blocks:
        for path, spec in adapter.fused.items():
            fused = block.get_submodule(path)
            if isinstance(fused, SplitLinear):
                continue
            weight, bias = linear_weight(fused)  # (d_out, d_in), (d_out,)
            parts, groups = fused_parts(model, spec, weight.shape[0])
            set_submodule(block, path, SplitLinear.from_fused(weight, bias, parts, groups))
            changed = True
    if changed and record:
        surgery.record(model, {"op": "unfuse", "blocks": blocks_path})
    return changed


@surgery.register_replay("unfuse")
@surgery.register_replay("unfuse_qkv")  # the name written before every fused layout was supported
def _replay_unfuse(model: nn.Module, op: dict) -> None:
    unfuse(model, op["blocks"], record=False)
    surgery.record(model, op)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (find the parent, ``setattr``)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)
