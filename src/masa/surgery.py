"""Module surgery bookkeeping: matching target modules, and a replayable log of what was replaced.

Every conversion (sharing, factorisation, ...) records a JSON-able operation on the model. Saving
writes the log into ``config.json``; loading rebuilds the base architecture on the ``meta`` device
and replays each operation with its registered replay function (shapes only, no data) before the
weights are assigned. New conversions register a replay function with :func:`register_replay`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from torch import nn

_LOG_ATTR = "_masa_surgery"
_REPLAYS: dict[str, Callable[[nn.Module, dict], None]] = {}


def record(model: nn.Module, op: dict) -> None:
    """Append one operation (a JSON-able dict with an ``"op"`` name) to the model's surgery log."""
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
    """Re-apply recorded operations (used by ``masa.load``); each is recorded again on the model."""
    for op in ops:
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
