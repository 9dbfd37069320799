"""Typed run configs: packaged YAML files + ``key=value`` overrides, validated against dataclasses.

A config is selected by name (``--config training/s_smke`` -> ``evlp/configs/training/s_smke.yaml``) and overridden
with the original EV-LP grammar: ``base_dir=/data trainer.max_epochs=1 model.text_tower.path=/models/bert``. Every
path derives from ``base_dir`` through interpolation (``model_path: ${base_dir}/models``), so nothing is hard-coded.

The schema lives in the dataclasses below; OmegaConf merges the YAML and the overrides into it, which rejects
unknown keys and values of the wrong type. ``load_config`` turns those rejections into one ``EvlpError`` line that
names the nearest valid choices.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from evlp.errors import EvlpError


@dataclass
class ImageTowerConfig:
    kind: str = "data2vec2"  # or timm:<model name> (any timm model, docs/training.md "Other donors")
    path: Optional[str] = None  # weights file; None = random init from the numbers below (or timm's hub weights)
    depth: Optional[int] = 6  # keep the first `depth` blocks (None = all of the file's / the whole timm model)
    width: int = 768  # width, num_heads, patch_size: data2vec2 only (a timm model's come from its name)
    num_heads: int = 12
    img_size: int = 224
    patch_size: int = 16
    pretrained_hub: bool = False  # timm: load timm's own pretrained weights (hub or its cache) instead of `path`
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # timm: extra timm.create_model arguments


@dataclass
class TextTowerConfig:
    kind: str = "bert"  # or hf: any BERT-like Hugging Face encoder named by `path` (BERT, RoBERTa, MiniLM, ...)
    path: Optional[str] = None  # HF model name or folder; None = random init from the numbers below (bert only)
    tokenizer: Optional[str] = None  # HF name or folder; defaults to `path`
    depth: Optional[int] = 6
    width: int = 768
    num_heads: int = 12
    max_positions: int = 512
    dropout: Optional[float] = None  # every dropout of the tower (hidden, attention); None = the model's own (BERT 0.1)


@dataclass
class TeacherConfig:
    kind: str = "beitv2"  # or timm:<model name>
    path: Optional[str] = None  # weights file; None = random init (only sensible for tests and the quickstart)
    depth: Optional[int] = None
    width: int = 768  # width, num_heads, patch_size: beitv2 only
    num_heads: int = 12
    img_size: int = 224
    patch_size: int = 16
    pretrained_hub: bool = False  # timm: load timm's own pretrained weights instead of `path`
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # timm: extra timm.create_model arguments
    target: str = "auto"  # timm: cls | pooled | logits; auto = cls where the model has a class token, else pooled


@dataclass
class ModelConfig:
    embed_dim: int = 768  # width of the shared block
    depth: int = 6  # default depth of both towers (the YAML interpolates it into them)
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    shared_layer_scale: float = 0.2
    tte_layer_scale: float = 1e-5
    image_tower: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text_tower: TextTowerConfig = field(default_factory=TextTowerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class LossConfig:
    memory_bank_size: int = 65536
    kd_temperature: float = 0.07  # fixed; the original's learnable-looking one never reached the optimizer
    init_temperature: float = 0.07  # initial ITC temperature (two learnable scales)
    max_logit_scale: float = 100.0


@dataclass
class QuickstartDataConfig:
    root: str = "${data_path}/quickstart"
    num_train: int = 6000
    num_val: int = 500
    image_size: int = 64
    shard_size: int = 1000
    seed: int = 0


@dataclass
class DataConfig:
    # Each entry: a folder of .tar shards, a brace pattern (`/data/cc3m/{00000..00331}.tar`), or `quickstart`.
    train: List[str] = field(default_factory=list)
    # One weight per `train` entry: each pair is drawn from source i with probability w_i / sum(w), epochs keep the
    # total size of the sources (docs/data.md "Mixing sources"). None = concatenate (in proportion to their sizes).
    train_weights: Optional[List[float]] = None
    val: List[str] = field(default_factory=list)
    quickstart: QuickstartDataConfig = field(default_factory=QuickstartDataConfig)
    batch_size: int = 256  # per process
    eval_batch_size: int = 256
    num_workers: int = 8
    shuffle_buffer: int = 2000
    max_text_len: int = 64
    image_size: int = 224
    crop_scale: List[float] = field(default_factory=lambda: [0.9, 1.0])
    color_jitter: float = 0.4
    hflip: float = 0.5


@dataclass
class OptimConfig:
    base_lr: float = 1e-4  # per 256 pairs of global batch (linear scaling rule)
    lr: Optional[float] = None  # absolute peak lr; overrides base_lr scaling when set
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    fused: Optional[bool] = None  # None = fused AdamW when on CUDA


@dataclass
class TrainerConfig:
    max_epochs: int = 7
    max_steps: int = -1
    precision: str = "auto"  # auto = bf16-mixed on GPU, 32-true on CPU
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    log_every_n_steps: int = 50
    val_every_n_steps: Optional[int] = None  # None = once per epoch
    limit_val_batches: Optional[int] = None
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    compile: bool = False
    grad_checkpointing: bool = False  # recompute tower activations in backward: less memory, ~1/3 more student compute
    checkpoint_every_n_steps: int = 1000
    keep_last_checkpoints: int = 2
    progress_bar: bool = True


@dataclass
class EvalConfig:
    retrieval: bool = True  # text<->image retrieval on the validation split after training
    zeroshot: bool = True  # zero-shot classification (quickstart attributes) after training
    chance: bool = True  # also report what a random model would score
    # Benchmarks at every validation, on rank 0 (train/eval_callbacks.py). imagenet, coco, flickr30k: from data_path
    # in the `evlp eval` layout (skipped if absent); quickstart: the quickstart's held-out split (data.val).
    zeroshot_callback: Optional[str] = None  # imagenet: ImageNet-1K top-1/top-5; quickstart: its attribute tasks
    imagenet_zeroshot_callback: bool = False  # = zeroshot_callback: imagenet (the older switch)
    retrieval_callback: Optional[str] = None  # coco | flickr30k: Karpathy-test TR/IR@1/5/10; quickstart: its val split
    callback_max_images: Optional[int] = None  # a fixed random subset of this many images (None = all), for speed


@dataclass
class RunConfig:
    run_name: str = "run"
    base_dir: str = "."
    model_path: str = "${base_dir}/models"
    data_path: str = "${base_dir}"
    log_dir: str = "${base_dir}/logs"
    seed: int = 42
    resume: Optional[str] = None  # None, "latest" or a checkpoint path
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CONFIG_PACKAGE = "evlp.configs"


def available_configs() -> List[str]:
    root = resources.files(CONFIG_PACKAGE)
    names = []

    def walk(node, prefix):
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".yaml"):
                names.append(prefix + child.name[: -len(".yaml")])

    walk(root, "")
    return sorted(names)


def _nearest(word: str, choices: List[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return ", ".join(close if close else sorted(choices)[:8])


def _read_packaged(name: str) -> DictConfig:
    name = name.removesuffix(".yaml")
    names = available_configs()
    if name not in names:
        raise EvlpError(f"unknown config '{name}'; nearest valid choices: {_nearest(name, names)}")
    text = resources.files(CONFIG_PACKAGE).joinpath(f"{name}.yaml").read_text()
    return OmegaConf.create(text)


def _schema_keys(node: DictConfig, dotted_parent: str) -> List[str]:
    target = OmegaConf.select(node, dotted_parent) if dotted_parent else node
    if isinstance(target, DictConfig):
        return [f"{dotted_parent}.{k}" if dotted_parent else str(k) for k in target.keys()]
    return []


def _explain(error: OmegaConfBaseException, schema: DictConfig, origin: str) -> EvlpError:
    key = getattr(error, "full_key", None) or ""
    if isinstance(error, ConfigKeyError) or "not in" in str(error):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        choices = _schema_keys(schema, parent)
        return EvlpError(f"unknown config key '{key}' in {origin}; nearest valid keys: {_nearest(key, choices)}")
    if isinstance(error, ValidationError):
        expected = OmegaConf.select(schema, key) if key else None
        kind = type(expected).__name__ if expected is not None else "the schema's type"
        msg = re.sub(r"\s+", " ", str(error).splitlines()[0])
        return EvlpError(f"wrong type for '{key}' in {origin}: {msg} (expected {kind}, e.g. {key}={expected})")
    return EvlpError(f"invalid config in {origin}: {str(error).splitlines()[0]}")


def schema_for(name: str) -> type:
    """The dataclass a packaged config is validated against: fine-tuning configs have their own schema."""
    if name.startswith("fine_tuning/"):
        from evlp.finetune.config import FinetuneConfig

        return FinetuneConfig
    return RunConfig


def load_config(name: Optional[str], overrides: List[str] = ()) -> DictConfig:
    """Load packaged config ``name`` (``quickstart`` when None), apply ``key=value`` overrides, validate, resolve."""
    name = (name or "quickstart").removesuffix(".yaml")
    schema = OmegaConf.structured(schema_for(name))
    try:
        merged = OmegaConf.merge(schema, _read_packaged(name))
    except OmegaConfBaseException as e:
        raise _explain(e, schema, f"config '{name}'") from None
    for item in overrides:
        if "=" not in item:
            raise EvlpError(f"override '{item}' is not of the form key=value (e.g. base_dir=/data)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"override '{item}'") from None
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as e:
        raise EvlpError(f"config '{name}' does not resolve: {str(e).splitlines()[0]}") from None
    return merged


def save_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg))
