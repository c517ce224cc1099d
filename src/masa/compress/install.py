"""The one step that changes a model: apply a method's operations, then assign its tensors.

A method returns a :class:`Replacement` (pure data); :func:`install` replays its operations with the
same builders ``masa.load`` uses (``masa.surgery``), then copies the tensors into the new modules
(cast to the replaced weights' dtype and device). So whatever ``compress`` writes, ``load`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from masa import surgery


@dataclass
class Replacement:
    """What a method decided: operations to apply, tensors to assign, and a JSON-able report.

    Attributes:
        ops: replayable operations (``masa.surgery``), in order.
        tensors: final ``state_dict`` key -> value (any float dtype; cast on install).
        report: what the method chose (ranks, atoms, groups ...), for the user and config.json.
    """

    ops: list[dict] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def extend(self, other: Replacement) -> Replacement:
        """This replacement followed by ``other`` (reports merged, ``other`` winning on equal keys)."""
        return Replacement(
            self.ops + other.ops, {**self.tensors, **other.tensors}, {**self.report, **other.report}
        )


def lowrank_replacement(
    name: str, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None
) -> Replacement:
    """Module ``name`` as a rank-r :class:`~masa.nn.LowRankLinear`: up (d_out, r) @ down (r, d_in) + bias."""
    (d_out, rank), (_, d_in) = up.shape, down.shape
    op = {"op": "factorize", "module": name, "shape": [d_out, d_in], "rank": rank, "bias": bias is not None}
    tensors = {f"{name}.up": up, f"{name}.down": down}
    if bias is not None:
        tensors[f"{name}.bias"] = bias
    return Replacement([op], tensors)


@torch.no_grad()
def install(model: nn.Module, replacement: Replacement) -> None:
    """Apply ``replacement`` to ``model`` in place.

    Raises naming the tensor when a value is not finite (never replaced silently), when a key names no
    tensor of the rebuilt model, or when a new module would keep uninitialised values.
    """
    for key, value in replacement.tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(
                f"{key}: the fitted values hold NaN or inf; the layer's weight or calibration statistics "
                "are not finite (check the model in float32 and the calibration text)"
            )
    surgery.replay(model, replacement.ops)
    state = model.state_dict(keep_vars=True)
    if unknown := [k for k in replacement.tensors if k not in state]:
        raise KeyError(f"the method produced tensors {unknown[:3]} that the rebuilt model does not have")
    owners = {key.rpartition(".")[0] for key in replacement.tensors}
    if unset := [k for k in state if k.rpartition(".")[0] in owners and k not in replacement.tensors]:
        raise KeyError(f"the method left {unset[:3]} of its new modules uninitialised")
    for key, value in replacement.tensors.items():
        target = state[key]
        target.copy_(value.to(device=target.device, dtype=target.dtype))
