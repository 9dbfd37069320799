"""``evlp info``: the donor, architecture, parameter count and FLOPs of each part, built from the config without any
weights."""

from __future__ import annotations

import json

import torch
from omegaconf import DictConfig
from torch import nn

from evlp.flops import G, pair_flops
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


def donor(part_cfg: DictConfig) -> str:
    """Which donor fills a part and where its weights come from, e.g. ``timm:mobilenetv2_100 from models/mnv2.pth``."""
    if part_cfg.path is not None:
        source = f"from {part_cfg.path}"
    elif part_cfg.get("pretrained_hub"):
        source = "timm's pretrained weights"
    else:
        source = "random init"
    return f"{part_cfg.kind}, {source}"


def describe(cfg: DictConfig, tokenizer=None) -> dict:
    """Donor, parameter count and forward FLOPs per image-text pair of the student's parts and of the (frozen,
    never saved) teacher.

    Built on the meta device: shapes only, no memory, no initialisation work and no weights read (a Hugging Face
    text donor's config.json is read for its architecture).
    """
    with torch.device("meta"):
        teacher = build_teacher(cfg.model.teacher, load_weights=False)
        student = build_student(cfg.model, kd_dim=teacher.width, tokenizer=tokenizer, load_weights=False)
    flops = pair_flops(student, teacher, cfg.data.max_text_len)
    m = cfg.model
    parts = {
        "image_tower": (student.image_tower, donor(m.image_tower), student.image_tower.describe()),
        "text_tower": (student.text_tower, donor(m.text_tower), student.text_tower.describe()),
        "projections": (nn.ModuleList([student.image_proj, student.text_proj]), "new",
                        "Linear tower->shared width where they differ"),
        "token_type": (None, "new", "2 token-type embeddings x LayerScale"),
        "shared_block": (student.shared, "new", f"1 pre-LN block, width {m.embed_dim}, {m.num_heads} heads, "
                         f"MLP {int(m.embed_dim * m.mlp_ratio)}, LayerScale {m.shared_layer_scale}"),
        "kd_head": (nn.ModuleList([student.fc_norm, student.head]), "new",
                    f"LayerNorm + Linear -> teacher width {teacher.width}"),
    }
    out: dict = {"config": cfg.run_name, "student": {}}
    for name, (module, source, text) in parts.items():
        n = count(module)
        if name == "token_type":
            n = student.token_type_embeddings.weight.numel() + student.tte_scale.numel()
        out["student"][name] = {"params": n, "gflops": flops.student.get(name, 0.0) / G, "donor": source,
                                "description": text}
    out["student"]["logit_scales"] = {"params": student.logit_scales.numel(), "gflops": 0.0, "donor": "new",
                                      "description": "2 learnable ITC scales"}
    out["student"]["total"] = count(student)
    out["student"]["trainable"] = count(student, trainable_only=True)
    out["student"]["gflops"] = flops.student_forward / G
    out["teacher"] = {"params": count(teacher), "gflops": flops.teacher / G, "donor": donor(m.teacher),
                      "description": f"{teacher.describe()}, never saved in checkpoints"}
    out["gflops_per_pair"] = {"student_forward": flops.student_forward / G, "student_train": flops.student_train / G,
                              "teacher": flops.teacher / G, "total": flops.total / G,
                              "text_len": cfg.data.max_text_len}
    return out


def format_info(info: dict) -> str:
    lines = [f"config: {info['config']}", "",
             f"{'part':<14} {'parameters':>13} {'GFLOPs':>9}  donor / description"]
    for name, part in info["student"].items():
        if isinstance(part, dict):
            lines.append(f"{name:<14} {part['params']:>13,} {part['gflops']:>9.3f}  {part['donor']}: "
                         f"{part['description']}")
    s, t, g = info["student"], info["teacher"], info["gflops_per_pair"]
    lines += [
        f"{'student':<14} {s['total']:>13,} {s['gflops']:>9.3f}  total ({s['trainable']:,} trainable)",
        f"{'teacher':<14} {t['params']:>13,} {t['gflops']:>9.3f}  {t['donor']}: {t['description']}",
        "",
        f"GFLOPs are forward, per image-text pair ({g['text_len']} text tokens); a training pair costs "
        f"{g['total']:.3f} (student forward + backward = 3 x {g['student_forward']:.3f}, teacher forward).",
    ]
    return "\n".join(lines)


def info_json(info: dict) -> str:
    return json.dumps(info, indent=2)
