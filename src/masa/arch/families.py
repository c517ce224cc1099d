"""The architecture table: one row per family, as plain data (no torch import, so ``masa info`` and the
CLI can read it without loading PyTorch).

A role name (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``) maps to a module path relative to a
block. Families whose Q, K and V live in one fused module (GPT-2's ``c_attn`` Conv1D) are first
*unfused* into exact per-role ``nn.Linear`` children so each projection type can get its own dictionary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class Adapter:
    """Layout of one architecture family.

    Attributes:
        family: short name shown to users.
        model_types: ``config.model_type`` values served by this row.
        blocks: candidate dotted paths to the ``ModuleList`` of blocks (first that exists wins).
        roles: role -> module path inside a block.
        fused_qkv: path of a fused Q/K/V projection to split before sharing (GPT-2), else None.
        causal: decoder (True) or encoder (False).
    """

    family: str
    model_types: tuple[str, ...]
    blocks: tuple[str, ...]
    roles: dict[str, str] = field(default_factory=dict)
    fused_qkv: str | None = None
    causal: bool = True


_LLAMA_ROLES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("masa_lm", ("masa_lm",), ("layers",), _LLAMA_ROLES),
    Adapter("llama", ("llama", "qwen2", "mistral", "qwen3"), ("model.layers",), _LLAMA_ROLES),
    Adapter(
        "gpt2",
        ("gpt2",),
        ("transformer.h", "h"),
        {
            "q": "attn.c_attn.q_proj",
            "k": "attn.c_attn.k_proj",
            "v": "attn.c_attn.v_proj",
            "o": "attn.c_proj",
            "up": "mlp.c_fc",
            "down": "mlp.c_proj",
        },
        fused_qkv="attn.c_attn",
    ),
    Adapter(
        "opt",
        ("opt",),
        ("model.decoder.layers", "decoder.layers"),
        {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.out_proj",
            "up": "fc1",
            "down": "fc2",
        },
    ),
    Adapter(
        "bert",
        ("bert",),
        ("bert.encoder.layer", "encoder.layer"),
        {
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "o": "attention.output.dense",
            "up": "intermediate.dense",
            "down": "output.dense",
        },
        causal=False,
    ),
)
