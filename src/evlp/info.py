"""``evlp info``: the architecture and parameter count of each part, built from the config without any weights."""

from __future__ import annotations

import json

import torch
from omegaconf import DictConfig
from torch import nn

from evlp.models.build import build_student, build_teacher


def count(module: nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def data_tokenizer(cfg):
    """The quickstart's own vocabulary sets its text tower's size; other configs name their tokenizer's model."""
    if cfg.model.text_tower.path is None and "quickstart" in list(cfg.data.train):
        import tempfile

        from evlp.data.synthetic import write_vocab
        from evlp.data.tokenizer import load_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            return load_tokenizer(write_vocab(tmp))
    return None


def describe(cfg: DictConfig, tokenizer=None) -> dict:
    """Parameter counts of the student's parts and of the (frozen, never saved) teacher.

    Built on the meta device: shapes only, no memory and no initialisation work.
    """
    with torch.device("meta"):
        teacher = build_teacher(cfg.model.teacher, load_weights=False)
        student = build_student(cfg.model, kd_dim=teacher.width, tokenizer=tokenizer, load_weights=False)
    m = cfg.model
    parts = {
        "image_tower": (student.image_tower, f"{m.image_tower.kind}: ViT width {student.image_tower.width}, "
                        f"{len(student.image_tower.blocks)} post-LN blocks, patch {m.image_tower.patch_size}, "
                        f"{m.image_tower.img_size}px (sin-cos positions are fixed)"),
        "text_tower": (student.text_tower, f"{m.text_tower.kind}: width {student.text_tower.width}, "
                       f"{student.text_tower.depth} layers, vocabulary {student.text_tower.bert.config.vocab_size}"),
        "projections": (nn.ModuleList([student.image_proj, student.text_proj]),
                        "Linear tower->shared width where they differ"),
        "token_type": (None, "2 token-type embeddings x LayerScale"),
        "shared_block": (student.shared, f"1 pre-LN block, width {m.embed_dim}, {m.num_heads} heads, "
                         f"MLP {int(m.embed_dim * m.mlp_ratio)}, LayerScale {m.shared_layer_scale}"),
        "kd_head": (nn.ModuleList([student.fc_norm, student.head]), f"LayerNorm + Linear -> teacher width {teacher.width}"),
    }
    out: dict = {"config": cfg.run_name, "student": {}}
    for name, (module, text) in parts.items():
        n = count(module)
        if name == "token_type":
            n = student.token_type_embeddings.weight.numel() + student.tte_scale.numel()
        out["student"][name] = {"params": n, "description": text}
    out["student"]["logit_scales"] = {"params": student.logit_scales.numel(), "description": "2 learnable ITC scales"}
    out["student"]["total"] = count(student)
    out["student"]["trainable"] = count(student, trainable_only=True)
    out["teacher"] = {"params": count(teacher), "description": f"{m.teacher.kind}: ViT width {teacher.width}, "
                      f"{len(teacher.blocks)} blocks, frozen, never saved in checkpoints"}
    return out


def format_info(info: dict) -> str:
    lines = [f"config: {info['config']}", "", f"{'part':<14} {'parameters':>13}  description"]
    for name, part in info["student"].items():
        if isinstance(part, dict):
            lines.append(f"{name:<14} {part['params']:>13,}  {part['description']}")
    s = info["student"]
    lines += [
        f"{'student':<14} {s['total']:>13,}  total ({s['trainable']:,} trainable; the difference is the fixed "
        "positions)",
        f"{'teacher':<14} {info['teacher']['params']:>13,}  {info['teacher']['description']}",
    ]
    return "\n".join(lines)


def info_json(info: dict) -> str:
    return json.dumps(info, indent=2)
