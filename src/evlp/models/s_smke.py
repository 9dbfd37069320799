"""S-SMKE student: two pretrained unimodal towers + token-type embeddings + one shared Transformer block.

    image (B,3,H,W) -> image tower -> (B, 1+N, Di) -+                                   +-> CLS -> x        (ITC, retrieval)
                                                   +-> proj -> + tte[modality] -> shared -+-> fc1 CLS -> x_interm (ITC)
    text (B,L)      -> text tower  -> (B, L, Dt)   -+                                   +-> head(fc_norm(CLS)) -> kd (KD)

The shared block runs on each modality separately (no cross-attention); text padding is masked in its attention.
``proj`` is a Linear only where a tower's width differs from the shared width (the real recipe, all 768, has none).
Token-type embeddings (0 = text, 1 = image) are scaled by one LayerScale vector (init 1e-5) and added to every token.
Retrieval and zero-shot use ``x``, the L2-normalised CLS of the shared block's output; ``x_interm`` is the CLS of its
MLP's first layer (pre-GELU, 4x wide); ``kd`` (not normalised) is what contrastive distillation matches to the
teacher. ``encode_image``/``encode_text`` follow open_clip's names so tools written for open_clip models work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from evlp.models.shared import SharedBlock

TEXT, IMAGE = 0, 1


def trunc_normal_init(module: nn.Module) -> None:
    """BEiT-3's init for new layers: Linear weights ~ N(0, 0.02) truncated at +-1 std, zero bias; LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-0.02, b=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _projection(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim)


class SSMKE(nn.Module):
    def __init__(
            self,
            image_tower: nn.Module,
            text_tower: nn.Module,
            embed_dim: int = 768,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            shared_layer_scale: float = 0.2,
            tte_layer_scale: float = 1e-5,
            dropout: float = 0.0,
            kd_dim: int | None = None,
            init_temperature: float = 0.07,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_proj = _projection(image_tower.width, embed_dim)
        self.text_proj = _projection(text_tower.width, embed_dim)
        self.token_type_embeddings = nn.Embedding(2, embed_dim)  # keeps PyTorch's N(0, 1) init, as the original
        self.tte_scale = nn.Parameter(torch.full((embed_dim,), tte_layer_scale))
        self.shared = SharedBlock(embed_dim, num_heads, mlp_ratio, shared_layer_scale, dropout)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, kd_dim or embed_dim)  # width of the teacher's target
        # Two learnable ITC temperatures in log space: [fc1 level, output level].
        self.logit_scales = nn.Parameter(torch.full((2,), math.log(1 / init_temperature)))
        for module in (self.image_proj, self.text_proj, self.shared, self.fc_norm, self.head):
            module.apply(trunc_normal_init)
        # The towers come last so that the init above never touches their (pretrained) weights.
        self.image_tower = image_tower
        self.text_tower = text_tower

    def _shared(self, tokens: torch.Tensor, modality: int, padding_mask: torch.Tensor | None) -> dict:
        tokens = tokens + self.tte_scale * self.token_type_embeddings.weight[modality]
        interm, out = self.shared(tokens, padding_mask)
        cls = out[:, 0]  # (B, D)
        return {
            "x": F.normalize(cls, dim=-1),
            "x_interm": F.normalize(interm[:, 0], dim=-1),  # (B, 4D)
            "kd": self.head(self.fc_norm(cls)),  # (B, D_teacher)
        }

    def forward_image(self, images: torch.Tensor) -> dict:
        tokens = self.image_proj(self.image_tower.forward_features(images))  # (B, 1+N, D)
        return self._shared(tokens, IMAGE, None)

    def forward_text(self, token_ids: torch.Tensor, padding_mask: torch.Tensor) -> dict:
        tokens = self.text_proj(self.text_tower.forward_features(token_ids, padding_mask))  # (B, L, D)
        return self._shared(tokens, TEXT, padding_mask)

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor, padding_mask: torch.Tensor) -> tuple[dict, dict]:
        return self.forward_image(images), self.forward_text(token_ids, padding_mask)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the towers' block activations in backward: much less activation memory for ~1/3 more compute.
        The single shared block keeps its activations (its fc1 output is a loss input anyway)."""
        self.image_tower.set_grad_checkpointing(enable)
        self.text_tower.set_grad_checkpointing(enable)

    @torch.no_grad()
    def clamp_logit_scales(self, max_logit_scale: float = 100.0) -> None:
        """Keep both ITC scales in [1, max] (the original clamps to ln 100, as FLAVA/VLMo)."""
        self.logit_scales.clamp_(0, math.log(max_logit_scale))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, D)`` L2-normalised embeddings."""
        return self.forward_image(images)["x"]

    def encode_text(self, token_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` token ids + ``(B, L)`` padding mask (True = pad) -> ``(B, D)`` L2-normalised embeddings."""
        return self.forward_text(token_ids, padding_mask)["x"]
