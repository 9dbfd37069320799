"""Image transforms for pretraining and evaluation (PIL image or JPEG bytes in, normalised float tensor out).

Pretraining (``TrainTransform``): the original's operations and parameters (reference §7.3: ColorJitter(0.4), flip
0.5, RandomResizedCrop(224, scale 0.9-1, ratio 3/4-4/3, bicubic), ImageNet normalisation), run in the order
crop -> flip -> jitter -> normalise. Evaluation resizes to a square without cropping. Flip, crop scale and jitter
are parameters because some data cannot take them: the quickstart captions say "left" and "right", which a flip
would make false, so its config sets ``hflip=0``.

The training transform is written for throughput (it runs once per pair on every training step; see
``evlp bench data`` and docs/benchmarks.md), not composed of torchvision v2 steps:

* the crop is drawn from the size in the image's header before any pixel is decoded; a JPEG is decoded by
  libjpeg-turbo straight into a tensor, at 1/2, 1/4 or 1/8 scale (DCT scaling, PIL's ``draft``) when it is at least
  twice as large as the crop needs;
* crop and resize are one channels-last uint8 bicubic-antialias ``interpolate``; the flip is a uint8 copy;
* colour jitter (brightness, contrast, saturation factors in [0.6, 1.4], in a random order, torchvision's formulas)
  runs on the 224-px crop in one float buffer, with one rounding at the end (uint8 output) or fused with the
  normalisation (float output). Brightness and saturation act pixel by pixel, so applying them after the crop
  rather than before it (the original's order) changes nothing but rounding; contrast blends with the mean grey
  level of the crop (>= 90 % of the image) instead of the whole image;
* with ``normalize=False`` the output stays uint8 and ``normalize_images`` finishes the batch on the device.

Every random choice comes from torch's global generator, so seeding it before a call reproduces the augmentation
(``shards.ImageTextShards`` does this per sample for exact resume).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # what Pillow makes of 16-bit greyscale PNGs and TIFFs


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited on white rather than turning black, and
    16-bit levels are scaled to 8 bits (Pillow's own conversion clips them, turning most of an image white)."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = image.convert("I").point(lambda v: v / 256).convert("L")
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


class TrainTransform:
    """PIL image or encoded image bytes -> (3, size, size) float32: random resized crop, flip, colour jitter,
    normalise.

    With ``normalize=False`` the result is uint8 (the jittered levels, rounded) and ``normalize_images`` finishes
    it, best on the accelerator: a uint8 batch is a quarter of the float32 one to write, to pass from a loader
    worker through shared memory and to copy to the device (the training recipe does this).

    ``into(image, out)`` writes the result into ``out`` (a row of a preallocated batch: ``ImageTextShards`` uses it
    to skip stacking). Given the bytes of a JPEG, nothing but libjpeg-turbo touches them: the crop is drawn from the
    size in the JPEG header and the image decoded by ``torchvision.io.decode_jpeg``; other formats go through PIL.
    ``transforms`` names the steps in the order they run (jitter, flip and normalisation only when enabled).
    An instance keeps a scratch buffer: use one per thread.
    """

    def __init__(
        self,
        size: int,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        color_jitter: float | None = 0.4,
        hflip: float = 0.5,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        normalize: bool = True,
    ):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")
        if color_jitter is not None and color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
        self.size = size
        self.output_shape = (3, size, size)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        self.color_jitter = float(color_jitter or 0)
        self.hflip = float(hflip)
        self.normalize = bool(normalize)
        self.output_dtype = torch.float32 if self.normalize else torch.uint8
        self._scale, self._shift = _normalisation(torch.device("cpu"))
        self._grey = torch.tensor(GREY_WEIGHTS)
        self._scratch: torch.Tensor | None = None
        self.transforms = ["random_resized_crop", "horizontal_flip", "color_jitter", "normalize"]
        if not self.hflip > 0:
            self.transforms.remove("horizontal_flip")
        if not self.color_jitter:
            self.transforms.remove("color_jitter")
        if not self.normalize:
            self.transforms.remove("normalize")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_scratch": None}

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, crop_scale={self.crop_scale}, ratio={self.ratio}, "
                f"color_jitter={self.color_jitter}, hflip={self.hflip}, normalize={self.normalize})")

    def params(self, width: int, height: int) -> tuple[tuple[int, int, int, int], bool, list[tuple[int, float]]]:
        """The random choices for an image of this size, from one draw of torch's global generator:
        ``(top, left, height, width)`` of the crop (RandomResizedCrop's algorithm: up to 10 tries of an area in
        ``crop_scale`` and a log-uniform aspect ratio in ``ratio``, else the largest central crop within the ratio),
        the flip, and the jitter as ``[(op, factor), ...]`` in the order they apply (0 brightness, 1 contrast,
        2 saturation; factors uniform in [1 - j, 1 + j])."""
        u = torch.rand(29).tolist()
        area, crop = width * height, None
        for t in range(10):
            target_area = area * (self.crop_scale[0] + u[2 * t] * (self.crop_scale[1] - self.crop_scale[0]))
            aspect = math.exp(self.log_ratio[0] + u[2 * t + 1] * (self.log_ratio[1] - self.log_ratio[0]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                crop = int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w
                break
        if crop is None:
            in_ratio = width / height
            if in_ratio < self.ratio[0]:
                w, h = width, int(round(width / self.ratio[0]))
            elif in_ratio > self.ratio[1]:
                w, h = int(round(height * self.ratio[1])), height
            else:
                w, h = width, height
            crop = (height - h) // 2, (width - w) // 2, h, w
        flip = u[22] < self.hflip
        jitter = []
        if self.color_jitter:
            low, high = max(0.0, 1 - self.color_jitter), 1 + self.color_jitter
            jitter = [(op, low + u[23 + op] * (high - low)) for op in sorted(range(3), key=lambda k: u[26 + k])]
        return crop, flip, jitter

    def __call__(self, image: Image.Image | bytes) -> torch.Tensor:
        return self.into(image, torch.empty(self.output_shape, dtype=self.output_dtype))

    def into(self, image: Image.Image | bytes, out: torch.Tensor) -> torch.Tensor:
        """Transform ``image`` into ``out`` (contiguous, ``output_shape``, ``output_dtype``) and return ``out``."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            size = jpeg_size(image)
            if size is None:  # not a JPEG: PIL reads it
                with Image.open(io.BytesIO(image)) as pil:
                    return self.into(pil, out)
            encoded, pil = image, None
        else:
            size, pil = image.size, image  # the header's size: nothing is decoded yet
            encoded = _encoded_bytes(image) if image.format == "JPEG" and image.tile else None
        (top, left, h, w), flip, jitter = self.params(*size)
        crop = None
        if encoded is not None and min(w, h) < 2 * self.size:
            crop = _decode_jpeg(encoded)
            if crop is not None:
                crop = crop[:, top : top + h, left : left + w]
        if crop is None:
            if pil is None:
                with Image.open(io.BytesIO(encoded)) as pil:
                    crop = self._pil_crop(pil, top, left, h, w)
            else:
                crop = self._pil_crop(pil, top, left, h, w)
        if crop.shape[1:] != (self.size, self.size):
            # Channels-last uint8 takes torch's vectorised resampling path (~2x PIL's bicubic resize here).
            crop = crop[None].contiguous(memory_format=torch.channels_last)
            crop = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", antialias=True)[0]
        if flip:
            crop = crop.flip(-1)
        if not self.normalize and not jitter:
            np.copyto(out.numpy(), crop.numpy())  # channels-last -> planar bytes: numpy ~2x faster than torch here
            return out
        if self.normalize:
            x = out.copy_(crop)  # the uint8 levels as float, in place
        else:  # float work in a reused buffer (no fresh pages to fault in), rounded into the uint8 row at the end
            if self._scratch is None or self._scratch.shape != crop.shape:
                self._scratch = torch.empty(crop.shape)
            x = self._scratch.copy_(crop)
        for op, factor in jitter:  # torchvision's blends; a factor <= 1 cannot leave [0, 255], so no clamp then
            if op == 0:  # brightness: blend with black
                x.mul_(factor)
            elif op == 1:  # contrast: blend with the mean grey level
                x.lerp_(torch.dot(x.mean(dim=(1, 2)), self._grey), 1 - factor)
            else:  # saturation: blend with the grey image
                x.lerp_(torch.tensordot(self._grey, x, dims=1).expand_as(x), 1 - factor)
            if factor > 1:
                x.clamp_(0, 255)
        if not self.normalize:  # rounded (the cast truncates); numpy's float -> uint8 cast is ~3x torch's
            np.copyto(out.numpy(), x.add_(0.5).numpy(), casting="unsafe")
            return out
        return x.mul_(self._scale).add_(self._shift)

    def _pil_crop(self, image: Image.Image, top: int, left: int, h: int, w: int) -> torch.Tensor:
        """The crop box as a (3, h', w') uint8 view of the decoded image; a JPEG at least twice as
        large as needed is decoded at 1/2, 1/4 or 1/8 scale (then h', w' < h, w, still >= size)."""
        if image.format == "JPEG" and image.tile and min(w, h) >= 2 * self.size:
            width, height = image.size
            if image.draft(image.mode, (math.ceil(width * self.size / w), math.ceil(height * self.size / h))):
                sx, sy = image.size[0] / width, image.size[1] / height
                x0, y0 = round(left * sx), round(top * sy)
                x1 = max(x0 + 1, min(image.size[0], round((left + w) * sx)))
                y1 = max(y0 + 1, min(image.size[1], round((top + h) * sy)))
                left, top, w, h = x0, y0, x1 - x0, y1 - y0
        with warnings.catch_warnings():  # a read-only array, and only read
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(np.asarray(to_rgb(image)))  # (H, W, 3) uint8
        return pixels[top : top + h, left : left + w].permute(2, 0, 1)


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start of frame; C4, C8, CC are other segments


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's frame header, or None when ``data`` is not a JPEG whose marker segments
    parse up to one (in microseconds; PIL's ``Image.open`` takes ~0.1 ms for the same)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a segment
            pos += 2
            continue
        if marker in _SOF_MARKERS:
            if pos + 9 > end:
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return (width, height) if width and height else None
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        pos += 2 + length
    return None


def _decode_jpeg(encoded: bytes) -> torch.Tensor | None:
    """(3, H, W) uint8 RGB by libjpeg-turbo, or None when it cannot (PIL then decodes or says why not)."""
    try:
        with warnings.catch_warnings():  # a read-only buffer: decode_jpeg only reads it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(encoded, dtype=torch.uint8)
        return decode_jpeg(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return None


def _encoded_bytes(image: Image.Image) -> bytes | None:
    """The encoded file behind a PIL image that is not decoded yet (opened from bytes or from a file)."""
    fp = getattr(image, "fp", None)
    try:
        if isinstance(fp, io.BytesIO):
            return fp.getvalue()  # no copy: the bytes it was made from
        if fp is not None:
            fp.seek(0)
            return fp.read()
    except (OSError, ValueError):
        pass
    return None


def train_transform(
    size: int,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    color_jitter: float | None = 0.4,
    hflip: float = 0.5,
    normalize: bool = True,
) -> TrainTransform:
    """PIL image or JPEG bytes -> (3, size, size) float32: random resized crop, flip, colour jitter, normalise
    (``normalize=False``: uint8, for ``normalize_images`` on the device)."""
    return TrainTransform(size, crop_scale=tuple(crop_scale), color_jitter=color_jitter, hflip=hflip,
                          normalize=normalize)


_NORMALISATION: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), (3, 1, 1) each, taking uint8 levels to ImageNet-normalised values in one multiply-add."""
    if device not in _NORMALISATION:
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
        scale, shift = 1 / (255 * std), -torch.tensor(IMAGENET_MEAN, dtype=torch.float64) / std
        _NORMALISATION[device] = tuple(t.to(device, torch.float32).view(3, 1, 1) for t in (scale, shift))
    return _NORMALISATION[device]


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W), levels 0-255, -> float32 ImageNet-normalised, on their device; images that are
    not uint8 are returned as they are (already normalised)."""
    if images.dtype != torch.uint8:
        return images
    scale, shift = _normalisation(images.device)
    return torch.addcmul(shift, images.float(), scale)


def eval_transform(size: int) -> v2.Compose:
    """PIL image -> (3, size, size) float32: resize to a square (aspect ratio not kept, nothing cropped), normalise."""
    resize = v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True)
    return v2.Compose([to_rgb, resize, *_finish()])
