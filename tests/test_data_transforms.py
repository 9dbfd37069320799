"""Image transforms: shapes, normalisation, determinism under a seed, flips, and transparency on white."""

import numpy as np
import pytest
import torch
from PIL import Image

from evlp.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, to_rgb, train_transform

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
