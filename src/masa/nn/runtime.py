"""Runtime modes of a compressed model (``docs/compression.md``, "Run time"), chosen explicitly, never both at once.

* ``compact``: every masa layer holds only what was saved (atoms and coefficients, factors, bases,
  uint8 code indices) and computes from it per forward; resident bytes = stored bytes.
* ``dense``: every masa layer is replaced by a plain ``nn.Linear`` holding its dense weight, and the
  factors (and shared atoms, once no layer references them) are freed: the original's speed and memory,
  the saving is on disk. One-way: the factors are gone, so going back means loading again.
"""

from __future__ import annotations

from torch import nn

from masa.nn.protocol import RUNTIMES, MasaLinear
from masa.nn.shared import AtomDictionary, SharedLinear

_RUNTIME_ATTR = "_masa_runtime"


def check_runtime(mode: str) -> str:
    """``mode`` if it is a runtime mode masa knows, else a ValueError naming the choices."""
    if mode not in RUNTIMES:
        raise ValueError(f"unknown runtime mode {mode!r}: choose one of {', '.join(RUNTIMES)}")
    return mode


def runtime_of(model: nn.Module) -> str:
    """The runtime mode ``model`` is in (``compact`` until :func:`set_runtime` made it dense)."""
    return model.__dict__.get(_RUNTIME_ATTR, "compact")


def masa_layers(model: nn.Module) -> dict[str, MasaLinear]:
    """Every outermost masa layer of ``model`` by name (a split projection's compressed parts are inside it)."""
    layers: dict[str, MasaLinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, MasaLinear) and not any(name.startswith(f"{outer}.") for outer in layers):
            layers[name] = module
    return layers


def set_runtime(model: nn.Module, mode: str) -> nn.Module:
    """Put ``model`` in runtime ``mode`` in place and return it.

    ``dense`` replaces every masa layer by an ``nn.Linear`` (layer by layer, so the peak is the dense
    model plus the shared atoms), drops atom dictionaries no layer references any more, and clears the
    surgery log (saving it writes a plain dense model). A dense model cannot be made compact again.
    """
    check_runtime(mode)
    layers = masa_layers(model)
    if problems := {f"{name}: {p}" for name, layer in layers.items() if (p := layer.runtime_problem(mode))}:
        raise ValueError(f"runtime {mode!r} is not available: {'; '.join(sorted(problems)[:3])}")
    if mode == "compact":
        if runtime_of(model) == "dense":
            raise ValueError(
                "this model is already dense: its factors were freed; load it again with "
                "masa.load(DIR, runtime='compact')"
            )
        return model
    for name, layer in layers.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer.to_linear())
    _drop_unused_dictionaries(model)
    model.__dict__.pop("_masa_surgery", None)  # the layers it built are gone: the model is plain now
    model.__dict__[_RUNTIME_ATTR] = "dense"
    return model


def _drop_unused_dictionaries(model: nn.Module) -> None:
    """Unregister every atom dictionary no remaining shared layer reads, and containers left empty."""
    used = {id(m.dictionary) for m in model.modules() if isinstance(m, SharedLinear)}
    for name, module in list(model.named_modules()):
        if isinstance(module, AtomDictionary) and id(module) not in used:
            parent, _, leaf = name.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, leaf)
    bank = getattr(model, "masa_bank", None)  # the bank that owned them (masa.sharing.surgery.MasaBank)
    if isinstance(bank, nn.Module) and next(bank.parameters(), None) is None:
        del model.masa_bank


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor ``model`` holds (parameters and buffers, each once): what it keeps in memory
    besides activations. Works on meta-device models too (it reads shapes and dtypes only)."""
    tensors = [*model.parameters(), *model.buffers()]  # each deduplicated by identity (tied weights once)
    return sum(t.numel() * t.element_size() for t in tensors)
