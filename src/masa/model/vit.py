"""A native Vision Transformer with every attention variant of the language model.

Patch embedding (a strided convolution), a class token or mean pooling, learned positions, and the
LM's pre-norm blocks run as an encoder (non-causal attention, no rotary positions). Seq/cycle sharing
and MASA work exactly as in :class:`masa.model.MasaLM`: unique attention modules owned once by
``shared_attn``; MASA by the sharing surgery on the blocks' Q/K/V(/O) projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from masa.model.attention import Attention, module_assignment
from masa.model.config import AttentionShape, check_attention_variant
from masa.model.lm import Block, RMSNorm, attention_parameters, init_normal

POOLS = ("cls", "mean")
_SHARED_MODULE_VARIANTS = ("seq-share", "cycle-share")
_MASA_TARGETS = {"masa-qkv": ("q", "k", "v"), "masa-qkvo": ("q", "k", "v", "o")}


@dataclass
class MasaViTConfig(AttentionShape):
    """Shape of a ViT classifier and its attention variant (knobs as in :class:`MasaLMConfig`).

    Defaults suit the bundled 8 x 8 digits: 2 x 2 patches (16 tokens), 6 blocks, d = 64.
    """

    model_type: ClassVar[str] = "masa_vit"

    image_size: int = 8  # square images of image_size x image_size pixels
    patch_size: int = 2
    channels: int = 1
    n_classes: int = 10
    n_layer: int = 6
    n_head: int = 4
    n_kv_head: int | None = None
    d_model: int = 64
    d_ff: int | None = None
    pool: str = "cls"  # "cls": classify the class token; "mean": the mean of the patch tokens
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention: str = "dense"
    gqa_groups: int | None = None
    rank: int | None = None
    n_unique: int | None = None
    n_atoms: int | None = None
    coef_generator: bool = False

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "n_classes", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} does not divide image_size={self.image_size}: pick a patch "
                f"size among {[p for p in range(1, self.image_size + 1) if self.image_size % p == 0]}"
            )
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} is unknown: use one of {', '.join(POOLS)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}: change one")
        check_attention_variant(self)
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class MasaViT(nn.Module):
    """``forward(images (B, C, H, W)) -> logits (B, n_classes)``."""

    def __init__(self, config: MasaViTConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.patch_embed = nn.Conv2d(config.channels, d, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if config.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.n_patches + (config.pool == "cls"), d))
        if config.attention in _SHARED_MODULE_VARIANTS:
            self.shared_attn = nn.ModuleList(Attention(config, causal=False) for _ in range(config.n_unique))
            self.layers = nn.ModuleList(
                Block(config, self.shared_attn[i], causal=False) for i in module_assignment(config)
            )
        else:
            self.layers = nn.ModuleList(Block(config, causal=False) for _ in range(config.n_layer))
        self.norm = RMSNorm(d, config.norm_eps)
        self.head = nn.Linear(d, config.n_classes)
        self._init_weights()
        if config.attention in _MASA_TARGETS:
            from masa.sharing import share  # deferred, as in MasaLM

            share(
                self,
                targets=tuple(f"self_attn.{role}_proj" for role in _MASA_TARGETS[config.attention]),
                atoms=config.n_atoms,
                init="random",
                generator=config.coef_generator,
                record=False,
                blocks="layers",
            )

    def _init_weights(self) -> None:
        """N(0, init_std); residual outputs (o_proj, down_proj) scaled by 1/sqrt(2 L); zero classifier."""
        std = self.config.init_std
        init_normal(self, std, self.config.n_layer, (nn.Linear, nn.Conv2d), zero_bias=True)
        nn.init.normal_(self.pos_embed, 0.0, std)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, 0.0, std)
        nn.init.zeros_(self.head.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c, size = self.config.channels, self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, size, size):
            raise ValueError(
                f"images of shape {tuple(images.shape)}: this ViT takes (batch, {c}, {size}, {size}); "
                "resize the images or build the model with their size and channels"
            )
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, d)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, d)
        x = x + self.pos_embed
        for block in self.layers:
            x = block(x, None, None)
        x = self.norm(x)
        pooled = x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, d)
        return self.head(pooled)  # (B, n_classes)

    def attention_parameters(self) -> list[nn.Parameter]:
        """Unique parameters of all attention projections; shared atoms (and a coefficient generator) once."""
        return attention_parameters(self.layers)

    def dense_attention_params(self) -> int:
        """Attention parameters of this shape with dense multi-head attention: L (4 d^2 + biases none)."""
        d = self.config.d_model
        return self.config.n_layer * 4 * d * d
