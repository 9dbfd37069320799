"""Image towers and teachers from any timm model (``kind: timm:<model name>``).

A transformer donor (ViT, DeiT, BEiT, EVA, ...) gives the tokens of its ``forward_features``, ``(B, P + N, D)``: its
P class/register tokens first, after its final norm. A convolutional donor (ResNet, EfficientNet, MobileNet,
ConvNeXt, ...) gives its last feature map as one token per position, with their mean in front as a class token,
``(B, 1 + H·W, C)``; so does a transformer without a class token. Either way the shared block gets what the Data2Vec2
tower gives it: a class token, then one token per image region.

A teacher gives one target vector per image (``target``): ``cls``, the class token of ``forward_features``;
``pooled``, the model's own pooling before its classifier (``forward_head(pre_logits=True)``; where ``depth``
removed the head, the mean over tokens or positions); ``logits``, the classifier's output. ``auto`` is ``cls`` where
the model has a class token, else ``pooled``.

``depth`` keeps the first blocks of a ViT-style model or the first stages (``model.blocks``) of timm's EfficientNet /
MobileNet family, through timm's own ``prune_intermediate_layers``, which also drops what only the removed layers fed
(the classifier; a CNN's 1x1 head convolution). ``depth: null`` keeps the whole ``forward_features``.

Images arrive normalised with ImageNet's mean and std (``evlp.data.transforms``). A donor trained with other
statistics (0.5/0.5 for many timm ViTs) gets them converted to its own by a fixed per-channel affine, taken from
timm's pretrained config of the named model (a tag in the name, ``vit_base_patch16_224.augreg_in21k``, selects it).

Shapes, widths and forward FLOPs come from one dry forward of a single zero image when a module is built, which
costs nothing on the meta device (where ``evlp info`` and ``evlp.flops`` build models).
"""

from __future__ import annotations

import difflib
import inspect

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from evlp.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from evlp.errors import EvlpError

TIMM_PREFIX = "timm:"
TEACHER_TARGETS = ("auto", "cls", "pooled", "logits")


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts SDPA's CUDA kernels and the meta device's, but not the CPU flash kernel a model built on the CPU runs.
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def timm_name(kind: str) -> str | None:
    """``'mobilenetv2_100'`` for ``kind: timm:mobilenetv2_100``, None for a built-in kind."""
    return kind[len(TIMM_PREFIX):] if kind.startswith(TIMM_PREFIX) else None


def check_timm_name(name: str, where: str) -> None:
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"nearest: {', '.join(close)}" if close else "see timm.list_models()"
        raise EvlpError(f"{where}.kind: unknown timm model '{name}'; expected timm:<a timm model name> ({hint})")


def create_timm_model(name: str, img_size: int, num_classes: int | None, where: str, model_kwargs=None,
                      pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` with one-line errors. ``num_classes=0`` builds no classifier, None keeps timm's default.

    A fixed-input-size model (ViT, BEiT, ...) is built for ``img_size`` unless ``model_kwargs`` says otherwise;
    ``pretrained`` fetches timm's own weights (Hugging Face hub or its cache).
    """
    check_timm_name(name, where)
    kwargs = dict(model_kwargs or {})
    default_cfg = get_pretrained_cfg(name)
    if default_cfg is not None and default_cfg.fixed_input_size:
        kwargs.setdefault("img_size", img_size)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # an argument the model's constructor does not take
        raise EvlpError(f"{where}.model_kwargs: timm's {name} does not take {kwargs} ({e})") from None
    except (OSError, RuntimeError, ValueError) as e:
        if not pretrained:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvlpError(f"{where}.pretrained_hub: could not get timm's pretrained weights for {name} ({first}); "
                        f"fetch them once with network access, or give a weights file as {where}.path "
                        f"and set {where}.pretrained_hub=false") from None


def keep_first_blocks(model: nn.Module, depth: int, name: str, where: str) -> None:
    """Truncate ``model`` in place to its first ``depth`` blocks (ViT family) or ``blocks`` stages (EfficientNet and
    MobileNet families), with timm's ``prune_intermediate_layers``."""
    blocks = getattr(model, "blocks", None)
    prune = getattr(model, "prune_intermediate_layers", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and prune is not None:
        if not 1 <= depth <= len(blocks):
            raise EvlpError(f"{where}.depth: {depth} asked for, but timm's {name} has {len(blocks)} blocks "
                            f"(use 1..{len(blocks)}, or null for the whole model)")
        if "extra_blocks" in inspect.signature(prune).parameters:  # EfficientNet/MobileNet: index 0 is the stem
            prune([depth], extra_blocks=True)
            return
        if len(getattr(model, "feature_info", ())) == len(blocks):  # ViT family: one feature index per block
            prune([depth - 1])
            return
    raise EvlpError(f"{where}.depth: evlp keeps the first blocks of a ViT-style timm model or the first `blocks` "
                    f"stages of an EfficientNet/MobileNet, and timm's {name} ({type(model).__name__}) is neither; "
                    f"set {where}.depth=null to use its whole forward_features")


def dry_run(module: nn.Module, img_size: int, fn) -> tuple[torch.Tensor, float]:
    """``fn(one zero image)`` without gradients and in eval mode, and the forward FLOPs it took: torch's
    FlopCounterMode counts matmuls, convolutions and attention at 2 per multiply-add, as ``evlp.flops`` does."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = module.training
    module.eval()  # a BatchNorm in train mode would fold the zero image into its running statistics
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            out = fn(torch.zeros(1, 3, img_size, img_size, device=device))
    finally:
        module.train(was_training)
    return out, float(counter.get_total_flops())


def feature_layout(model: nn.Module, features: torch.Tensor, name: str) -> str:
    """'tokens' for (B, N, D), 'NCHW' or 'NHWC' for a feature map (timm models that give NHWC say so)."""
    if features.ndim == 3:
        return "tokens"
    if features.ndim == 4:
        return "NHWC" if str(getattr(model, "output_fmt", "NCHW")) == "NHWC" else "NCHW"
    raise EvlpError(f"timm's {name} gives features of shape {tuple(features.shape)}; evlp takes (B, N, D) tokens "
                    f"or a (B, C, H, W) feature map")


def as_tokens(features: torch.Tensor, layout: str) -> torch.Tensor:
    """A feature map ``(B, C, H, W)`` or ``(B, H, W, C)`` -> ``(B, H·W, C)``; tokens pass through."""
    if layout == "NCHW":
        return features.flatten(2).transpose(1, 2)
    if layout == "NHWC":
        return features.flatten(1, 2)
    return features


class _Renormalize(nn.Module):
    """ImageNet-normalised images -> the donor's own normalisation: ``x·scale + shift`` per channel, or nothing."""

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        self.active = len(mean) == 3 and len(std) == 3 and (mean, std) != (IMAGENET_MEAN, IMAGENET_STD)
        if self.active:
            # x_donor = (x·std_in + mean_in - mean) / std
            scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
            shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
            # Derived from the model name, so not saved: checkpoints hold trained weights only.
            self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
            self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale + self.shift if self.active else images


class TimmImageTower(nn.Module):
    """A timm model as the student's image tower. ``forward_features(images) -> (B, 1 + N, D)``, class token first."""

    def __init__(self, model: nn.Module, name: str, img_size: int, depth: int | None = None,
                 where: str = "model.image_tower"):
        super().__init__()
        if depth is not None:
            keep_first_blocks(model, depth, name, where)
        self.name, self.img_size, self.kept_depth = name, img_size, depth
        self.renormalize = _Renormalize(model)
        self.model = model
        features, self.forward_flops = dry_run(model, img_size, model.forward_features)
        self.layout = feature_layout(model, features, name)
        # Tokens without a class token in front (a CNN's positions, an avg-pooled ViT) get their mean as one.
        self.mean_token = self.layout != "tokens" or getattr(model, "num_prefix_tokens", 0) == 0
        tokens = as_tokens(features, self.layout)
        self.width = tokens.shape[-1]
        self.num_image_tokens = tokens.shape[1] + self.mean_token

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        try:
            self.model.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError) as e:
            raise EvlpError(f"timm's {self.name} does not support gradient checkpointing ({e}); set "
                            f"trainer.grad_checkpointing=false") from None

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` ImageNet-normalised images -> ``(B, 1 + N, D)`` tokens."""
        tokens = as_tokens(self.model.forward_features(self.renormalize(images)), self.layout)
        if self.mean_token:
            tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        return tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)

    def describe(self) -> str:
        kind = "transformer tokens" if self.layout == "tokens" else f"{self.layout} feature map as tokens"
        blocks = f"first {self.kept_depth} blocks" if self.kept_depth is not None else "whole forward_features"
        mean = " (mean token in front)" if self.mean_token else ""
        return (f"timm {self.name} ({type(self.model).__name__}), {blocks}: {kind}{mean}, "
                f"{self.num_image_tokens} tokens of width {self.width} at {self.img_size}px")


def resolve_target(target: str, model: nn.Module, name: str, where: str) -> str:
    if target not in TEACHER_TARGETS:
        raise EvlpError(f"{where}.target: '{target}' is not one of {', '.join(TEACHER_TARGETS)}")
    has_cls = getattr(model, "cls_token", None) is not None
    if target == "auto":
        return "cls" if has_cls else "pooled"
    if target == "cls" and not has_cls:
        raise EvlpError(f"{where}.target: timm's {name} has no class token; use pooled (or logits)")
    return target


class TimmTeacher(nn.Module):
    """A frozen timm model as the distillation teacher. ``forward(images) -> (B, D)`` targets; always in eval mode."""

    def __init__(self, model: nn.Module, name: str, img_size: int, target: str = "auto", depth: int | None = None,
                 where: str = "model.teacher"):
        super().__init__()
        self.target = resolve_target(target, model, name, where)
        if self.target == "logits" and (depth is not None or getattr(model, "num_classes", 0) == 0):
            raise EvlpError(f"{where}.target: logits need the classifier of the whole model; "
                            f"{'set depth=null' if depth is not None else f'timm built {name} without one'}")
        if depth is not None:
            keep_first_blocks(model, depth, name, where)
        self.name, self.img_size, self.kept_depth = name, img_size, depth
        self.renormalize = _Renormalize(model)
        self.model = model
        features, _ = dry_run(model, img_size, model.forward_features)
        self.layout = feature_layout(model, features, name)
        out, self.forward_flops = dry_run(model, img_size, self.forward)
        self.width = out.shape[-1]
        self.freeze()

    def freeze(self) -> "TimmTeacher":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "TimmTeacher":
        # Never leaves eval mode (see BEiTv2Teacher.train): BatchNorm and dropout stay as pretrained.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(self.renormalize(images))
        if self.target == "cls":
            return features[:, 0]
        if self.target == "logits":
            return self.model.forward_head(features)
        pooled = self.model.forward_head(features, pre_logits=True)
        if pooled.ndim > 2:  # truncation removed the model's pooling: mean over tokens or positions
            pooled = as_tokens(pooled, self.layout).mean(dim=1)
        return pooled

    def describe(self) -> str:
        blocks = f"first {self.kept_depth} blocks" if self.kept_depth is not None else "whole model"
        return (f"timm {self.name} ({type(self.model).__name__}), {blocks}, target: {self.target} "
                f"(width {self.width}) at {self.img_size}px, frozen")
