"""Image transforms: shapes, normalisation, determinism under a seed, flips, and transparency on white."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from evlp.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, jpeg_size, to_rgb, train_transform

WHITE = (torch.ones(3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def _image(size=(40, 30)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_eval_transform_shape_and_normalisation():
    x = eval_transform(24)(_image())
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    white = eval_transform(16)(Image.new("RGB", (20, 20), (255, 255, 255)))
    assert torch.allclose(white, WHITE[:, None, None].expand(3, 16, 16), atol=1e-5)


def test_train_transform_is_reproducible_under_a_seed():
    t = train_transform(24)
    torch.manual_seed(7)
    a = t(_image())
    torch.manual_seed(7)
    b = t(_image())
    torch.manual_seed(8)
    c = t(_image())
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_train_without_augmentation_matches_eval():
    image = _image((32, 32))
    plain = train_transform(32, crop_scale=(1.0, 1.0), color_jitter=0, hflip=0)
    assert len(plain.transforms) == len(train_transform(32).transforms) - 2  # no jitter, no flip
    # A full-area crop of a square image is the whole image; scale 1 allows only aspect ratio 1 here.
    assert torch.allclose(plain(image), eval_transform(32)(image), atol=1e-5)


def test_hflip_parameter():
    image = _image((32, 32))
    flipped = train_transform(32, crop_scale=(1.0, 1.0), color_jitter=None, hflip=1.0)(image)
    assert torch.allclose(flipped, eval_transform(32)(image).flip(-1), atol=1e-5)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(mode):
    if mode == "P":
        image = Image.new("P", (8, 8), 0)
        image.putpalette([0, 0, 0] * 256)
        image.info["transparency"] = 0
    else:
        image = Image.new(mode, (8, 8), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and np.all(np.asarray(rgb) == 255)
    assert torch.allclose(eval_transform(8)(image), WHITE[:, None, None].expand(3, 8, 8), atol=1e-5)


def test_opaque_and_grey_images():
    half = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    assert tuple(np.asarray(to_rgb(half))[0, 0]) == (255, 127, 127)
    grey = to_rgb(Image.new("L", (4, 4), 100))
    assert grey.mode == "RGB" and np.all(np.asarray(grey) == 100)
    assert train_transform(8)(Image.new("I;16", (10, 10), 1000)).shape == (3, 8, 8)


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _photo(size=(96, 64)):
    """Smooth colours, as photos have (JPEG round trips stay close)."""
    low = np.random.default_rng(1).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)


def _fixed(transform, crop, flip=False, jitter=()):
    transform.params = lambda width, height: (crop, flip, list(jitter))
    return transform


def _normalise(x):
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def test_train_transform_matches_torchvision_ops():
    """Crop + resize, flip and each jitter op (in the drawn order) are torchvision's, on the uint8 image."""
    image = _photo()
    crop, jitter = (3, 5, 56, 80), [(2, 1.3), (0, 0.7), (1, 1.35)]  # saturation, brightness, contrast
    t = _fixed(train_transform(32), crop, flip=True, jitter=jitter)
    x = TF.resized_crop(TF.pil_to_tensor(image), *crop, [32, 32], interpolation=TF.InterpolationMode.BICUBIC,
                        antialias=True).flip(-1).float() / 255
    x = TF.adjust_contrast(TF.adjust_brightness(TF.adjust_saturation(x, 1.3), 0.7), 1.35)
    assert torch.allclose(t(image), _normalise(x), atol=1e-4)


def test_jpeg_bytes_and_pil_inputs_agree():
    image = _photo((300, 200))
    data = _jpeg(image, quality=95)

    def seeded(transform, x):
        torch.manual_seed(3)
        return transform(x)

    decoded = Image.open(io.BytesIO(data))
    decoded.load()  # already decoded: PIL's pixels are used
    for size in (128, 64):  # crop < 2 x size: libjpeg-turbo at full size; else a DCT-scaled decode
        t = train_transform(size)
        from_bytes = seeded(t, data)
        assert torch.equal(from_bytes, seeded(t, Image.open(io.BytesIO(data))))
        if size == 128:  # the same pixels, however decoded
            assert torch.allclose(from_bytes, seeded(t, decoded), atol=1e-5)
    png = io.BytesIO()
    image.save(png, format="PNG")
    assert seeded(t, png.getvalue()).shape == (3, 64, 64)  # not a JPEG: PIL decodes


def test_large_jpeg_is_decoded_at_reduced_scale_with_little_change():
    data = _jpeg(_photo((1280, 960)), quality=92)
    crop = (40, 60, 900, 1150)  # top, left, height, width: the DCT-scaled decode is 320 x 240
    fast = _fixed(train_transform(224, color_jitter=0, hflip=0), crop)(data)
    top, left, h, w = crop
    full = Image.open(io.BytesIO(data)).resize((224, 224), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    reference = _normalise(TF.to_dtype(TF.pil_to_tensor(full), torch.float32, scale=True))
    levels = (fast - reference).abs().mean() * 255 * min(IMAGENET_STD)
    assert levels < 2  # mean difference in 8-bit levels


def test_jpeg_size_reads_frame_headers():
    image = _photo((37, 21))
    exif = Image.Exif()
    exif[0x010E] = "x" * 3000  # a large APP1 segment before the frame header
    for data in (_jpeg(image), _jpeg(image.convert("L")), _jpeg(image, progressive=True), _jpeg(image, exif=exif),
                 _jpeg(image.convert("CMYK"))):
        assert jpeg_size(data) == (37, 21)
    png = io.BytesIO()
    image.save(png, format="PNG")
    for data in (png.getvalue(), b"", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF", b"not an image"):
        assert jpeg_size(data) is None
