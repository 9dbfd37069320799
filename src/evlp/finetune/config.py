"""The fine-tuning config schema: one dataclass for every downstream task (``evlp finetune --config fine_tuning/<task>``).

Each packaged ``fine_tuning/<name>.yaml`` names its ``task`` (``imagenet``, ``cifar10``, ``cifar100``, a GLUE task,
``retrieval_coco``, ``retrieval_flickr30k``); the task decides which sections it reads. As in pretraining, every path
derives from ``base_dir`` and ``model.model_path`` names the pretrained checkpoint to start from (the original's key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

VISION_TASKS = ("imagenet", "cifar10", "cifar100")
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
RETRIEVAL_TASKS = ("retrieval_coco", "retrieval_flickr30k")
TASKS = VISION_TASKS + GLUE_TASKS + RETRIEVAL_TASKS


def task_family(task: str) -> str:
    if task in VISION_TASKS:
        return "vision"
    if task in GLUE_TASKS:
        return "glue"
    if task in RETRIEVAL_TASKS:
        return "retrieval"
    raise ValueError(task)


@dataclass
class FinetuneModelConfig:
    # The pretrained starting point: an evlp S-SMKE checkpoint (.ckpt); vision tasks also take a Data2Vec2 file.
    # None = the towers' random initialisation (only sensible for tests).
    model_path: Optional[str] = None
    linear_classifier: bool = False  # vision: freeze the tower and train the head only (linear evaluation)
    num_classes: int = 2
    layer_decay: Optional[float] = None  # vision: lr of block l = lr * decay^(L+1-l); None = one lr for all
    pooling: str = "mean"  # vision: mean of the patch tokens (the thesis) or `cls`
    dropout: float = 0.0  # before the classifier (GLUE 0.1)


@dataclass
class AugmentConfig:
    """Vision fine-tuning augmentation (timm's names), the thesis' table 2.2."""

    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    color_jitter: Optional[float] = 0.4
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_prob: float = 0.9
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.1
    eval_crop_pct: float = 0.875  # eval: resize the shorter side to image_size / crop_pct, centre crop (original: 1.0)


@dataclass
class FinetuneDataConfig:
    batch_size: int = 32  # global batch = batch_size x accumulate_grad_batches x processes
    eval_batch_size: int = 256
    num_workers: int = 4
    image_size: int = 224
    max_text_len: int = 256
    limit_train_samples: Optional[int] = None  # the first N training samples only (smoke runs)
    limit_val_samples: Optional[int] = None
    # retrieval: pairs embedded per forward pass (gradient cache); None = the whole batch at once. The loss and
    # the update are those of the whole batch either way: only memory and speed change.
    micro_batch_size: Optional[int] = None
    download: bool = True  # fetch a missing dataset that can be fetched without the user (GLUE, CIFAR, Karpathy)
    download_url: Optional[str] = None  # a mirror of the official files (CIFAR: the folder of the .tar.gz files)


@dataclass
class FinetuneOptimConfig:
    lr: float = 2e-5  # peak lr, absolute (the fine-tuning tables give it for their batch sizes)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    schedule: str = "cosine"  # cosine | linear (GLUE's polynomial decay with power 1)
    fused: Optional[bool] = None


@dataclass
class FinetuneTrainerConfig:
    max_epochs: int = 10
    max_steps: int = -1
    precision: str = "auto"
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    log_every_n_steps: int = 50
    val_every_n_epochs: int = 1
    limit_train_batches: Optional[int] = None
    limit_val_batches: Optional[int] = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    progress_bar: bool = True


@dataclass
class FinetuneConfig:
    task: str = "imagenet"
    run_name: str = "finetune"
    base_dir: str = "."
    model_path: str = "${base_dir}/models"  # where this run's checkpoints go
    data_path: str = "${base_dir}"
    log_dir: str = "${base_dir}/logs"
    seed: int = 42
    resume: Optional[str] = None  # None, "latest" or a checkpoint path
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    trainer: FinetuneTrainerConfig = field(default_factory=FinetuneTrainerConfig)
