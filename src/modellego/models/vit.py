"""A small vision transformer for the zoo: patch embedding, a class token and learnt
position embeddings, pre-norm blocks of :class:`~modellego.models.attention.HeadAttention`
and a GELU MLP, a final LayerNorm and a linear head on the class token."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelLegoError
from .attention import HeadAttention
from .registry import register_model

PATCH_SIZES = (4, 7, 8, 2)  # the first that divides the input size is used


class Block(nn.Module):
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = HeadAttention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, input_size: int, width: float,
                 depth: int = 6, heads: int = 4, head_dim: int = 16, mlp_ratio: int = 2
                 ) -> None:
        super().__init__()
        patch = next((p for p in PATCH_SIZES if input_size % p == 0), None)
        if patch is None:
            raise ModelLegoError(f"vit needs an input_size divisible by one of {PATCH_SIZES}, "
                                 f"got {input_size}")
        heads = max(2, int(round(heads * width)))  # (two at least: a head is a unit)
        dim = heads * head_dim
        tokens = (input_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, head_dim, mlp_ratio * dim)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register_model("vit", family="vit",
                description="ViT: 6 blocks of 4 heads x 16 (width scales the heads, 2 at "
                            "least), MLP 2x, "
                            "patches of 4 (or 7, 8, 2) pixels, class token")
def vit(**kwargs) -> nn.Module:
    return ViT(**kwargs)
