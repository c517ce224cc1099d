"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the native models, ``train.parallel = "fsdp"``.

Blocks are sharded one by one; the root shards the rest, and with it the MASA atom bank and any
seq/cycle-shared attention modules: every block reads them, so they must be gathered for the whole
forward (the root's pre-forward gathers them once) rather than by one block. Checkpoints hold the
full (unsharded) state so a run resumes exactly; gathering it is a collective every rank joins.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place: each of ``model.layers`` is its own unit, the root holds the rest."""
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full model and optimizer state dicts on CPU (a collective: call it on every rank)."""
    return get_state_dict(model, optimizer, options=_FULL)


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Any], optim: dict[str, Any]
) -> None:
    """Load full state dicts (every rank read the same checkpoint) into a sharded model and optimizer."""
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim, options=_FULL)
