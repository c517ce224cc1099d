"""The native decoder LM with every attention variant of the MASA paper, its Llama bridge and sampling."""

from masa.model.attention import Attention, LowRankLinear, module_assignment
from masa.model.config import ATTENTION_VARIANTS, MasaLMConfig
from masa.model.generate import generate
from masa.model.hf import from_llama, to_llama
from masa.model.lm import MasaLM
from masa.model.variants import attention_ratio, configure_for_budget
from masa.model.vit import MasaViT, MasaViTConfig

__all__ = [
    "ATTENTION_VARIANTS",
    "Attention",
    "LowRankLinear",
    "MasaLM",
    "MasaLMConfig",
    "MasaViT",
    "MasaViTConfig",
    "attention_ratio",
    "configure_for_budget",
    "from_llama",
    "generate",
    "module_assignment",
    "to_llama",
]
