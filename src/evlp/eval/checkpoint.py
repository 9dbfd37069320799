"""Rebuild the S-SMKE student from an evlp training checkpoint, for evaluation.

    student, tokenizer, image_size = load_student("models/S-SMKE/model-89273-1.2345-train.ckpt", "cuda")

A checkpoint is a Lightning ``.ckpt`` written by ``PretrainModule`` (or a fine-tuning module with the same ``student.``
keys): ``state_dict`` with ``student.*`` and ``kd_loss.*`` (the memory bank) and ``hyper_parameters['cfg']``, the
run's resolved config. The student is built from that config alone: no upstream weight file is read and the teacher
is never built, so a checkpoint evaluates on a machine that has neither. Its weights then all come from the
checkpoint, loaded strictly.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from evlp.config import RunConfig, stored_config
from evlp.data.tokenizer import TextTokenizer, load_tokenizer
from evlp.errors import EvlpError
from evlp.models.build import build_student
from evlp.models.s_smke import SSMKE
from evlp.pretrained.towers import load_exact
from evlp.train.checkpoint import load_training_checkpoint

STUDENT_PREFIX = "student."
# Parts every S-SMKE student has: their absence means another kind of checkpoint.
REQUIRED_PARTS = ("student.image_tower.", "student.text_tower.", "student.shared.", "student.head.")
TEXT_EMBEDDINGS = "text_tower.bert.embeddings."
# The tensors whose shapes give the architecture of the built-in towers (see build_from_checkpoint); a timm or
# Hugging Face donor ('timm:<name>', 'hf') is built from its name (and config file) alone, as in training.
IMAGE_SHAPE_KEYS = ("image_tower.patch_embed.proj.weight", "image_tower.pos_embed")
TEXT_SHAPE_KEYS = (TEXT_EMBEDDINGS + "word_embeddings.weight", TEXT_EMBEDDINGS + "position_embeddings.weight")


def _shape_keys(cfg: DictConfig) -> tuple[str, ...]:
    return ((IMAGE_SHAPE_KEYS if cfg.model.image_tower.kind == "data2vec2" else ())
            + (TEXT_SHAPE_KEYS if cfg.model.text_tower.kind == "bert" else ()) + ("head.weight",))


@dataclass
class StudentCheckpoint:
    """An evlp checkpoint read and checked, before any model is built."""

    path: Path
    cfg: DictConfig  # the run's config (the training schema filled in for keys older runs did not have)
    state: dict[str, torch.Tensor]  # the student's weights, ``student.`` prefix removed
    step: int | None  # the optimizer step it was saved at
    ignored: list[str]  # prefixes of the other tensors, training state only (kd_loss.* = the KD memory bank)

    @property
    def kd_dim(self) -> int:
        """The teacher's width, which the student's distillation head maps to."""
        return self.state["head.weight"].shape[0]

    @property
    def max_text_len(self) -> int:
        return int(self.cfg.data.max_text_len)


def _describe_keys(keys) -> str:
    prefixes = sorted({k.split(".", 1)[0] for k in keys})
    return ", ".join(f"{p}.*" for p in prefixes[:6]) or "none"


def read_student_checkpoint(path: str | Path) -> StudentCheckpoint:
    """Read ``path`` (weights only, no code runs) and check it is an evlp S-SMKE checkpoint; EvlpError otherwise.

    This is cheap next to any evaluation, so commands call it before they touch the data.
    """
    path = Path(path)
    ckpt = load_training_checkpoint(path)
    expected = ("expected an evlp S-SMKE training checkpoint (a Lightning .ckpt written by `evlp train` or a "
                "retrieval fine-tuning run)")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise EvlpError(f"{path} is not a Lightning checkpoint (no state_dict); {expected}")
    keys = list(ckpt["state_dict"])
    missing = [p for p in REQUIRED_PARTS if not any(k.startswith(p) for k in keys)]
    if missing:
        raise EvlpError(f"{path} holds no S-SMKE student (no {', '.join(p + '*' for p in missing)} weights; its "
                        f"keys are {_describe_keys(keys)}): a GLUE or image-classification fine-tuning checkpoint holds one "
                        f"tower and a classifier, not the student; {expected}")
    raw_cfg = (ckpt.get("hyper_parameters") or {}).get("cfg")
    if not isinstance(raw_cfg, dict):
        raise EvlpError(f"{path} has no run config (hyper_parameters['cfg']) to rebuild the model from; {expected}")
    cfg = stored_config(raw_cfg, RunConfig, str(path))
    # Everything else (kd_loss.* = the KD memory bank, a fine-tuning run's loss state) is training state only.
    state = {k[len(STUDENT_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(STUDENT_PREFIX)}
    ignored = sorted({k.split(".", 1)[0] + ".*" for k in keys if not k.startswith(STUDENT_PREFIX)})
    incomplete = [STUDENT_PREFIX + k for k in _shape_keys(cfg) if k not in state]
    if incomplete:
        raise EvlpError(f"{path}: incomplete S-SMKE student, {', '.join(incomplete)} missing; {expected}")
    return StudentCheckpoint(path, cfg, state, ckpt.get("global_step"), ignored)


def _layer_count(state: dict, prefix: str) -> int:
    """Number of numbered sub-modules ``prefix<i>.`` in the state (the depth a tower was trained with)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _pretrained_text_heads(name_or_dir: str) -> int:
    """Attention heads of the pretrained BERT the run started from: its config file (no weights) is read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_dir).num_attention_heads
    except (OSError, ValueError) as e:
        raise EvlpError(f"cannot read the config of the run's text tower {name_or_dir} (its head count is needed to "
                        f"rebuild the model): {str(e).strip().splitlines()[0]}") from None


def _hf_tokenizer(ckpt: StudentCheckpoint):
    """The tokenizer the run trained with: the text tower's configured one, else the quickstart's vocabulary."""
    text = ckpt.cfg.model.text_tower
    source = text.tokenizer or text.path
    if source is not None:
        return load_tokenizer(source)
    vocab = Path(ckpt.cfg.data.quickstart.root) / "vocab"
    if vocab.is_dir():
        return load_tokenizer(vocab)
    # The quickstart vocabulary is generated by code, so a checkpoint moved to another machine still evaluates.
    from evlp.data.synthetic import write_vocab

    with tempfile.TemporaryDirectory() as tmp:
        return load_tokenizer(write_vocab(tmp))


def fit_bert_sizes(text: DictConfig, state: dict, hf_tokenizer, path) -> None:
    """Set a ``bert`` text tower config's positions, width and depth from its weights (``state`` keyed
    ``text_tower.*``), after checking that the tokenizer fits its vocabulary."""
    vocab_rows, _ = state[TEXT_EMBEDDINGS + "word_embeddings.weight"].shape
    if len(hf_tokenizer) != vocab_rows:
        raise EvlpError(f"{path}: the tokenizer {hf_tokenizer.name_or_path} has {len(hf_tokenizer):,} tokens but the "
                        f"checkpoint's text tower has {vocab_rows:,} embedding rows; set the run's "
                        f"model.text_tower.tokenizer to the one it was trained with")
    text.max_positions, text.width = state[TEXT_EMBEDDINGS + "position_embeddings.weight"].shape
    text.depth = _layer_count(state, "text_tower.bert.encoder.layer.")


def build_from_checkpoint(ckpt: StudentCheckpoint, device: torch.device | str = "cpu"):
    """``(student in eval mode on device, TextTokenizer, image_size)`` from a checkpoint read with
    :func:`read_student_checkpoint`."""
    hf_tokenizer = _hf_tokenizer(ckpt)
    state = ckpt.state
    # The config describes the run, but a built-in tower loaded from a pretrained file took its shape from the file
    # (a width other than the config's, "all the file's layers", the file's position table): every size is therefore
    # read off the weights themselves, and a pretrained text tower's head count from its own config file.
    model_cfg = OmegaConf.create(OmegaConf.to_container(ckpt.cfg.model))
    image, text = model_cfg.image_tower, model_cfg.text_tower
    if image.kind == "data2vec2":
        width, _, patch, _ = state["image_tower.patch_embed.proj.weight"].shape
        grid = math.isqrt(state["image_tower.pos_embed"].shape[1])
        image.width, image.patch_size, image.img_size = width, patch, grid * patch
        image.depth = _layer_count(state, "image_tower.blocks.")
    if text.kind == "bert":
        fit_bert_sizes(text, state, hf_tokenizer, ckpt.path)
        if text.path is not None:
            text.num_heads = _pretrained_text_heads(text.path)
    student: SSMKE = build_student(model_cfg, kd_dim=ckpt.kd_dim, tokenizer=hf_tokenizer, load_weights=False)
    load_exact(student, state, f"{ckpt.path} (the model its config describes)")
    student.to(device).eval()
    tokenizer = TextTokenizer(hf_tokenizer, max_len=ckpt.max_text_len)
    return student, tokenizer, int(image.img_size)


def load_student(path: str | Path, device: torch.device | str = "cpu"):
    """``(student, text_tokenizer, image_size)``: the S-SMKE student of an evlp checkpoint, in eval mode on
    ``device``, the ``TextTokenizer`` it was trained with (its ``max_text_len``), and the image side it takes."""
    return build_from_checkpoint(read_student_checkpoint(path), device)
