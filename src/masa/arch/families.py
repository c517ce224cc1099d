"""The architecture table: one row per family, as plain data (no torch import, so ``masa info`` and the
CLI can read it without loading PyTorch).

A role name (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``) maps to a module path relative to a
block. Families that keep several projections in one fused module (GPT-2's ``c_attn``, Phi-3's
``qkv_proj`` and ``gate_up_proj``, GPT-NeoX's ``query_key_value``) are first *unfused* into exact
per-role ``nn.Linear`` children (``masa.nn.SplitLinear``), so their roles point inside the split layer.
The row describes each fused layout declaratively; the row counts come from the model's config
(``masa.arch.fused_parts``), never from the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
ROW_SIZES = ("q", "kv", "equal")  # how a fused part's row count is read from the config (see Fused)


@dataclass(frozen=True)
class Fused:
    """How the output rows of one fused projection divide into parts.

    Attributes:
        parts: child names of the split layer, in the fused layer's row order.
        rows: per part, its row count as read from the config: ``q`` (attention heads x head_dim), ``kv``
            (key/value heads x head_dim) or ``equal`` (an equal share of the fused rows).
        per_head: rows interleaved per attention head, [q_h0, k_h0, v_h0, q_h1, ...] (GPT-NeoX),
            instead of one part after the other.
    """

    parts: tuple[str, ...]
    rows: tuple[str, ...]
    per_head: bool = False

    def __post_init__(self):
        if len(self.parts) != len(self.rows) or not set(self.rows) <= set(ROW_SIZES):
            raise ValueError(f"Fused needs one row size from {ROW_SIZES} per part, got {self}")


@dataclass(frozen=True)
class Adapter:
    """Layout of one architecture family.

    Attributes:
        family: short name shown to users.
        model_types: ``config.model_type`` values served by this row.
        blocks: candidate dotted paths to the ``ModuleList`` of blocks (first that exists wins).
        roles: role -> module path inside a block (inside the split layer for a fused projection).
        fused: path inside a block of each fused projection -> its layout; split before compressing.
        causal: decoder (True) or encoder (False).
        lens: the logit lens, modules mapping a block's hidden state to next-token logits (final norm(s)
            ..., output head; a missing module before the head is skipped), None for encoders.
    """

    family: str
    model_types: tuple[str, ...]
    blocks: tuple[str, ...]
    roles: dict[str, str] = field(default_factory=dict)
    fused: dict[str, Fused] = field(default_factory=dict)
    causal: bool = True
    lens: tuple[str, ...] | None = None

    def fused_roles(self, path: str) -> tuple[str, ...]:
        """The roles held by the fused projection at ``path`` (one per part)."""
        return tuple(role for role, role_path in self.roles.items() if role_path.startswith(path + "."))


_LLAMA_ROLES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_BERT_ROLES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "up": "intermediate.dense",
    "down": "output.dense",
}

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("masa_lm", ("masa_lm",), ("layers",), _LLAMA_ROLES, lens=("norm", "lm_head")),
    Adapter(
        "llama",
        ("llama", "qwen2", "mistral", "qwen3"),
        ("model.layers",),
        _LLAMA_ROLES,
        lens=("model.norm", "lm_head"),
    ),
    # the lens leaves out Gemma-2/3's final logit soft-capping (monotone: it only flattens the distribution)
    Adapter(
        "gemma",
        ("gemma", "gemma2", "gemma3_text"),
        ("model.layers",),
        _LLAMA_ROLES,
        lens=("model.norm", "lm_head"),
    ),
    Adapter(
        "phi3",
        ("phi3",),
        ("model.layers",),
        {
            "q": "self_attn.qkv_proj.q",
            "k": "self_attn.qkv_proj.k",
            "v": "self_attn.qkv_proj.v",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_up_proj.gate",
            "up": "mlp.gate_up_proj.up",
            "down": "mlp.down_proj",
        },
        fused={
            "self_attn.qkv_proj": Fused(("q", "k", "v"), ("q", "kv", "kv")),
            "mlp.gate_up_proj": Fused(("gate", "up"), ("equal", "equal")),
        },
        lens=("model.norm", "lm_head"),
    ),
    Adapter(
        "gpt_neox",
        ("gpt_neox",),
        ("gpt_neox.layers", "layers"),
        {
            "q": "attention.query_key_value.q",
            "k": "attention.query_key_value.k",
            "v": "attention.query_key_value.v",
            "o": "attention.dense",
            "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h",
        },
        fused={"attention.query_key_value": Fused(("q", "k", "v"), ("q", "q", "q"), per_head=True)},
        lens=("gpt_neox.final_layer_norm", "lm_head"),
    ),
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
        fused={"attn.c_attn": Fused(("q_proj", "k_proj", "v_proj"), ("equal", "equal", "equal"))},
        lens=("transformer.ln_f", "lm_head"),
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
        lens=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    ),
    Adapter("bert", ("bert",), ("bert.encoder.layer", "encoder.layer"), _BERT_ROLES, causal=False),
    Adapter("roberta", ("roberta",), ("roberta.encoder.layer", "encoder.layer"), _BERT_ROLES, causal=False),
    # transformers 5 names ViT/DeiT's projections like Llama's and renames published files' keys on load
    Adapter(
        "vit",
        ("vit", "deit"),
        ("vit.layers", "deit.layers", "layers"),
        {
            "q": "attention.q_proj",
            "k": "attention.k_proj",
            "v": "attention.v_proj",
            "o": "attention.o_proj",
            "up": "mlp.fc1",
            "down": "mlp.fc2",
        },
        causal=False,
    ),
)

# config keys that mark a mixture-of-experts model (experts are not one linear layer per block)
EXPERT_KEYS = ("num_experts_per_tok", "num_local_experts", "num_experts", "n_routed_experts")
