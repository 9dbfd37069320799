"""Use a trained model in your own code: load it, embed images and text, classify zero-shot.

    import evlp

    model, preprocess, tokenizer = evlp.load("runs/quickstart/models/quickstart/model-375-1.2345-train.ckpt")
    images = torch.stack([preprocess(Image.open("dog.jpg"))])        # (1, 3, S, S)
    token_ids, padding_mask = tokenizer(["a dog on a beach"])       # (1, L) long, (1, L) bool (True = padding)
    similarity = model.encode_image(images) @ model.encode_text(token_ids, padding_mask).T   # cosines
    evlp.classify(model, preprocess, tokenizer, ["dog.jpg"], ["dog", "cat"])               # [("dog", 0.93)]

``evlp.load`` takes a pretraining checkpoint (``model-{step}-{loss}-train.ckpt``) or a folder written by
``evlp export``. A checkpoint is rebuilt by ``evlp.eval.checkpoint`` (``torch.load(weights_only=True)``, sizes read
off the weights, no upstream weight file needed). An export is read from safetensors and JSON only, nothing is
unpickled: its ``config.json`` holds the run's ``model`` section with every tower size as the weights have it, which
the training code's own ``build_student`` turns back into the same student.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from evlp.data.tokenizer import TextTokenizer, load_tokenizer
from evlp.data.transforms import eval_transform
from evlp.errors import EvlpError
from evlp.eval.embed import inference, resolve_device
from evlp.eval.zero_shot import zero_shot_classifier
from evlp.models.s_smke import SSMKE

EXPORT_FORMAT = "evlp-s-smke"
EXPORT_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass
class LoadedModel:
    """A student ready for inference and everything needed to use, export or identify it."""

    model: SSMKE  # eval mode, on the requested device
    tokenizer: TextTokenizer
    image_size: int  # the eval transform's square side
    model_config: dict  # the run's `model` section, tower sizes as the weights have them (see `_sized_config`)
    kd_dim: int  # width of the distillation head (the teacher's width)
    source: Path  # the checkpoint file or the export folder
    kind: str  # "checkpoint" or "export"
    run_config: dict | None = None  # the full run config (checkpoints only)
    step: int | None = None  # the training step the weights are from, when known
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def preprocess(self):
        return eval_transform(self.image_size)

    def fingerprint(self) -> str:
        """sha256 of everything that decides the embeddings: weights, vocabulary, text length and image size.

        The same weights give the same fingerprint whether they come from a checkpoint or its export, so an index
        built with one can be searched with the other.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                tensor = tensor.detach().to("cpu").contiguous()
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
            vocab = self.tokenizer.tokenizer.get_vocab()
            digest.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode())
            digest.update(f"max_len={self.tokenizer.max_len} image_size={self.image_size}".encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


# ---------------------------------------------------------------------------------------------------------------
# Public API


def load(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(model, preprocess, tokenizer)`` for a pretraining checkpoint or an ``evlp export`` folder.

    ``model.encode_image(images)`` and ``model.encode_text(token_ids, padding_mask)`` return L2-normalised
    embeddings; ``preprocess`` maps a PIL image to a ``(3, S, S)`` tensor; ``tokenizer(list_of_str)`` returns
    ``(token_ids, padding_mask)``. The model is in eval mode on ``device``.
    """
    loaded = load_model(path, device)
    return loaded.model, loaded.preprocess, loaded.tokenizer


def classify(
    model: nn.Module,
    preprocess,
    tokenizer,
    images,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
) -> list[tuple[str, float]]:
    """Zero-shot label each image: ``[(best class name, its probability), ...]``, one pair per image.

    ``images`` is one or a list of PIL images or image paths, or a ``(B, 3, H, W)`` tensor already preprocessed.
    Probabilities are the softmax over classes of the model's own logit scale times the cosines, as in CLIP.
    """
    probs = class_probabilities(model, preprocess, tokenizer, images, classnames, templates, batch_size)
    best, index = probs.max(dim=-1)
    return [(classnames[i], p) for p, i in zip(best.tolist(), index.tolist())]


def class_probabilities(
    model: nn.Module,
    preprocess,
    tokenizer,
    images,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
) -> torch.Tensor:
    """``(B, C)`` float32 zero-shot class probabilities of the images (arguments as :func:`classify`), on the CPU."""
    device = resolve_device(model, None)
    classifier = zero_shot_classifier(model, tokenizer, list(classnames), list(templates), device=device)  # (D, C)
    scale = logit_scale(model)
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    elif not isinstance(images, torch.Tensor):
        images = list(images)
    chunks = [torch.empty(0, len(classnames))]
    with inference(model, device, None):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            if not isinstance(chunk, torch.Tensor):
                chunk = torch.stack([preprocess(open_image(image)) for image in chunk])
            embeddings = model.encode_image(chunk.to(device)).float()  # (B, D)
            chunks.append((scale * embeddings @ classifier).softmax(dim=-1).cpu())  # (B, C)
    return torch.cat(chunks)


def logit_scale(model: nn.Module) -> float:
    """The scale CLIP multiplies cosines by before a softmax: the student's output-level ITC scale, capped at 100
    like in training; 100 (CLIP's) for a model without one."""
    if isinstance(model, SSMKE):
        return min(100.0, model.logit_scales[-1].detach().exp().item())
    scale = getattr(model, "logit_scale", None)
    return scale.detach().exp().item() if isinstance(scale, torch.Tensor) else 100.0


def open_image(image) -> Image.Image:
    """A PIL image as it is, or the image file at a path (fully read, so the file is closed on return)."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as opened:
            opened.load()  # the pixels stay in memory after the file is closed
            return opened
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise EvlpError(f"cannot read image {image}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint file, a run's checkpoint folder (its newest checkpoint: ``models/<run_name>``) or an export
    folder (or the ``model.safetensors`` inside one) onto ``device``."""
    from evlp.train.checkpoint import list_checkpoints

    path = Path(path).expanduser()
    if path.is_file() and path.name == WEIGHTS_NAME:
        path = path.parent
    if path.is_dir() and not (path / CONFIG_NAME).exists() and list_checkpoints(path):
        path = list_checkpoints(path)[-1][1]
    if path.is_dir():
        loaded = _load_export(path)
    elif path.is_file():
        loaded = _load_checkpoint(path)
    else:
        raise EvlpError(f"{path} does not exist; expected a training checkpoint (.ckpt) or an `evlp export` folder")
    loaded.model.to(device).eval()
    return loaded


def _load_checkpoint(path: Path) -> LoadedModel:
    from omegaconf import OmegaConf

    from evlp.eval.checkpoint import build_from_checkpoint, read_student_checkpoint

    if path.suffix == ".safetensors":
        raise EvlpError(f"{path} is a bare safetensors file; pass the `evlp export` folder that holds it "
                        f"(with {CONFIG_NAME} and the tokenizer files)")
    ckpt = read_student_checkpoint(path)
    model, tokenizer, image_size = build_from_checkpoint(ckpt)
    run_config = OmegaConf.to_container(ckpt.cfg, resolve=True)
    return LoadedModel(
        model=model, tokenizer=tokenizer, image_size=image_size,
        model_config=_sized_config(model, run_config["model"]), kd_dim=ckpt.kd_dim, source=path, kind="checkpoint",
        run_config=run_config, step=ckpt.step,
    )


def _sized_config(model: SSMKE, model_config: dict) -> dict:
    """``model_config`` with each tower's sizes taken from the built towers.

    A tower loaded from an upstream file took that file's sizes, not the config's numbers (which describe only
    randomly initialised towers); with these, ``build_student(..., load_weights=False)`` rebuilds this very model.
    The ``path`` entries are kept: they say what the towers were initialised from.
    """
    from evlp.models.image import Data2Vec2ImageTower
    from evlp.models.text import BertTextTower

    sized = copy.deepcopy(model_config)
    # timm and Hugging Face donors are rebuilt from their names (and config file) as in training: nothing to size.
    if isinstance(model.image_tower, Data2Vec2ImageTower):
        vit = model.image_tower
        sized["image_tower"].update(width=vit.embed_dim, depth=len(vit.blocks),
                                    num_heads=vit.blocks[0].attn.num_heads, img_size=vit.patch_embed.img_size[0],
                                    patch_size=vit.patch_embed.patch_size[0])
    if isinstance(model.text_tower, BertTextTower):
        bert = model.text_tower.bert.config
        sized["text_tower"].update(width=bert.hidden_size, depth=bert.num_hidden_layers,
                                   num_heads=bert.num_attention_heads, max_positions=bert.max_position_embeddings)
    return sized


def _load_export(folder: Path) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise EvlpError(f"{folder} is not an `evlp export` folder (it needs {CONFIG_NAME} and {WEIGHTS_NAME}) nor a "
                        f"run's checkpoint folder (model-*-train.ckpt files)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvlpError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise EvlpError(f"{config_path} is not an evlp export config (format {config.get('format')!r} "
                        f"instead of {EXPORT_FORMAT!r})" if isinstance(config, dict) else
                        f"{config_path} is not an evlp export config")
    version = config.get("format_version")
    if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
        raise EvlpError(f"{folder} has export format version {version!r}; this evlp reads up to version "
                        f"{EXPORT_FORMAT_VERSION}: upgrade evlp")
    missing = [key for key in ("model", "kd_dim", "image_size", "max_text_len") if key not in config]
    if missing:
        raise EvlpError(f"{config_path} lacks {', '.join(missing)}; export the checkpoint again")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise EvlpError(f"cannot read {weights_path}: {str(e).splitlines()[0]}") from None
    tokenizer = TextTokenizer(load_tokenizer(folder), max_len=config["max_text_len"])
    model = _build_and_load(config["model"], config["kd_dim"], state, tokenizer, folder)
    return LoadedModel(
        model=model, tokenizer=tokenizer, image_size=config["image_size"], model_config=config["model"],
        kd_dim=config["kd_dim"], source=folder, kind="export", step=(config.get("source") or {}).get("step"),
    )


def _build_and_load(model_config: dict, kd_dim: int, state: dict, tokenizer: TextTokenizer, where: Path) -> SSMKE:
    """The training code's student, randomly initialised at these sizes, then loaded strictly with ``state``."""
    from evlp.config import ModelConfig, stored_config
    from evlp.models.build import build_student
    from evlp.pretrained.towers import load_exact

    cfg = stored_config(model_config, ModelConfig, str(where))
    model = build_student(cfg, kd_dim=kd_dim, tokenizer=tokenizer.tokenizer, load_weights=False)
    load_exact(model, state, f"{where} (the model its config describes)")
    return model.eval()
