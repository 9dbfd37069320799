"""Data2Vec2-style image tower (the student's image encoder).

Data2Vec 2.0's image encoder is a ViT whose computation differs from a stock timm ViT in four places, all of
which the pretrained weights depend on:

* the 16x16 patch convolution has a bias (timm drops it when ``pre_norm=True``);
* fixed 2-D sin-cos positions are added to the patches only; the CLS token is prepended *after* and has none;
* a LayerNorm (fairseq's ``context_encoder.norm``, timm's ``norm_pre``) runs before the blocks;
* the blocks are post-LN: ``x = LN1(x + attn(x)); x = LN2(x + mlp(x))``, and there is no final norm.

We build it on timm's ``VisionTransformer`` (patch embedding, attention with SDPA, MLP) and only swap the block
and the patch embedding. ``forward_features`` returns all tokens ``(B, 1 + N, D)`` after the last kept block.
"""

from __future__ import annotations

import torch
from torch import nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer


class PostNormBlock(Block):
    """timm ``Block`` with Data2Vec2's post-LN order (no LayerScale)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.drop_path1(self.attn(x, attn_mask=attn_mask)))
        return self.norm2(x + self.drop_path2(self.mlp(x)))


def sincos_2d_positions(grid_size: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, shape ``(grid_size**2, dim)``.

    Channels ``[0, dim/2)`` encode the column, ``[dim/2, dim)`` the row (MAE calls the first half "emb_h", but it is
    computed from the column index). Computed in float64 and then cast, as upstream does with numpy.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # patch p = row * grid + col
    cols = cols.reshape(-1, 1) * omega
    rows = rows.reshape(-1, 1) * omega
    table = torch.cat([cols.sin(), cols.cos(), rows.sin(), rows.cos()], dim=1)
    return table.float()


class Data2Vec2ImageTower(VisionTransformer):
    """The first ``depth`` blocks of a Data2Vec2 image encoder, as a timm ``VisionTransformer``."""

    def __init__(
            self,
            img_size: int = 224,
            patch_size: int = 16,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            class_token=True,
            no_embed_class=True,
            pre_norm=True,
            final_norm=False,
            fc_norm=False,
            drop_path_rate=drop_path_rate,
            block_fn=PostNormBlock,
        )
        # Data2Vec2's patch projection has a bias; timm leaves it out whenever pre_norm=True.
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim, bias=True)
        grid = img_size // patch_size
        # Fixed positions: kept as a parameter (so checkpoints and parameter counts match the upstream layout), but
        # never trained and never weight-decayed.
        self.pos_embed = nn.Parameter(sincos_2d_positions(grid, embed_dim).unsqueeze(0), requires_grad=False)
        self.norm = nn.Identity()
        nn.init.normal_(self.cls_token, std=0.02)

    @property
    def width(self) -> int:
        return self.embed_dim

    @property
    def num_image_tokens(self) -> int:
        return self.patch_embed.num_patches + 1

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` ImageNet-normalised images -> ``(B, 1 + N, D)`` tokens, CLS first, no final norm."""
        x = self.patch_embed(images)
        x = self._pos_embed(x)  # adds positions to patches, then prepends CLS (no_embed_class=True)
        x = self.norm_pre(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            from timm.models._manipulate import checkpoint_seq
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)

    def describe(self) -> str:
        return (f"Data2Vec2 ViT, width {self.width}, {len(self.blocks)} post-LN blocks, patch "
                f"{self.patch_embed.patch_size[0]}, {self.patch_embed.img_size[0]}px (sin-cos positions are fixed)")
