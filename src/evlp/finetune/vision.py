"""Image classification fine-tuning of the pretrained image tower: ImageNet-1K, CIFAR-10 and CIFAR-100, full
fine-tuning or linear evaluation (the thesis' table 2.2; the original's ``ImageClassification``, reference §3.7,
§8.5).

    evlp finetune --config fine_tuning/imagenet base_dir=/data model.model_path=/data/models/S-SMKE/model-...ckpt
    evlp finetune --config fine_tuning/cifar10 base_dir=/data model.model_path=... model.linear_classifier=true
    evlp sweep vision base_dir=/data model.model_path=...        # all three datasets, linear and full

The model is :class:`evlp.models.heads.ImageClassifier`: the image tower of the pretrained S-SMKE checkpoint (or of
an upstream Data2Vec2 file), the mean of its patch tokens, ``LayerNorm`` and a new linear head. Full fine-tuning
trains everything with layer-wise lr decay (layer ``l`` of ``0..L+1`` at ``lr * decay^(L+1-l)``: 0 = patch
embedding, CLS and positions, ``1..L`` = the blocks, ``L+1`` = head norm and classifier); linear evaluation freezes
the tower and trains the head only. Training uses timm's RandAugment / random-erasing transform and Mixup/CutMix
with soft-target cross-entropy; validation computes cross-entropy, top-1 and top-5 (percent) once over the whole
validation set (ImageNet val, CIFAR test), logged as ``val/loss``, ``val/top1`` and ``val/top5``.

Data: ``<data_path>/imagenet/{train,val}/<name>_<synset>.JPEG`` (``evlp download imagenet``); CIFAR is downloaded to
``<data_path>/cifar10/`` or ``cifar100/`` on first use (``evlp.data.classification``).

Using the fine-tuned classifier. The best checkpoint (``<model_path>/<run_name>/model-{step}-{val_loss}-val.ckpt``)
holds the classifier's weights under ``model.*`` and its architecture under ``hyper_parameters["classifier"]``, so it
is rebuilt without the pretrained checkpoint or the training data, read with ``weights_only=True``::

    from PIL import Image
    from evlp.finetune.vision import eval_transform, load_classifier

    model, info = load_classifier("models/imagenet_finetune/model-75060-0.8123-val.ckpt")  # eval mode, on CPU
    image = eval_transform(info["image_size"], info["eval_crop_pct"])(Image.open("cat.jpg").convert("RGB"))
    probabilities = model(image.unsqueeze(0)).softmax(-1)  # (1, num_classes)
    # ImageNet: class i is evlp.eval.datasets.imagenet_synsets()[i], named imagenet_classnames()[i]

The same checkpoint also loads strictly into the training module (``build_task(cfg).module.load_state_dict``), as
the runner does to measure the best weights again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from evlp.data.classification import (CIFAR, ClassificationSplit, LabeledImages, download_cifar,
                                      load_cifar, load_imagenet)
from evlp.errors import EvlpError
from evlp.finetune.module import FinetuneModule
from evlp.finetune.runner import FinetuneTask
from evlp.models.heads import ImageClassifier
from evlp.models.image import Data2Vec2ImageTower
from evlp.pretrained.towers import load_exact
from evlp.train.optim import layer_decay_groups

STANDARD_SIZES = {"imagenet": (1_281_167, 50_000), "cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}
VAL_SPLIT = {"imagenet": "val", "cifar10": "test", "cifar100": "test"}
TOP_K = (1, 5)


# ---------------------------------------------------------------------------------------------------------------
# Transforms


def train_transform(image_size: int, augment: DictConfig):
    """timm's fine-tuning transform (the original's ``get_transform(pretraining=False, train=True)``, reference
    §7.3): random resized crop (bicubic), flip, RandAugment, normalise, random erasing. timm leaves colour jitter out
    while an auto-augment policy is set, as in the original."""
    from timm.data import create_transform

    return create_transform(
        image_size, is_training=True, scale=tuple(augment.crop_scale), hflip=augment.hflip,
        color_jitter=augment.color_jitter, auto_augment=augment.auto_augment, interpolation="bicubic",
        re_prob=augment.reprob, re_mode=augment.remode, re_count=augment.recount,
    )


def eval_transform(image_size: int, crop_pct: float = 0.875):
    """Resize the shorter side to ``image_size / crop_pct`` (bicubic), centre crop ``image_size``, normalise (ImageNet
    mean and std)."""
    from timm.data import create_transform

    return create_transform(image_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct)


# ---------------------------------------------------------------------------------------------------------------
# Loss and metrics


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-sum_c y_c log p_c``, averaged over the batch (summed over classes: the original averaged over classes as
    well, which divides the loss and its gradient by the number of classes, reference §10 item 32)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks=TOP_K) -> dict[int, torch.Tensor]:
    """``{k: (N,) bool}``: whether each sample's label is among its ``k`` highest logits (all classes when fewer)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    return {k: (top[:, :k] == labels[:, None]).any(dim=-1) for k in ks}


# ---------------------------------------------------------------------------------------------------------------
# Module


def tower_architecture(tower: nn.Module) -> dict:
    """The constructor arguments of a ``Data2Vec2ImageTower`` (kept in checkpoints to rebuild the classifier)."""
    block = tower.blocks[0]
    return {"img_size": int(tower.patch_embed.img_size[0]), "patch_size": int(tower.patch_embed.patch_size[0]),
            "embed_dim": int(tower.embed_dim), "depth": len(tower.blocks), "num_heads": int(block.attn.num_heads),
            "mlp_ratio": block.mlp.fc1.out_features / tower.embed_dim}


class VisionModule(FinetuneModule):
    """Classifier training with Mixup/CutMix, corpus-level validation and layer-wise lr decay."""

    def __init__(self, cfg: DictConfig, model: ImageClassifier):
        arch = {"tower": tower_architecture(model.tower), "num_classes": model.num_classes, "pooling": model.pooling,
                "linear_classifier": model.linear_classifier, "image_size": int(cfg.data.image_size),
                "eval_crop_pct": float(cfg.augment.eval_crop_pct)}
        super().__init__(cfg, classifier=arch)
        self.model = model
        a = cfg.augment
        self.mixup = None
        if (a.mixup_alpha > 0 or a.cutmix_alpha > 0) and a.mixup_prob > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mixup_prob,
                               switch_prob=a.mixup_switch_prob, mode=a.mixup_mode,
                               label_smoothing=a.label_smoothing, num_classes=model.num_classes)
        self._val: list[tuple[torch.Tensor, ...]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def param_groups(self) -> list[dict]:
        decay = self.cfg.model.layer_decay
        if self.model.linear_classifier or decay is None:
            return super().param_groups()  # the tower does not train: one lr for the head
        return layer_decay_groups(self.model, self.cfg.optim.weight_decay, self.model.layer_id,
                                  self.model.num_layers, decay)

    def training_step(self, batch, batch_idx):
        images, labels, _ = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
            loss = soft_target_cross_entropy(self(images), targets)
        else:
            loss = F.cross_entropy(self(images).float(), labels, label_smoothing=self.cfg.augment.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch, batch_idx):
        images, labels, index = batch
        logits = self(images).float()
        hits = topk_hits(logits, labels)
        # Floats, not bools: every backend all-gathers them.
        self._val.append((index, F.cross_entropy(logits, labels, reduction="none"), hits[1].float(), hits[5].float()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        _, loss, top1, top5 = self.gather_samples(*(torch.cat(parts) for parts in zip(*self._val)))
        self._val = []
        n = len(loss)
        # Every process holds the whole set now, so each logs the same numbers: nothing left to reduce.
        self.log("val/loss", loss.mean(), sync_dist=False)
        self.log("val/top1", 100.0 * top1.sum() / n, sync_dist=False)
        self.log("val/top5", 100.0 * top5.sum() / n, sync_dist=False)


# ---------------------------------------------------------------------------------------------------------------
# Task


def load_splits(cfg: DictConfig) -> tuple[ClassificationSplit, ClassificationSplit]:
    """Train and validation data of ``cfg.task``; CIFAR is downloaded first when missing and ``data.download``."""
    data_path, task = cfg.data_path, cfg.task
    if task == "imagenet":
        try:
            return load_imagenet(data_path, "train"), load_imagenet(data_path, "val")
        except EvlpError as e:
            raise EvlpError(f"{e} (`evlp download imagenet --data-path {data_path}` prepares both splits; "
                            f"ImageNet is gated on the hub, so it is never fetched by fine-tuning)") from None
    if cfg.data.download:
        download_cifar(data_path, task, cfg.data.download_url)
    return load_cifar(data_path, task, "train"), load_cifar(data_path, task, "test")


def _loader(data: ClassificationSplit, transform, batch_size: int, num_workers: int, train: bool) -> DataLoader:
    return DataLoader(LabeledImages(data, transform), batch_size=batch_size, shuffle=train, drop_last=train,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)


def build_task(cfg: DictConfig) -> FinetuneTask:
    """The classifier from the pretrained checkpoint and the data loaders; every input error is an ``EvlpError``
    raised here, before training."""
    from evlp.finetune.source import load_pretrained

    if cfg.task not in VAL_SPLIT:
        raise EvlpError(f"task={cfg.task!r} is not a vision task; expected one of {', '.join(VAL_SPLIT)}")
    m, d, a = cfg.model, cfg.data, cfg.augment
    try:
        parts = load_pretrained(m.model_path, keep="image")
    except EvlpError as e:
        raise EvlpError(f"{cfg.task} fine-tuning starts from the image tower of an evlp S-SMKE checkpoint or a "
                        f"Data2Vec2 file (base_imagenet.pt): {e}") from None
    tower = parts.image_tower
    if not isinstance(tower, Data2Vec2ImageTower):
        kind = "no image tower" if tower is None else f"a {type(tower).__name__} image tower"
        raise EvlpError(f"model.model_path={m.model_path} holds {kind}; vision fine-tuning (layer decay over ViT "
                        f"blocks, rebuilding the classifier from its checkpoint) supports the Data2Vec2 tower")
    trained_at = int(tower.patch_embed.img_size[0])
    if d.image_size != trained_at:
        raise EvlpError(f"data.image_size={d.image_size}, but the image tower from {m.model_path} takes "
                        f"{trained_at}x{trained_at} images; set data.image_size={trained_at}")

    train_data, val_data = load_splits(cfg)
    expected = CIFAR[cfg.task].num_classes if cfg.task in CIFAR else 1000
    if m.num_classes != expected:
        raise EvlpError(f"model.num_classes={m.num_classes}, but {cfg.task} has {expected} classes; set "
                        f"model.num_classes={expected}")
    train_data, val_data = train_data.first(d.limit_train_samples), val_data.first(d.limit_val_samples)
    mixup_on = (a.mixup_alpha > 0 or a.cutmix_alpha > 0) and a.mixup_prob > 0
    if mixup_on and d.batch_size % 2:
        raise EvlpError(f"data.batch_size={d.batch_size}: Mixup/CutMix pairs each batch with its reverse and needs "
                        f"an even batch size")
    if len(train_data) < d.batch_size:
        raise EvlpError(f"{cfg.task}: {len(train_data)} training images, fewer than one batch (data.batch_size="
                        f"{d.batch_size}); the last incomplete batch of an epoch is dropped")

    model = ImageClassifier(tower, m.num_classes, pooling=m.pooling, linear_classifier=m.linear_classifier)
    module = VisionModule(cfg, model)
    train_loader = _loader(train_data, train_transform(d.image_size, a), d.batch_size, d.num_workers, train=True)
    val_loader = _loader(val_data, eval_transform(d.image_size, a.eval_crop_pct), d.eval_batch_size,
                         d.num_workers, train=False)

    mode = "linear evaluation (frozen tower, head trained)" if m.linear_classifier else "full fine-tuning"
    summary = (f"{parts.summary}; {mode} of the {model.num_layers}-block image tower with a new "
               f"{m.num_classes}-class head on {cfg.task}")
    standard = (len(train_data), len(val_data)) == STANDARD_SIZES[cfg.task]
    protocol = {
        "dataset": cfg.task, "train_split": "train", "val_split": VAL_SPLIT[cfg.task],
        "train_images": len(train_data), "val_images": len(val_data), "standard_splits": standard,
        "resolution": int(d.image_size), "evaluation": "linear" if m.linear_classifier else "full",
        "pooling": m.pooling,
        "layer_decay": None if m.linear_classifier else m.layer_decay,
        "batch_size_per_process": int(d.batch_size), "epochs": int(cfg.trainer.max_epochs),
        "lr": float(cfg.optim.lr), "weight_decay": float(cfg.optim.weight_decay),
        "mixup": ({"mixup_alpha": a.mixup_alpha, "cutmix_alpha": a.cutmix_alpha, "prob": a.mixup_prob,
                   "switch_prob": a.mixup_switch_prob, "mode": a.mixup_mode} if mixup_on else None),
        "label_smoothing": a.label_smoothing, "auto_augment": a.auto_augment, "random_erasing": a.reprob,
        "eval_crop_pct": a.eval_crop_pct, "metrics": "top-1/top-5 over the whole validation set, percent",
    }
    return FinetuneTask(module=module, train_loader=train_loader, val_loaders=val_loader, monitor="val/top1",
                        headline={"acc@1": "val/top1", "acc@5": "val/top5"}, summary=summary, protocol=protocol)


# ---------------------------------------------------------------------------------------------------------------
# Using a fine-tuned classifier


def load_classifier(path, map_location="cpu") -> tuple[ImageClassifier, dict]:
    """``(classifier in eval mode, info)`` from a vision fine-tuning checkpoint, read with ``weights_only=True`` and
    loaded strictly; ``info`` holds ``num_classes``, ``image_size``, ``eval_crop_pct``, ``pooling`` and the task."""
    from evlp.train.checkpoint import load_training_checkpoint

    ckpt = load_training_checkpoint(path, map_location=map_location)
    hparams = ckpt.get("hyper_parameters") or {}
    arch = hparams.get("classifier")
    if not isinstance(arch, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise EvlpError(f"{path} is not an evlp vision fine-tuning checkpoint (no hyper_parameters['classifier'])")
    try:
        model = ImageClassifier(Data2Vec2ImageTower(**arch["tower"]), arch["num_classes"], pooling=arch["pooling"],
                                linear_classifier=arch["linear_classifier"])
    except (KeyError, TypeError, ValueError) as e:
        raise EvlpError(f"{path}: hyper_parameters['classifier'] does not describe a classifier this evlp builds "
                        f"({type(e).__name__}: {e})") from None
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    load_exact(model, state, f"{path} (the classifier its hyper_parameters describe)")
    model.eval()
    info = {k: arch[k] for k in ("num_classes", "image_size", "eval_crop_pct", "pooling")}
    info["task"] = (hparams.get("finetune_cfg") or {}).get("task")
    return model, info


__all__ = ["VisionModule", "build_task", "eval_transform", "load_classifier", "soft_target_cross_entropy",
           "topk_hits", "train_transform"]
