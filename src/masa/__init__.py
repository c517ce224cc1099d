"""masa: Matrix Atom Sharing — smaller transformers by sharing weights across their layers.

Where things live: ``masa.sharing`` (atom dictionaries and the ``share`` surgery), ``masa.model``
(the native decoder LM and its attention variants), ``masa.train`` (training), ``masa.compress``
(training-free compression), ``masa.eval`` (perplexity and fidelity), ``masa.bench`` (benchmarks).

The top-level names are imported on first use (PEP 562), so ``import masa`` (and the ``masa`` command's
``--help`` and ``info``) do not load PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "ParamCount": "masa.accounting",
    "count": "masa.accounting",
    "load": "masa.io",
    "save": "masa.io",
    "ShareConfig": "masa.sharing",
    "collapse_generators": "masa.sharing",
    "share": "masa.sharing",
}

if TYPE_CHECKING:
    from masa.accounting import ParamCount, count
    from masa.io import load, save
    from masa.sharing import ShareConfig, collapse_generators, share

__all__ = [
    "ParamCount",
    "ShareConfig",
    "__version__",
    "collapse_generators",
    "count",
    "load",
    "save",
    "share",
]


def __getattr__(name: str) -> object:
    """Import a public name's module on first access and cache the name here."""
    if name not in _LAZY:
        raise AttributeError(f"module 'masa' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
