"""The native pre-norm decoder LM (Llama layout and parameter names) with every MASA-paper attention variant.

Parameter names mirror ``transformers.LlamaForCausalLM`` minus its ``model.`` prefix, so export is a
rename. Seq/cycle sharing: the M unique attention modules are owned once by ``shared_attn``; each
block holds an *unregistered* reference (one state_dict key per unique module, safetensors-safe;
``.to()``, ``deepcopy`` and autograd see one module). MASA: the dense model is built, then the
sharing surgery (``masa.sharing.share``) replaces the projections by shared-atom layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from masa.model.attention import Attention, KVCache, LowRankLinear, module_assignment, rotary_cos_sin
from masa.model.config import MasaLMConfig

_SHARED_MODULE_VARIANTS = ("seq-share", "cycle-share")
_MASA_TARGETS = {"masa-qkv": ("q", "k", "v"), "masa-qkvo": ("q", "k", "v", "o")}


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, scale by a learned weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MasaLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ff_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ff_dim, bias=False)
        self.down_proj = nn.Linear(config.ff_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm block. ``shared_attn``: reuse a module owned elsewhere (not registered here).

    Decoder (causal, rotary) in the LM; encoder (``causal=False``, ``cos = sin = None``) in the ViT.
    """

    def __init__(self, config: MasaLMConfig, shared_attn: Attention | None = None, causal: bool = True):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        if shared_attn is None:
            self.self_attn = Attention(config, causal)
        else:
            object.__setattr__(self, "self_attn", shared_attn)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def init_normal(
    root: nn.Module,
    std: float,
    n_layer: int,
    kinds: tuple[type, ...],
    skip: nn.Module | None = None,
    zero_bias: bool = False,
) -> None:
    """N(0, std) for the weights of every module of ``kinds`` (and low-rank factors) under ``root`` but
    ``skip``; residual outputs (o_proj, down_proj) scaled by 1/sqrt(2 n_layer) (GPT-2); ``zero_bias``
    zeroes their biases."""
    for name, module in root.named_modules():
        scaled = std / math.sqrt(2 * n_layer) if name.endswith(("o_proj", "down_proj")) else std
        if isinstance(module, LowRankLinear):
            module.reset_parameters(scaled)
        elif isinstance(module, kinds) and module is not skip:
            nn.init.normal_(module.weight, 0.0, scaled)
            if zero_bias and module.bias is not None:
                nn.init.zeros_(module.bias)


class MasaLM(nn.Module):
    """Decoder-only LM: ``forward(input_ids (B, T)) -> logits (B, T, vocab)``."""

    def __init__(self, config: MasaLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        if config.attention in _SHARED_MODULE_VARIANTS:
            self.shared_attn = nn.ModuleList(Attention(config) for _ in range(config.n_unique))
            self.layers = nn.ModuleList(Block(config, self.shared_attn[i]) for i in module_assignment(config))
        else:
            self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        self._init_weights()
        if config.attention in _MASA_TARGETS:
            from masa.sharing import share  # deferred: masa.sharing knows this model via its adapter table

            share(
                self,
                targets=_MASA_TARGETS[config.attention],
                atoms=config.n_atoms,
                init="random",
                generator=config.coef_generator,
                record=False,
            )

    def tie_weights(self) -> None:
        """Share the output head with the embedding when configured (call again after ``assign=True`` loads)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self) -> None:
        """N(0, init_std) everywhere; residual outputs (o_proj, down_proj) scaled by 1/sqrt(2 L) (GPT-2)."""
        std = self.config.init_std
        init_normal(self, std, self.config.n_layer, (nn.Linear, nn.Embedding), skip=self.lm_head)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std)

    def new_cache(self) -> KVCache:
        """An empty key/value cache for :meth:`forward` (one entry per block)."""
        return KVCache(self.config.n_layer)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) of input_ids (B, T). With ``cache`` (:meth:`new_cache`), input_ids are the
        tokens after the ones already cached (positions continue from there) and join the cache:
        decoding then runs one token per step instead of the whole context."""
        past = 0 if cache is None else len(cache)
        seq_len = past + input_ids.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {seq_len} tokens exceeds max_seq_len={self.config.max_seq_len}: crop the input"
            )
        x = self.embed_tokens(input_ids)  # (B, T, d)
        cos, sin = rotary_cos_sin(self.config, input_ids.shape[1], x.device, x.dtype, start=past)  # (T, hd)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        return self.lm_head(self.norm(x))  # (B, T, V)

    def attention_parameters(self) -> list[nn.Parameter]:
        """Unique parameters of all attention projections; shared atoms (and a coefficient generator) once."""
        return attention_parameters(self.layers)

    def dense_attention_params(self) -> int:
        """Attention parameters of this shape with dense multi-head attention: L (2 d^2 + 2 d d_kv), d_kv = d."""
        d = self.config.d_model
        return self.config.n_layer * 4 * d * d


def attention_parameters(blocks: nn.ModuleList) -> list[nn.Parameter]:
    """Unique parameters of the blocks' attention projections; shared atoms (and a generator) once."""
    seen: dict[int, nn.Parameter] = {}
    for block in blocks:
        for proj in block.self_attn.projections():
            params = list(proj.parameters())
            dictionary = getattr(proj, "dictionary", None)  # SharedLinear: atoms live in the bank
            if dictionary is not None:
                params += list(dictionary.parameters())
            seen.update((id(p), p) for p in params)
    return list(seen.values())
