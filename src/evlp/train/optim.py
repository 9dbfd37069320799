"""AdamW parameter groups (with layer-wise lr decay for fine-tuning), the linear lr scaling rule and the warm-up +
cosine / warm-up + linear schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms, LayerScales, logit scales (all <= 1-D), CLS tokens, positions and embedding tables.

    The original matched fairseq names that no longer existed after its timm port, so it decayed the image CLS
    token and positions by accident; the thesis notes that not decaying CLS and text embeddings helped.
    """
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or "cls_token" in name
        or "pos_embed" in name
        or "embeddings" in name
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen (e.g. the fixed sin-cos positions)
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_of, num_layers: int, decay: float) -> list[dict]:
    """Layer-wise lr decay (BEiT's rule): layer ``l`` of ``0 .. num_layers + 1`` trains at ``decay ** (num_layers + 1
    - l)`` times the peak lr; ``layer_of(name)`` gives a parameter's layer (0 = embeddings, ``num_layers + 1`` = the
    head). One group per (layer, decay or not), each with its ``lr_scale``, which ``LambdaLR`` keeps through the
    schedule because it scales each group's initial lr.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_of(name)
        if not 0 <= layer <= num_layers + 1:
            raise ValueError(f"layer_of({name!r}) = {layer}, outside 0..{num_layers + 1}")
        skip_decay = no_weight_decay(name, param)
        group = groups.setdefault((layer, skip_decay), {
            "params": [], "weight_decay": 0.0 if skip_decay else weight_decay,
            "lr_scale": decay ** (num_layers + 1 - layer),
            "name": f"layer_{layer}_{'no_decay' if skip_decay else 'decay'}",
        })
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: ``base_lr`` is the rate for a global batch of 256 pairs."""
    return base_lr * global_batch / 256


def warmup_cosine(total_steps: int, warmup_fraction: float):
    """Multiplier for LambdaLR: linear warm-up from 0, then cosine to 0 at ``total_steps`` and 0 after (the HF
    schedule the original used rises again past its end)."""
    warmup = int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_linear(total_steps: int, warmup_fraction: float):
    """Multiplier for LambdaLR: linear warm-up from 0, then linear decay to 0 at ``total_steps`` (the polynomial
    decay of power 1 the GLUE recipe uses)."""
    warmup = int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


SCHEDULES = {"cosine": warmup_cosine, "linear": warmup_linear}


def build_optimizer(model: nn.Module, lr: float, betas, eps: float, weight_decay: float, fused: bool | None):
    if fused is None:
        fused = torch.cuda.is_available() and next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=fused)
