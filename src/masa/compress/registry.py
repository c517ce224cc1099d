"""The compression methods by name, and where each is defined (no torch import: the CLI lists them cheaply).

``get_method(name)`` imports the defining module on first use; that module registers the method with
:func:`register_method`.
"""

from __future__ import annotations

# method name -> module that defines (and registers) it
METHOD_MODULES = {
    "svd": "masa.compress.methods",
    "asvd": "masa.compress.methods",
    "svd-llm": "masa.compress.methods",
    "fwsvd": "masa.compress.fwsvd",
    "basis-sharing": "masa.compress.basis_sharing",
    "cospadi": "masa.compress.cospadi",
    "masa": "masa.compress.masa_method",
}
METHOD_NAMES = tuple(METHOD_MODULES)
