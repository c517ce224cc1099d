"""Exchange with Hugging Face Llama: export any MasaLM (compressed variants densified), import dense/GQA Llamas.

The native parameter names are Llama's minus the ``model.`` prefix, so conversion is a rename; both
use the same rotary convention (rotate_half) and RMSNorm, so logits agree to float32 round-off.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from masa.model.config import MasaLMConfig
from masa.model.lm import MasaLM

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def llama_config(config: MasaLMConfig) -> LlamaConfig:
    """The LlamaConfig of the dense model with ``config``'s shape."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ff_dim,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="sdpa",
    )


def _dense_weight(name: str, module: nn.Module, materialize: bool) -> torch.Tensor:
    """Weight (d_out, d_in) of one projection; compressed layers only when ``materialize``."""
    if getattr(module, "bias", None) is not None:
        raise ValueError(f"{name} has a bias, which Llama's projections lack; it cannot be exported")
    if not materialize and not isinstance(module, nn.Linear):
        raise ValueError(
            f"{name} is a {type(module).__name__}, not a dense nn.Linear: pass materialize=True to write "
            "its equivalent dense weight"
        )
    return module.weight


@torch.no_grad()
def to_llama(model: MasaLM, materialize: bool = True) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` computing the same logits as ``model`` (same device and dtype).

    Dense and GQA map directly; low-rank, seq/cycle-shared and MASA attention are written as dense
    per-layer weights when ``materialize`` (else they raise).
    """
    if not materialize and model.config.attention not in ("dense", "gqa"):
        raise ValueError(
            f"attention={model.config.attention!r} has no direct Llama equivalent: pass materialize=True to "
            "write dense per-layer weights"
        )
    ref = model.embed_tokens.weight
    state = {
        "model.embed_tokens.weight": ref,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, block in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        state[prefix + "input_layernorm.weight"] = block.input_layernorm.weight
        state[prefix + "post_attention_layernorm.weight"] = block.post_attention_layernorm.weight
        for parent, names in (("self_attn", _ATTN), ("mlp", _MLP)):
            for name in names:
                path = f"{prefix}{parent}.{name}"
                state[path + ".weight"] = _dense_weight(
                    path, getattr(getattr(block, parent), name), materialize
                )
    llama = LlamaForCausalLM(llama_config(model.config)).to(device=ref.device, dtype=ref.dtype)
    llama.load_state_dict(state, strict=True)
    return llama.eval()


def _rope(config: LlamaConfig) -> tuple[str, float]:
    """(rope_type, rope_theta) across transformers versions (``rope_parameters`` from 5.0)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", "default"))
    return rope_type, float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def masa_config_from_llama(config: LlamaConfig) -> MasaLMConfig:
    """The MasaLMConfig (dense or gqa) of a Llama config; raises for features MasaLM lacks."""
    rope_type, rope_theta = _rope(config)
    heads = config.num_attention_heads
    kv = config.num_key_value_heads or heads
    checks = {
        f"rope_type={rope_type!r} (only 'default')": rope_type != "default",
        "attention_bias=True": bool(getattr(config, "attention_bias", False)),
        "mlp_bias=True": bool(getattr(config, "mlp_bias", False)),
        f"hidden_act={config.hidden_act!r} (only 'silu')": config.hidden_act != "silu",
        "head_dim != hidden_size / num_attention_heads": getattr(config, "head_dim", None)
        not in (None, config.hidden_size // heads),
    }
    if problems := [name for name, failed in checks.items() if failed]:
        raise ValueError(f"this Llama cannot become a MasaLM: {'; '.join(problems)}")
    return MasaLMConfig(
        vocab_size=config.vocab_size,
        n_layer=config.num_hidden_layers,
        n_head=heads,
        d_model=config.hidden_size,
        d_ff=config.intermediate_size,
        max_seq_len=config.max_position_embeddings,
        rope_theta=rope_theta,
        norm_eps=float(config.rms_norm_eps),
        tie_embeddings=bool(config.tie_word_embeddings),
        init_std=float(config.initializer_range),
        attention="dense" if kv == heads else "gqa",
        gqa_groups=None if kv == heads else heads // kv,
    )


@torch.no_grad()
def from_llama(model: LlamaForCausalLM) -> MasaLM:
    """The native MasaLM (dense or gqa) with ``model``'s weights, on its device and dtype."""
    config = masa_config_from_llama(model.config)
    state = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    ref = state["embed_tokens.weight"]
    with torch.device(ref.device):
        native = MasaLM(config).to(ref.dtype)
    native.load_state_dict(state, strict=True)
    return native.eval()
