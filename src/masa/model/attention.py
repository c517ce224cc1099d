"""Causal self-attention with pluggable projections, rotary positions, and the layer-to-module maps.

One :class:`Attention` class serves every variant: the variant only decides which module computes
each of Q, K, V, O (``nn.Linear``, :class:`LowRankLinear`, or after MASA surgery a ``SharedLinear``)
and, for seq/cycle sharing, which blocks reuse which module (:func:`module_assignment`).
Rotary positions follow Hugging Face Llama exactly (rotate_half, non-interleaved) so export is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from masa.model.config import MasaLMConfig
from masa.nn import LowRankLinear


def projection(config: MasaLMConfig, in_features: int, out_features: int) -> nn.Module:
    """The module computing one attention projection for this variant (bias-free, as in Llama)."""
    if config.attention == "lowrank":
        return LowRankLinear(in_features, out_features, config.rank)
    return nn.Linear(in_features, out_features, bias=False)


def module_assignment(config: MasaLMConfig) -> list[int]:
    """Index of the unique attention module each block uses (seq-share: AABBCC, cycle-share: ABCABC).

    seq-share gives block l module floor(l * M / L): contiguous runs whose lengths differ by at most
    one when L is not divisible by M. Other variants: every block has its own module.
    """
    n_layer, n_unique = config.n_layer, config.n_unique
    if config.attention == "seq-share":
        return [layer * n_unique // n_layer for layer in range(n_layer)]
    if config.attention == "cycle-share":
        return [layer % n_unique for layer in range(n_layer)]
    return list(range(n_layer))


def rotary_cos_sin(
    config: MasaLMConfig, seq_len: int, device: torch.device, dtype: torch.dtype, start: int = 0
):
    """Rotary tables (T, head_dim) of positions ``start .. start + T - 1`` as Llama builds them
    (float32, then cast).

    Computed per call rather than held in a buffer, so a model built on ``meta`` and loaded with
    ``assign=True`` needs no buffer fix-up.
    """
    hd = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.int64).float() / hd)
    )
    positions = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by position: x cos + rotate_half(x) sin."""
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values (B, Hkv, T, hd) of the tokens seen so far, one pair per block (blocks that
    share an attention module still see different inputs, so the cache is per block, not per module)."""

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def __len__(self) -> int:
        """Tokens cached so far."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's (B, Hkv, T, hd) keys and values to block ``layer``'s; return all of them."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads; projections named as in Llama.

    Causal with rotary positions in the LM; ``causal=False`` and no rotary tables in the ViT encoder.
    """

    def __init__(self, config: MasaLMConfig, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        d, d_kv = config.d_model, config.kv_heads * config.head_dim
        self.q_proj = projection(config, d, d)
        self.k_proj = projection(config, d, d_kv)
        self.v_proj = projection(config, d, d_kv)
        self.o_proj = projection(config, d, d)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """Attend x (B, T, d); with ``cache``, x holds the T tokens after the ones cached for block
        ``layer`` (cos/sin at their positions), which it attends to as well, and its keys and values
        join the cache."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, past + T, hd)
            past = k.shape[2] - T
        if self.n_kv_head != self.n_head:  # each K/V head serves n_head / n_kv_head consecutive query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, H, T, hd)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        mask, causal = None, self.causal and T > 1
        if self.causal and past and T > 1:  # query i sees keys 0 .. past + i (bottom-right causal)
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def projections(self) -> list[nn.Module]:
        """The Q, K, V, O modules, in that order."""
        return [self.q_proj, self.k_proj, self.v_proj, self.o_proj]
