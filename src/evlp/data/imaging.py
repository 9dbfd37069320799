"""Bytes from the web or a disk -> a training JPEG: decoded defensively, upright, RGB, shorter side resized.

``prepare_image`` either returns the re-encoded image or raises ``Rejected`` with one of a few reasons, which the
downloaders count per shard; it never lets a decoder error escape. The reasons:

    not_an_image   nothing Pillow recognises: an HTML error page served with status 200, an empty body, JSON, ...
    decode_error   a recognised image that fails to decode: truncated, corrupt
    too_small      shorter side below ``min_size`` (the default 2 drops the 1-pixel placeholders of removed images)
    too_large      more pixels than ``max_pixels`` (decompression bombs; Pillow's own limit by default)

Everything else is converted: CMYK, palette, transparency (composited on white by ``to_rgb``), 16-bit greyscale
(scaled by ``to_rgb``), EXIF rotation (applied, since the metadata is not kept).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from evlp.data.transforms import to_rgb


class Rejected(Exception):
    """A row that cannot become a sample; ``reason`` is the key it is counted under in the stats files."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


MIN_SIZE = 2  # the shorter side below which an image is a placeholder, not a picture
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's own bomb limit (it only warns up to twice this)


def size_problem(width: int, height: int, min_size: int = MIN_SIZE, max_pixels: int = MAX_PIXELS) -> str | None:
    """``too_small``, ``too_large`` or None for an image of this size (from its header, before decoding): the
    limits of ``data convert``, which the training loader applies as well."""
    if min(width, height) < min_size:
        return "too_small"
    if width * height > max_pixels:
        return "too_large"
    return None


@dataclass(frozen=True)
class ImageOptions:
    size: int = 256  # shorter side after resizing (never enlarged); 0 keeps the original size
    min_size: int = MIN_SIZE
    quality: int = 95
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        if self.size < 0 or self.min_size < 1 or not 1 <= self.quality <= 100 or self.max_pixels < 1:
            raise ValueError(f"invalid image options {self}")

    def params(self) -> dict:
        """What a shard folder records of these options, so that a rerun with other options does not reuse it."""
        return dict(image_size=self.size, min_size=self.min_size, quality=self.quality)


@dataclass(frozen=True)
class PreparedImage:
    jpeg: bytes
    width: int  # of the stored JPEG
    height: int
    original_width: int  # as served (before EXIF rotation and resizing)
    original_height: int
    original_format: str
    source_sha256: bytes = b""  # of the bytes as read or served: what a held-out split is decided by


def prepare_image(data: bytes, options: ImageOptions) -> PreparedImage:
    if not data:
        raise Rejected("not_an_image", "empty body")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected("too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise Rejected("not_an_image", str(e)) from e
    except Exception as e:  # Pillow's header parsers raise anything (SyntaxError, struct.error, ...) on junk
        raise Rejected("decode_error", f"{type(e).__name__}: {e}") from e
    with image:
        width, height = image.size
        problem = size_problem(width, height, options.min_size, options.max_pixels)
        if problem:
            raise Rejected(problem, f"{width}x{height}")
        original_format = image.format or "unknown"
        try:
            rgb = _decode_rgb(image, options.size)
        except Exception as e:  # decoders fail in many ways on truncated or corrupt data; the row is dropped
            raise Rejected("decode_error", f"{type(e).__name__}: {e}") from e
    rgb = _resize_shorter_side(rgb, options.size)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=options.quality)
    return PreparedImage(buffer.getvalue(), *rgb.size, width, height, original_format, hashlib.sha256(data).digest())


def _decode_rgb(image: Image.Image, size: int) -> Image.Image:
    if size and image.format == "JPEG":
        # libjpeg can decode at 1/2, 1/4 or 1/8 scale directly: several times faster for large photos. draft()
        # keeps both sides at least as large as asked, so the shorter side stays >= size.
        short = min(image.size)
        if short > size:
            image.draft(None, (image.width * size // short, image.height * size // short))
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short = min(width, height)
    if not size or short <= size:
        return image
    target = (max(1, round(width * size / short)), max(1, round(height * size / short)))
    # Bicubic, the filter of the training transforms (Lanczos costs ~1.5x the time for no visible gain at this
    # size); reducing_gap: a cheap box reduction first, bicubic only over the last factor of 3.
    return image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
