"""Typed run configs: packaged YAML files + ``key=value`` overrides, validated against dataclasses.

A config is selected by name (``--config training/s_smke`` -> ``evlp/configs/training/s_smke.yaml``) or is a YAML
file of one's own (``--config my.yaml``), and overridden with the original EV-LP grammar: ``base_dir=/data
trainer.max_epochs=1 model.text_tower.path=/models/bert``. Every path derives from ``base_dir`` through
interpolation (``model_path: ${base_dir}/models``), so nothing is hard-coded.

A YAML file of one's own may start from another config with a top-level ``extends:`` key, a packaged config's name
(``extends: training/s_smke``) or another file (``extends: base.yaml``, relative to the extending file); its keys
are merged over that config's, then the command line's overrides over both. A file that extends nothing starts from
the schema's defaults.

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

import yaml
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
    # total size of the sources (docs/data.md "Several sources"). None = pair by pair in proportion to their sizes,
    # every pair once per epoch.
    train_weights: Optional[List[float]] = None
    val: List[str] = field(default_factory=list)
    quickstart: QuickstartDataConfig = field(default_factory=QuickstartDataConfig)
    batch_size: int = 256  # per process
    eval_batch_size: int = 256
    num_workers: int = 8
    shuffle_buffer: int = 2000
    # Shards each loader worker reads at once, their pairs interleaved at random (shared out among the sources):
    # more shards feed each batch (docs/data.md "Several sources"); each costs an open file and a 1 MB buffer.
    open_shards: int = 32
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
    # A training checkpoint (.ckpt) or an `evlp export` folder whose student weights this run starts from (weights
    # only: optimizer, schedule, step and memory bank start fresh); ignored when resuming.
    init_from: Optional[str] = None
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


OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+){0,15}")  # the schema is 4 levels deep


def _shown(item: str) -> str:
    return repr(item if len(item) <= 80 else item[:77] + "...")


def check_override(item: str) -> None:
    """EvlpError unless ``item`` has the ``key=value`` form: a dotted key of names, a value without control
    characters (a newline in an argument is almost always a quoting accident, and ends up in folder names)."""
    key, sep, _ = item.partition("=")
    if not sep:
        raise EvlpError(f"override {_shown(item)} is not of the form key=value (e.g. base_dir=/data)")
    if not item.isprintable():
        raise EvlpError(f"override {_shown(item)} contains a control character (a newline?): give one key=value "
                        f"per argument")
    if not OVERRIDE_KEY.fullmatch(key):
        raise EvlpError(f"override {_shown(item)}: {_shown(key)} is not a config key (dot-separated names, e.g. "
                        f"trainer.max_epochs)")


EXTENDS = "extends"
YAML_SUFFIXES = (".yaml", ".yml")


def _read_file(path: Path) -> DictConfig:
    try:
        layer = OmegaConf.load(path)  # a safe YAML loader: no tags that build Python objects
    except (OSError, UnicodeDecodeError) as e:
        raise EvlpError(f"cannot read config file {path}: {e}") from None
    except Exception as e:  # the YAML parser's errors (ScannerError, ParserError, ...)
        reason = re.sub(r"\s+", " ", str(e).strip()) or type(e).__name__
        raise EvlpError(f"config file {path} is not valid YAML: {reason}") from None
    if not isinstance(layer, DictConfig):
        raise EvlpError(f"config file {path} must hold a mapping of keys (e.g. `extends: training/s_smke`, "
                        f"`run_name: mine`), not a list")
    return layer


def config_layers(name: str) -> tuple[Optional[str], List[tuple[str, DictConfig]]]:
    """``(root, layers)``: the packaged config everything starts from (None for a file that extends nothing) and the
    configs to merge in order, each with the origin its errors name. ``name`` is a packaged config's name, or the
    path of a YAML file (a path ending in .yaml/.yml that exists wins over a packaged name)."""
    layers: List[tuple[str, DictConfig]] = []
    seen: List[Path] = []
    path = Path(name).expanduser()
    while name.endswith(YAML_SUFFIXES) and path.is_file():
        path = path.resolve()
        if path in seen:
            raise EvlpError(f"config file {path} extends itself (through {', '.join(map(str, seen))})")
        seen.append(path)
        layer = _read_file(path)
        parent = layer.pop(EXTENDS, None)
        layers.insert(0, (str(path), layer))
        if parent is None:
            return None, layers
        if not isinstance(parent, str):
            raise EvlpError(f"config file {path}: `{EXTENDS}:` names one config (a packaged name such as "
                            f"training/s_smke, or a .yaml file), not {parent!r}")
        name, path = parent, path.parent / Path(parent).expanduser()
    if name.endswith(YAML_SUFFIXES) and name.removesuffix(".yaml") not in available_configs():
        where = f" (extended by {seen[-1]})" if seen else ""
        raise EvlpError(f"config file {path} not found{where}; nor is {name} a packaged config (nearest: "
                        f"{_nearest(name.removesuffix('.yaml'), available_configs())})")
    name = name.removesuffix(".yaml")
    return name, [(f"config '{name}'", _read_packaged(name)), *layers]


def config_root(name: Optional[str]) -> Optional[str]:
    """The packaged config that ``--config name`` starts from (None: a file that extends nothing)."""
    return config_layers(name or "quickstart")[0]


def load_config(name: Optional[str], overrides: List[str] = ()) -> DictConfig:
    """Load config ``name`` (packaged name or YAML file; ``quickstart`` when None), apply ``key=value`` overrides,
    validate, resolve."""
    name = name or "quickstart"
    root, layers = config_layers(name)
    schema = OmegaConf.structured(schema_for(root or ""))
    merged = schema
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise _explain(e, schema, origin) from None
    for item in overrides:
        check_override(item)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"override '{item}'") from None
        except yaml.YAMLError as e:  # a tag (!!python/...), a backtick, an unclosed quote ...
            problem = re.sub(r"\s+", " ", str(getattr(e, "problem", None) or e).splitlines()[0])[:120]
            raise EvlpError(f"override {_shown(item)}: its value is not valid YAML ({problem}); quote it, e.g. "
                            f"key='value'") from None
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as e:
        raise EvlpError(f"config '{name}' does not resolve: {str(e).splitlines()[0]}") from None
    return merged


def stored_config(raw: dict, schema: type, where: str) -> DictConfig:
    """A config read back from a file (a checkpoint's ``hyper_parameters``, an export's ``config.json``) merged into
    ``schema``, without ever resolving it against anything.

    evlp stores configs resolved, so an interpolation in one (``${oc.env:HF_TOKEN}``, ``${base_dir}``) can only come
    from an edited or crafted file; resolving it could copy an environment variable into an export, a model card or
    a hub upload. It is refused with the key that holds it.
    """
    found = _interpolation(raw)
    if found is not None:
        key, value = found
        raise EvlpError(f"{where}: its stored config holds the interpolation {value[:80]!r} at {key}, which evlp "
                        f"never writes (the file was edited or crafted): refused rather than resolved")
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), raw)
    except OmegaConfBaseException as e:
        raise EvlpError(f"{where}: its stored config does not fit this evlp version's schema "
                        f"({str(e).splitlines()[0]})") from None


def _interpolation(node, key: str = "") -> tuple[str, str] | None:
    """``(dotted key, value)`` of the first string in ``node`` that OmegaConf would treat as an interpolation."""
    if isinstance(node, str):
        return (key or "the top level", node) if "${" in node else None
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for k, value in items:
        found = _interpolation(value, f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


def save_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg))
