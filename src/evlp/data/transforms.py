"""Image transforms for pretraining and evaluation (torchvision ``transforms.v2``; PIL image in, float tensor out).

Pretraining follows the original recipe (reference §7.3): ColorJitter(0.4) -> horizontal flip -> RandomResizedCrop
(scale 0.9-1, bicubic) -> ImageNet normalisation. Evaluation resizes to a square without cropping. Flip, crop scale
and jitter are parameters because some data cannot take them: the quickstart captions say "left" and "right", which
a flip would make false, so its config sets ``hflip=0``.

Every random choice comes from torch's global generator, so seeding it before a call reproduces the augmentation
(``shards.ImageTextShards`` does this per sample for exact resume).
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited on white rather than turning black."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _finish() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(
    size: int,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    color_jitter: float | None = 0.4,
    hflip: float = 0.5,
) -> v2.Compose:
    """PIL image -> (3, size, size) float32: jitter, flip, random resized crop, normalise."""
    # Jitter, flip and crop run on the PIL image (uint8 pixels, as in the original, which converted to a uint8
    # tensor first): PIL's kernels are about a third faster than the tensor ones at these sizes.
    steps = [to_rgb]
    if color_jitter:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps.append(
        v2.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC, antialias=True)
    )
    return v2.Compose(steps + _finish())


def eval_transform(size: int) -> v2.Compose:
    """PIL image -> (3, size, size) float32: resize to a square (aspect ratio not kept, nothing cropped), normalise."""
    resize = v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True)
    return v2.Compose([to_rgb, resize, *_finish()])
