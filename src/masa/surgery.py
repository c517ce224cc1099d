"""Module surgery bookkeeping: matching target modules, and a replayable log of what was replaced.

Every conversion (sharing, factorisation, ...) is a JSON-able operation on the model. Applying one
builds the new modules (shapes only, no data) and records it; saving writes the log into
``config.json``; loading rebuilds the base architecture on the ``meta`` device and replays the log
before the weights are assigned. Compression applies the same operations and then assigns the
tensors a method computed (``masa.compress.install``): one path builds every compressed model.

The builders are registered with :func:`register_replay` by the modules in ``OP_MODULES``, which are
imported before any replay, so a plain ``import masa`` can load whatever masa wrote.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable

from torch import nn

_LOG_ATTR = "_masa_surgery"
_REPLAYS: dict[str, Callable[[nn.Module, dict], None]] = {}
# modules registering the builders of every operation masa writes
OP_MODULES = ("masa.nn.ops", "masa.sharing.surgery", "masa.arch.adapters")


def _register_all() -> None:
    for module in OP_MODULES:
        importlib.import_module(module)


def record(model: nn.Module, op: dict) -> None:
    """Append one operation (a JSON-able dict with an ``"op"`` name) to the model's surgery log."""
    _register_all()
    if op.get("op") not in _REPLAYS:
        raise KeyError(f"operation {op.get('op')!r} has no registered replay; register it before recording")
    model.__dict__.setdefault(_LOG_ATTR, []).append(op)


def operations(model: nn.Module) -> list[dict]:
    """The operations applied to ``model`` so far, in order."""
    return list(model.__dict__.get(_LOG_ATTR, []))


def register_replay(name: str) -> Callable:
    """Decorator registering ``fn(model, op)`` that re-applies operation ``name`` on a meta-device model."""

    def wrap(fn: Callable[[nn.Module, dict], None]) -> Callable[[nn.Module, dict], None]:
        _REPLAYS[name] = fn
        return fn

    return wrap


def replay(model: nn.Module, ops: Iterable[dict]) -> None:
    """Apply recorded operations (``masa.load``, and compression's install step): each builds its modules
    (uninitialised, on the device and dtype of what it replaces) and is recorded on the model."""
    _register_all()
    for op in ops:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise ValueError(
                f"surgery entry {op!r} is not an operation (a dict with an 'op' name); the masa block of "
                "config.json is corrupt: re-save the model"
            )
        name = op.get("op")
        if name not in _REPLAYS:
            raise ValueError(
                f"checkpoint records operation {name!r}, unknown to this version of masa "
                f"(known: {sorted(_REPLAYS)}); upgrade masa to load it"
            )
        _REPLAYS[name](model, op)


def match_modules(
    model: nn.Module,
    patterns: Iterable[str],
    exclude: Iterable[str] = (),
    kinds: tuple[type, ...] | None = None,
) -> list[str]:
    """Names of modules matching any pattern (a name suffix, or a regex fully matching the name).

    Raises when a pattern matches nothing, naming the pattern and a few candidate names.
    """
    patterns, exclude = list(patterns), [re.compile(p) for p in exclude]
    names = [n for n, m in model.named_modules() if n and (kinds is None or isinstance(m, kinds))]
    chosen: list[str] = []
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = [n for n in names if n == pattern or n.endswith("." + pattern) or regex.fullmatch(n)]
        if not hits:
            sample = ", ".join(names[:6])
            raise ValueError(
                f"target pattern {pattern!r} matches no module of {type(model).__name__}; give a module-name "
                f"suffix or a regex over names such as: {sample}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in chosen if not any(e.search(n) for e in exclude)]
