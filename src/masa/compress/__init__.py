"""Training-free compression (``masa compress``): where compression happens.

* ``config``: what to do (:class:`CompressConfig`); ``layout``: the targeted layers, resolved once;
* ``calibration/``: statistics of the targets' inputs, block by block, and their cache;
* ``methods/``: the methods, pure math from a layout and statistics to a :class:`Replacement`;
* ``masa.budget``: the ratio turned into knobs; ``install``: the one step that changes the model
  (shared with ``masa.load``); ``registry``: methods by name; ``api``: :func:`compress`.

Names are imported lazily, so listing methods (``registry``) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CalibrationStats": "masa.compress.calibration",
    "calibrate": "masa.compress.calibration",
    "load_stats": "masa.compress.calibration",
    "save_stats": "masa.compress.calibration",
    "CompressConfig": "masa.compress.config",
    "CompressResult": "masa.compress.api",
    "compress": "masa.compress.api",
    "calibration_tokens": "masa.compress.api",
    "resolve_targets": "masa.compress.api",
    "Layout": "masa.compress.layout",
    "resolve_layout": "masa.compress.layout",
    "Replacement": "masa.compress.install",
    "available_methods": "masa.compress.registry",
    "get_method": "masa.compress.registry",
    "register_method": "masa.compress.registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'masa.compress' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
