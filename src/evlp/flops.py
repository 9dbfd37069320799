"""Analytic FLOPs of one S-SMKE training pair, and the dense bf16 peak of the GPU it runs on.

Convention (anchors.md §3.1, as open_clip's ``model_profile.csv`` and nanoGPT's ``estimate_mfu``): matmuls only,
forward = 2 x MACs, backward = 2 x forward. A Transformer block over N tokens of width d costs

    2·N·(MACs per token of every Linear in the block)  +  4·N²·d   (attention scores and weighted sum)

which is 24·N·d² + 4·N²·d for the usual QKV + output projection + 4x MLP. Norms, softmax, GELU, embedding lookups and
the loss logits are left out (the KD logits against the 65,536-row memory bank are ~0.5% of the step at the real
recipe). Counts are read from the built modules, so they follow whatever depth and width a config asks for.

    f = flops_per_pair(load_config("training/s_smke"))
    f.gflops()   # {"image_tower": 17.68, ..., "student_forward": 27.02, "teacher": 35.13, "total": 116.2}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

G = 1e9


def linear_macs_per_token(module: nn.Module) -> int:
    """MACs one token costs in every Linear inside ``module`` (nn.MultiheadAttention's fused input projection is a
    bare parameter, not a Linear, so it is counted here too)."""
    macs = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            macs += m.in_features * m.out_features
        elif isinstance(m, nn.MultiheadAttention):
            macs += m.embed_dim * (m.embed_dim + m.kdim + m.vdim)
    return macs


def block_flops(block: nn.Module, tokens: int, width: int) -> float:
    """Forward FLOPs of one Transformer block over ``tokens`` tokens of width ``width``."""
    return 2 * tokens * linear_macs_per_token(block) + 4 * tokens ** 2 * width


def blocks_flops(blocks, tokens: int, width: int) -> float:
    return sum(block_flops(b, tokens, width) for b in blocks)


def patch_embed_flops(conv: nn.Conv2d, num_patches: int) -> float:
    """A stride-p convolution is one (C·p·p) x D matmul per patch; its weight has exactly D·C·p·p entries."""
    return 2 * num_patches * conv.weight.numel()


def cls_linear_flops(module: nn.Module) -> float:
    """A Linear (or Identity) applied to one vector per sample, e.g. a head on the CLS token."""
    return 2 * module.in_features * module.out_features if isinstance(module, nn.Linear) else 0.0


def tokens_linear_flops(module: nn.Module, tokens: int) -> float:
    return tokens * cls_linear_flops(module)


def vit_flops(vit: nn.Module) -> float:
    """A timm ViT or Beit: patch embedding + every block, over CLS + patches."""
    patches = vit.patch_embed.num_patches
    tokens = patches + vit.num_prefix_tokens
    return patch_embed_flops(vit.patch_embed.proj, patches) + blocks_flops(vit.blocks, tokens, vit.embed_dim)


def image_model_flops(model: nn.Module) -> float:
    """An image tower or teacher: the built-in ViTs analytically; a timm donor of any family (a CNN's convolutions
    depend on every stage's resolution) as measured by its dry forward when it was built, by the same convention."""
    measured = getattr(model, "forward_flops", None)
    return measured if measured is not None else vit_flops(model)


@dataclass
class PairFlops:
    """Forward FLOPs per image-text pair, per part of the student, and of the teacher (forward only)."""

    student: dict[str, float] = field(default_factory=dict)
    teacher: float = 0.0

    @property
    def student_forward(self) -> float:
        return sum(self.student.values())

    @property
    def student_train(self) -> float:
        return 3 * self.student_forward  # backward computes grads w.r.t. inputs and weights: 2 x forward

    @property
    def total(self) -> float:
        """Model FLOPs of one training pair: student forward + backward, teacher forward. Activation recompute
        (gradient checkpointing) is not counted, as MFU conventionally does not."""
        return self.student_train + self.teacher

    def gflops(self) -> dict[str, float]:
        parts = {name: v / G for name, v in self.student.items()}
        return {**parts, "student_forward": self.student_forward / G, "student_train": self.student_train / G,
                "teacher": self.teacher / G, "total": self.total / G}


def pair_flops(student: nn.Module, teacher: nn.Module, text_len: int) -> PairFlops:
    """Count an ``SSMKE`` student and its teacher, any donors, built at any size, on any device including meta."""
    image, text = student.image_tower, student.text_tower
    image_tokens = image.num_image_tokens
    return PairFlops(
        student={
            "image_tower": image_model_flops(image),
            "text_tower": blocks_flops(text.layers, text_len, text.width),
            "projections": tokens_linear_flops(student.image_proj, image_tokens)
                           + tokens_linear_flops(student.text_proj, text_len),
            "shared_block": block_flops(student.shared, image_tokens, student.embed_dim)
                            + block_flops(student.shared, text_len, student.embed_dim),
            "kd_head": 2 * cls_linear_flops(student.head),  # on the image CLS and on the text CLS
        },
        teacher=image_model_flops(teacher),
    )


def flops_per_pair(cfg: DictConfig) -> PairFlops:
    """Build the config's student and teacher on the meta device (shapes only, instant) and count them."""
    from evlp.models.build import build_student, build_teacher

    with torch.device("meta"):
        teacher = build_teacher(cfg.model.teacher, load_weights=False)
        student = build_student(cfg.model, kd_dim=teacher.width, load_weights=False)
    return pair_flops(student, teacher, cfg.data.max_text_len)


# Dense bf16 tensor-core peaks (FLOP/s, no sparsity). Matched in order, as whole words, on
# torch.cuda.get_device_name(), so the more specific name comes first ("H100 PCIe" before "H100") and "L4" does not
# match an L40S. Unknown cards get no MFU rather than a guessed one.
PEAK_BF16_FLOPS = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("RTX 4090", 165.2e12),
    ("L4", 121e12),
)


def peak_flops_for(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_FLOPS:
        if re.search(rf"\b{re.escape(key)}\b", device_name):
            return peak
    return None


def peak_flops(accelerator: str = "auto") -> float | None:
    """The current CUDA device's dense bf16 peak, or None on CPU, on an unknown card, or when training is pinned to
    the CPU (``trainer.accelerator=cpu``)."""
    if accelerator == "cpu" or not torch.cuda.is_available():
        return None
    return peak_flops_for(torch.cuda.get_device_name())
