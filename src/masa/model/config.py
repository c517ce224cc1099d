"""Configuration of the native decoder LM and of every attention variant the MASA paper compares."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

ATTENTION_VARIANTS = ("dense", "gqa", "lowrank", "seq-share", "cycle-share", "masa-qkv", "masa-qkvo")

# The knob each variant needs (None: no knob). A knob set for another variant is an error.
VARIANT_KNOB = {
    "dense": None,
    "gqa": "gqa_groups",
    "lowrank": "rank",
    "seq-share": "n_unique",
    "cycle-share": "n_unique",
    "masa-qkv": "n_atoms",
    "masa-qkvo": "n_atoms",
}

# Accepted Python types per field (bool is rejected where an int is expected).
_INT, _FLOAT, _BOOL, _STR = (int,), (int, float), (bool,), (str,)
_OPTIONAL = {"n_kv_head", "d_ff", "gqa_groups", "rank", "n_unique", "n_atoms"}


class AttentionShape:
    """Derived sizes shared by the LM and ViT configs (fields d_model, n_head, n_kv_head, d_ff, gqa_groups),
    and their JSON form (``model_type`` names the class)."""

    model_type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field plus ``model_type``."""
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; rejects unknown keys and a foreign ``model_type``."""
        d = dict(d)
        model_type = d.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"model_type={model_type!r} is not {cls.model_type!r}: this is not a {cls.__name__}"
            )
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {', '.join(valid)}")
        return cls(**d)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Resolved number of K/V heads."""
        if self.n_kv_head is not None:
            return self.n_kv_head
        return self.n_head // self.gqa_groups if self.attention == "gqa" else self.n_head

    @property
    def ff_dim(self) -> int:
        """Resolved MLP hidden size: d_ff, or 8/3 d_model rounded up to a multiple of 64."""
        if self.d_ff is not None:
            return self.d_ff
        return -(-(8 * self.d_model // 3) // 64) * 64


@dataclass
class MasaLMConfig(AttentionShape):
    """Shape of a pre-norm decoder LM (Llama layout) and its attention variant.

    Defaults are the paper's 110M model (L=12, d=768) with a Llama-2-sized vocabulary.
    ``n_kv_head`` and ``d_ff`` may stay None: read the resolved values from :attr:`kv_heads` and
    :attr:`ff_dim` (they stay None so that ``dataclasses.replace`` of ``d_model`` or ``gqa_groups``
    re-derives them).
    """

    model_type: ClassVar[str] = "masa_lm"

    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: n_head (or n_head / gqa_groups for "gqa")
    d_model: int = 768
    d_ff: int | None = None  # None: SwiGLU's 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: str = "dense"
    gqa_groups: int | None = None  # gqa: query heads per K/V head
    rank: int | None = None  # lowrank: rank of every Q, K, V, O factorisation
    n_unique: int | None = None  # seq-share / cycle-share: unique attention modules M
    n_atoms: int | None = None  # masa-*: atoms S per projection type
    coef_generator: bool = False  # masa-*: paper's per-block embedding -> 3-layer MLP coefficients

    _TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "vocab_size": _INT,
        "n_layer": _INT,
        "n_head": _INT,
        "n_kv_head": _INT,
        "d_model": _INT,
        "d_ff": _INT,
        "max_seq_len": _INT,
        "rope_theta": _FLOAT,
        "norm_eps": _FLOAT,
        "tie_embeddings": _BOOL,
        "init_std": _FLOAT,
        "attention": _STR,
        "gqa_groups": _INT,
        "rank": _INT,
        "n_unique": _INT,
        "n_atoms": _INT,
        "coef_generator": _BOOL,
    }

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"d_ff={self.d_ff} must be a positive integer (or None for the SwiGLU default)")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}: change one")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = d_model / n_head = {self.head_dim} is odd; rotary positions need an even "
                "head size: change d_model or n_head"
            )
        self._check_variant()
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")

    def _check_types(self) -> None:
        for name, types in self._TYPES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            bad_bool = isinstance(value, bool) and bool not in types
            if bad_bool or not isinstance(value, types):
                expected = " or ".join(t.__name__ for t in types)
                raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected {expected}")

    def _check_variant(self) -> None:
        check_attention_variant(self)


def check_attention_variant(config: Any) -> None:
    """Validate ``attention``, its knob and ``coef_generator`` of any config with the variant fields."""
    if config.attention not in ATTENTION_VARIANTS:
        raise ValueError(
            f"attention={config.attention!r} is unknown: choose one of {', '.join(ATTENTION_VARIANTS)}"
        )
    knob = VARIANT_KNOB[config.attention]
    for other in sorted(set(VARIANT_KNOB.values()) - {None, knob}):
        if getattr(config, other) is not None:
            raise ValueError(f"{other} is not used by attention={config.attention!r}: leave it None")
    if config.coef_generator and not config.attention.startswith("masa"):
        raise ValueError(f"coef_generator only applies to masa-* attention, not {config.attention!r}")
    if knob is None:
        return
    value = getattr(config, knob)
    if value is None:
        raise ValueError(
            f"attention={config.attention!r} needs {knob}: set it (or use masa.model.configure_for_budget)"
        )
    upper = {"gqa_groups": config.n_head, "rank": config.d_model}.get(knob, config.n_layer)
    if not 1 <= value <= upper:
        raise ValueError(f"{knob}={value} is out of range for this model: it must lie in [1, {upper}]")
    if knob == "gqa_groups":
        if config.n_head % value:
            raise ValueError(f"gqa_groups={value} must divide n_head={config.n_head}")
        if config.n_kv_head is not None and config.n_kv_head != config.n_head // value:
            raise ValueError(
                f"n_kv_head={config.n_kv_head} contradicts gqa_groups={value} "
                f"(n_head / gqa_groups = {config.n_head // value}): leave n_kv_head None"
            )
