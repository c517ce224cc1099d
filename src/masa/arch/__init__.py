"""Architecture families: where each family keeps its blocks and projections."""

from masa.arch.adapters import (
    ADAPTERS,
    ATTENTION_ROLES,
    MLP_ROLES,
    Adapter,
    Fused,
    find_blocks,
    fused_parts,
    get_adapter,
    linear_weight,
    model_type,
    resolve_role,
    set_submodule,
    supported_families,
    unfuse,
    unfuse_qkv,
)

__all__ = [
    "ADAPTERS",
    "ATTENTION_ROLES",
    "MLP_ROLES",
    "Adapter",
    "Fused",
    "find_blocks",
    "fused_parts",
    "get_adapter",
    "linear_weight",
    "model_type",
    "resolve_role",
    "set_submodule",
    "supported_families",
    "unfuse",
    "unfuse_qkv",
]
