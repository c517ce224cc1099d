"""Pick each attention variant's knob so that variants are compared at an equal attention budget.

Ratios use the accounting of docs/compression.md: 1 - attention parameters stored / attention parameters of the same model with
dense multi-head attention, shared atoms once, per-block coefficients counted. They are computed
exactly by building the model on the ``meta`` device (no memory, no init work).

Reachable ranges: gqa (1 - 1/g) / 2 < 50 %; lowrank 1 - 2r/d; seq/cycle 1 - M/L; masa-qkvo about
1 - S/L; masa-qkv shares only Q, K, V (O stays per block), so it reaches at most 75 % and
``configure_for_budget`` picks S for the requested *overall* attention ratio (the paper's S = L/3
gives about 50 %).
"""

from __future__ import annotations

import dataclasses

import torch

from masa.budget import atoms_for_ratio, check_ratio, rank_for_ratio
from masa.model.config import ATTENTION_VARIANTS, VARIANT_KNOB, MasaLMConfig
from masa.model.lm import MasaLM
from masa.model.vit import MasaViT, MasaViTConfig

_MASA_QKV_MAX = 0.75  # share of Q, K, V in dense MHA attention parameters


def attention_ratio(config: MasaLMConfig | MasaViTConfig) -> float:
    """Exact attention compression ratio of ``config`` (LM or ViT) against dense multi-head attention."""
    with torch.device("meta"):
        model = MasaViT(config) if isinstance(config, MasaViTConfig) else MasaLM(config)
    stored = sum(p.numel() for p in model.attention_parameters())
    return 1.0 - stored / model.dense_attention_params()


def _knob_guess(base: MasaLMConfig, attention: str, ratio: float) -> list[int]:
    """Closed-form knob values near the target ratio (neighbours are tried by the caller)."""
    L, d, H = base.n_layer, base.d_model, base.n_head
    if attention == "gqa":
        return [g for g in range(1, H + 1) if H % g == 0]
    if attention == "lowrank":  # Q, K, V, O all d x d: ratio = 1 - 2 r / d
        return [rank_for_ratio(d, d, ratio)]
    if attention in ("seq-share", "cycle-share"):
        return [round(L * (1.0 - ratio))]
    if attention == "masa-qkvo":
        return [atoms_for_ratio(L, d, d, ratio)]
    if ratio >= _MASA_QKV_MAX:  # masa-qkv: only Q, K, V (3/4 of the dense budget) shrink
        raise ValueError(
            f"masa-qkv keeps O per block, so its attention ratio stays below {_MASA_QKV_MAX:.0%}; "
            f"{ratio:.3f} is unreachable: use masa-qkvo or a lower ratio"
        )
    return [atoms_for_ratio(L, d, d, ratio / _MASA_QKV_MAX)]


def configure_for_budget(
    base: MasaLMConfig | MasaViTConfig, attention: str, target_ratio: float
) -> tuple[MasaLMConfig | MasaViTConfig, float]:
    """Config of ``base``'s shape with ``attention`` whose knob meets ``target_ratio`` most closely.

    The base's own variant, knobs and ``n_kv_head`` are dropped (the budget is relative to dense
    multi-head attention); ``coef_generator`` is kept for masa variants, and the ratio is the one
    stored after training, once the generator is collapsed into coefficients. Returns the config
    and the ratio it actually reaches; ``dense`` reaches 0.
    """
    if attention not in ATTENTION_VARIANTS:
        raise ValueError(f"attention={attention!r} is unknown: choose one of {', '.join(ATTENTION_VARIANTS)}")
    target_ratio = check_ratio(target_ratio)
    reset = {knob: None for knob in VARIANT_KNOB.values() if knob} | {"n_kv_head": None}
    plain = dataclasses.replace(base, **reset, attention="dense", coef_generator=False)
    knob = VARIANT_KNOB[attention]
    if knob is None:
        return plain, 0.0
    upper = {"gqa_groups": base.n_head, "rank": base.d_model}.get(knob, base.n_layer)
    values = sorted({v + step for v in _knob_guess(base, attention, target_ratio) for step in (-1, 0, 1)})
    scored = []  # (distance to target, ratio, config)
    for value in values:
        if not 1 <= value <= upper or (knob == "gqa_groups" and base.n_head % value):
            continue
        config = dataclasses.replace(plain, attention=attention, **{knob: value})
        ratio = attention_ratio(config)
        scored.append((abs(ratio - target_ratio), ratio, config))
    _, ratio, best = min(scored, key=lambda item: item[0])
    if base.coef_generator and attention.startswith("masa"):
        best = dataclasses.replace(best, coef_generator=True)
    return best, ratio
