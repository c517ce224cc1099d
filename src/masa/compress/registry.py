"""The compression methods by name, where each is defined, and its options.

``METHOD_MODULES`` is plain data (no torch import: the CLI lists the methods cheaply); ``get_method``
imports the defining module on first use, and that module registers the method with
:func:`register_method`. A method is pure math:

    fn(layout: Layout, stats: CalibrationStats | None, config: CompressConfig) -> Replacement

reading the targets' weights from the layout and the statistics it ``needs``, returning tensors and
the operations that install them (``masa.compress.install``); it never changes the model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from masa.compress.config import CompressConfig

# method name -> module that defines (and registers) it
METHOD_MODULES = {
    "svd": "masa.compress.methods.lowrank",
    "asvd": "masa.compress.methods.lowrank",
    "svd-llm": "masa.compress.methods.lowrank",
    "fwsvd": "masa.compress.methods.lowrank",
    "basis-sharing": "masa.compress.methods.basis_sharing",
    "cospadi": "masa.compress.methods.cospadi",
    "masa": "masa.compress.methods.masa",
}
METHOD_NAMES = tuple(METHOD_MODULES)
# statistics a method may ask the pipeline to calibrate
NEEDS = ("grams", "abs_mean", "block_kl", "fisher")

T = TypeVar("T")
MethodFn = Callable[..., Any]


@dataclass(frozen=True)
class Method:
    """A registered compression method, the statistics it needs (empty: none) and its options class."""

    name: str
    fn: MethodFn
    needs: tuple[str, ...]
    options: type | None = None


_METHODS: dict[str, Method] = {}


def register_method(
    name: str, needs: tuple[str, ...] = (), options: type | None = None
) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering ``fn(layout, stats, config) -> Replacement`` as method ``name``."""
    if name not in METHOD_MODULES:
        raise ValueError(f"method {name!r} is not listed in masa.compress.registry.METHOD_MODULES")
    if unknown := [n for n in needs if n not in NEEDS]:
        raise ValueError(f"method {name!r} needs unknown statistics {unknown}; choose from {NEEDS}")

    def wrap(fn: MethodFn) -> MethodFn:
        _METHODS[name] = Method(name, fn, tuple(needs), options)
        return fn

    return wrap


def get_method(name: str) -> Method:
    """The method ``name`` (importing its module on first use); raises listing the available ones."""
    if name not in METHOD_MODULES:
        raise ValueError(
            f"unknown compression method {name!r}; available: {', '.join(sorted(METHOD_MODULES))}"
        )
    importlib.import_module(METHOD_MODULES[name])
    return _METHODS[name]


def available_methods() -> list[str]:
    return sorted(METHOD_MODULES)


def method_options(cls: type[T], config: CompressConfig) -> T:
    """The options dataclass ``cls`` built from ``config.options``; unknown keys are an error naming the
    known ones (the dataclass validates the values in ``__post_init__``)."""
    known = [f.name for f in fields(cls)]
    if unknown := sorted(set(config.options) - set(known)):
        raise ValueError(
            f"method {config.method!r} has no option {unknown}; its options are {', '.join(known) or 'none'}"
        )
    return cls(**config.options)
