"""BEiTv2 teacher: a frozen timm ``Beit`` whose target is the CLS token of the last block without the final norm.

BEiTv2's ImageNet-1k pretraining checkpoint (``beitv2_base_patch16_224_pt1k.pth``) uses one relative position bias
shared by all blocks, no absolute positions, q/v biases and LayerScale (``gamma_1/gamma_2``): timm's ``Beit`` with
``use_shared_rel_pos_bias=True, use_abs_pos_emb=False``. The final LayerNorm is kept as ``.norm`` (so a checkpoint's
``norm.*`` has a home) but ``forward_features`` stops before it, as the S-SMKE recipe distils the raw last block.
"""

from __future__ import annotations

import torch
from timm.models.beit import Beit


class BEiTv2Teacher(Beit):
    """Frozen BEiTv2 ViT. ``forward(images) -> (B, D)`` CLS targets; it is always in eval mode and never trains."""

    def __init__(
            self,
            img_size: int = 224,
            patch_size: int = 16,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            init_values: float = 0.1,
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
            init_values=init_values,
            use_abs_pos_emb=False,
            use_rel_pos_bias=False,
            use_shared_rel_pos_bias=True,
            use_fc_norm=False,
        )
        self.freeze()

    @property
    def width(self) -> int:
        return self.embed_dim

    def freeze(self) -> "BEiTv2Teacher":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "BEiTv2Teacher":
        # A teacher never leaves eval mode: Lightning and user code call .train() on the parent module, which would
        # otherwise switch on any dropout or drop-path the teacher was built with.
        return super().train(False)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, 1 + N, D)`` tokens after the last block, without the final norm."""
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        rel_pos_bias = self.rel_pos_bias()
        for block in self.blocks:
            x = block(x, shared_rel_pos_bias=rel_pos_bias)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)[:, 0]

    def describe(self) -> str:
        return f"BEiTv2 ViT, width {self.width}, {len(self.blocks)} blocks, target: CLS of the last block, frozen"
