"""Architecture families: where each family keeps its blocks and projections.

The table (``ADAPTERS``, the role names, ``Adapter``, ``Fused``) is plain data and imported here; the
functions that walk a model (``masa.arch.adapters``, which imports torch) are imported on first use.
"""

from __future__ import annotations

import importlib

from masa.arch.families import ADAPTERS, ATTENTION_ROLES, MLP_ROLES, Adapter, Fused

_ADAPTER_FUNCTIONS = (
    "find_blocks",
    "fused_parts",
    "get_adapter",
    "linear_weight",
    "model_type",
    "resolve_role",
    "set_submodule",
    "supported_families",
    "unfuse",
)

__all__ = ["ADAPTERS", "ATTENTION_ROLES", "MLP_ROLES", "Adapter", "Fused", *_ADAPTER_FUNCTIONS]


def __getattr__(name: str) -> object:
    """Import ``masa.arch.adapters`` on first access to one of its functions."""
    if name not in _ADAPTER_FUNCTIONS:
        raise AttributeError(f"module 'masa.arch' has no attribute {name!r}")
    value = getattr(importlib.import_module("masa.arch.adapters"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_ADAPTER_FUNCTIONS})
