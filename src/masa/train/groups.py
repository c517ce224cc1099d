"""AdamW parameter groups by parameter kind (atoms, coefficients, generator, ...).

Every parameter is classified once by the layer protocol (:func:`masa.nn.parameter_kinds`); each kind
present in the model becomes one optimizer group whose learning rate is ``lr * lr_mult[kind]`` and
whose weight decay is ``weight_decay * wd_mult[kind]``. Tensors with fewer than two dimensions never
decay, whatever their kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from masa.nn import parameter_kinds
from masa.nn.protocol import KINDS

# Weight-decay multipliers unless configured: no decay on MASA coefficients, the generator MLP that
# produces them, biases and norms; decay on matrices and atom banks.
DEFAULT_WD_MULT = {"coefficients": 0.0, "generator": 0.0, "bias": 0.0, "norm": 0.0}
# Learning-rate multipliers unless configured. The coefficient generator at the full learning rate
# (2e-3) diverged for both MASA variants over one epoch (medium preset); at 0.1 x it trained stably and
# beat plain coefficients (docs/results/train/README.md).
DEFAULT_LR_MULT = {"generator": 0.1}


def multipliers(
    lr_mult: Mapping[str, float] | None, wd_mult: Mapping[str, float] | None
) -> tuple[dict[str, float], dict[str, float]]:
    """The learning-rate and weight-decay multipliers in effect: the defaults, overridden by ``train.*``."""
    return DEFAULT_LR_MULT | dict(lr_mult or {}), DEFAULT_WD_MULT | dict(wd_mult or {})


def check_multipliers(name: str, multipliers: Mapping[str, float]) -> None:
    """Raise ValueError for an unknown kind or a negative multiplier in ``train.<name>``."""
    for kind, value in multipliers.items():
        if kind not in KINDS:
            raise ValueError(
                f"train.{name}.{kind}: {kind!r} is not a parameter kind; use one of {', '.join(KINDS)}"
            )
        if value < 0:
            raise ValueError(f"train.{name}.{kind} = {value} must be >= 0 (0 freezes / disables)")


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_mult: Mapping[str, float] | None = None,
    wd_mult: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One AdamW group per parameter kind present in ``model`` (in ``KINDS`` order).

    Each group carries ``kind`` and ``lr_mult`` (the trainer sets ``lr = schedule * lr_mult``) and its
    ``weight_decay``; 1-D tensors go to a ``<kind>`` group without decay. A multiplier for a kind the
    model does not have raises ValueError naming the kinds it has (the defaults apply where they can).
    """
    asked = dict(lr_mult or {})
    check_multipliers("lr_mult", asked)
    lr_mult, wd_mult = multipliers(asked, wd_mult)
    check_multipliers("wd_mult", wd_mult)
    kinds = parameter_kinds(model)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():  # shared parameters appear once
        if param.requires_grad:
            buckets.setdefault((kinds[name], param.ndim >= 2), []).append(param)
    present = {kind for kind, _ in buckets}
    missing = sorted(set(asked) - present)
    if missing:
        raise ValueError(
            f"train.lr_mult sets {', '.join(missing)}, which this model does not have (its parameter "
            f"kinds: {', '.join(k for k in KINDS if k in present)}): remove those keys"
        )
    groups = []
    for kind in KINDS:
        for matrix in (True, False):
            params = buckets.get((kind, matrix))
            if params:
                decay = weight_decay * wd_mult.get(kind, 1.0) if matrix else 0.0
                groups.append(
                    {"params": params, "kind": kind, "lr_mult": lr_mult.get(kind, 1.0), "weight_decay": decay}
                )
    return groups
