"""The pretrained starting point of a fine-tuning run: exactly the parts of an S-SMKE checkpoint a task needs.

    parts = load_pretrained("models/S-SMKE/model-89273-1.2345-train.ckpt", keep="image")
    parts.student.image_tower        # the tower the task fine-tunes
    print(parts.summary)             # the one line that says what was loaded and what was dropped

A pretraining checkpoint is read with ``weights_only=True`` and checked (``evlp.eval.checkpoint``); the student is
rebuilt from the run's own config and loaded strictly, so every tensor of the checkpoint is either in the model or
named in the summary as dropped (the KD memory bank, the tower the task does not use, the shared block and heads).
The teacher is never saved in a checkpoint and never built here. Vision tasks also start from an upstream Data2Vec2
file (``model.model_path=models/base_imagenet.pt``), which holds the image tower only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from evlp.errors import EvlpError
from evlp.eval.checkpoint import build_from_checkpoint, read_student_checkpoint

log = logging.getLogger("evlp")

# What each task family keeps of the student; the rest is dropped and named in the summary.
KEPT_PARTS = {
    "image": ("image_tower",),
    "text": ("text_tower",),
    "student": None,  # everything: retrieval fine-tunes the whole student
}


@dataclass
class PretrainedParts:
    student: nn.Module | None  # the S-SMKE student (None when the source was an upstream image-tower file)
    image_tower: nn.Module | None
    tokenizer: object | None  # evlp TextTokenizer the run trained with
    image_size: int | None
    run_cfg: DictConfig | None  # the pretraining run's resolved config
    summary: str


def _millions(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters"


def load_pretrained(path: str | Path | None, keep: str) -> PretrainedParts:
    """Read ``path`` and keep ``keep`` (``image``, ``text`` or ``student``); ``EvlpError`` before any training when
    the file is missing, of another kind, or lacks the part."""
    if keep not in KEPT_PARTS:
        raise ValueError(keep)
    if path is None:
        raise EvlpError("model.model_path is not set; pass the pretrained checkpoint to fine-tune, e.g. "
                        "model.model_path=models/S-SMKE/model-89273-1.2345-train.ckpt")
    path = Path(path)
    if not path.exists():
        raise EvlpError(f"model.model_path={path}: no such file; pass an evlp pretraining checkpoint (.ckpt)")
    if keep == "image" and path.suffix != ".ckpt":
        return _upstream_image_tower(path)
    ckpt = read_student_checkpoint(path)
    student, tokenizer, image_size = build_from_checkpoint(ckpt)
    student.train()
    kept = KEPT_PARTS[keep]
    step = f" (step {ckpt.step})" if ckpt.step is not None else ""
    if kept is None:
        dropped = ""
        loaded = f"the whole S-SMKE student, {_millions(student)}"
    else:
        loaded = ", ".join(f"{name} ({_millions(getattr(student, name))})" for name in kept)
        others = [name for name, _ in student.named_children() if name not in kept]
        dropped = f"; dropped {', '.join(others)}"
    ignored = f"; ignored training state {', '.join(ckpt.ignored)}" if ckpt.ignored else ""
    summary = (f"loaded {loaded} from {path}{step}{dropped}{ignored}; the teacher is not part of checkpoints")
    return PretrainedParts(student, student.image_tower, tokenizer, image_size, ckpt.cfg, summary)


def _upstream_image_tower(path: Path) -> PretrainedParts:
    from evlp.pretrained import detect_format, load_data2vec2_image

    kind = detect_format(path)
    if kind not in ("data2vec2-fairseq", "evlp-safetensors"):
        raise EvlpError(f"model.model_path={path} is a {kind} file; a vision task starts from an evlp pretraining "
                        f"checkpoint (.ckpt) or a Data2Vec2 image file (base_imagenet.pt)")
    tower = load_data2vec2_image(path)
    summary = f"loaded the Data2Vec2 image tower ({len(tower.blocks)} blocks, {_millions(tower)}) from {path}"
    return PretrainedParts(None, tower, None, tower.patch_embed.img_size[0], None, summary)
