"""The one Transformer block shared by both modalities (randomly initialised, pre-LN, BEiT-style attention).

It runs on each modality separately (there is no cross-attention) and returns, besides its output tokens, the raw
``fc1`` activation of its MLP (before GELU): S-SMKE applies one contrastive loss to the CLS of each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with q and v biases only (the key bias is a constant zero, as in BEiT/VLMo)."""

    def __init__(self, dim: int, num_heads: int, fused: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        # keep: (B, 1, 1, T), True where a key may be attended to
        keep = None if padding_mask is None else ~padding_mask.bool()[:, None, None, :]
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        else:
            # Explicit path, logits and softmax in float32 as in the original (used to check the fused one).
            logits = (q.float() * self.head_dim ** -0.5) @ k.float().transpose(-2, -1)  # (B, H, T, T)
            if keep is not None:
                logits = logits.masked_fill(~keep, float("-inf"))
            out = logits.softmax(dim=-1).to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class SharedBlock(nn.Module):
    """Pre-LN Transformer block with LayerScale. ``forward -> (fc1 activation (B, T, 4D), output (B, T, D))``."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            layer_scale: float = 0.2,
            dropout: float = 0.0,
            fused_attn: bool = True,
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, fused=fused_attn)
        self.ls1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ls2 = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.ls1 * self.drop(self.attn(self.norm1(x), padding_mask))
        h = self.fc1(self.norm2(x))  # (B, T, 4D), pre-GELU: one of the two ITC levels
        x = x + self.ls2 * self.drop(self.fc2(self.drop(F.gelu(h))))
        return h, x
