"""LoRA (PEFT) on a compressed model: masa's layers registered as PEFT custom modules.

PEFT wraps a target layer as ``base_layer(x) + B A x``; the base layer only needs ``in_features``,
``out_features`` and a forward, which every :class:`~masa.nn.protocol.MasaLinear` has, so the compact
model keeps its memory saving under the adapters. PEFT warns "Unsupported layer type ... proceed at
your own risk" for each one: it then reads ``in_features``/``out_features``, which is right here.
Merging an adapter into a masa layer is refused (its weight is built from factors, there is no dense
tensor to add to): put the model in the dense runtime first (``masa.nn.set_runtime(model, "dense")``),
where every layer is an ``nn.Linear`` that PEFT supports and merges natively.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from masa.nn.basis import BasisLinear, SparseCodeLinear
from masa.nn.fused import SplitLinear
from masa.nn.lowrank import LowRankLinear
from masa.nn.shared import RefinedSharedLinear, SharedLinear

LAYER_TYPES = (LowRankLinear, SharedLinear, RefinedSharedLinear, BasisLinear, SparseCodeLinear, SplitLinear)


class MasaLoraLinear(LoraLinear):
    """PEFT's LoRA linear over a masa layer, unmerged only."""

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"cannot merge a LoRA adapter into {type(self.get_base_layer()).__name__}: its weight is built "
            "from shared or factorised parts; call masa.nn.set_runtime(model, 'dense') before get_peft_model "
            "to merge, or keep the adapter unmerged"
        )


def lora_config(**kwargs: Any) -> LoraConfig:
    """A ``peft.LoraConfig(**kwargs)`` that can target masa's layers (by name, as usual)."""
    config = LoraConfig(**kwargs)
    config._register_custom_module(dict.fromkeys(LAYER_TYPES, MasaLoraLinear))
    return config
