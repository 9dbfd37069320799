"""The embedded quickstart dataset: procedurally drawn scenes of coloured shapes with natural-language captions.

Every image shows one group of identical objects on a light, plain or mottled background. A group has five
attributes, each stored in the sample's JSON metadata and spelled out in its caption:

    shape     circle, square, triangle, star, cross
    colour    red, green, blue, yellow, purple, orange
    size      small, large
    count     one, two, three
    position  a cell of a 3x3 grid: top left, top, top right, left, centre, right, bottom left, bottom, bottom right

e.g. "two small red circles at the top left" or "In the centre of the picture you can see a large blue square."

The metadata also holds ``image_id`` (the index within the split) and ``boxes``, the pixel bounding boxes of the
objects' circumscribed circles. Sample ``i`` of a split is drawn from its own ``random.Random`` seeded with
``(seed, split, i)``, so it is the same whatever order or process produces it. ``prepare_quickstart`` writes the
splits as WebDataset shards (``png`` image, exact pixels; ``txt`` caption, one per image; ``json`` metadata) plus a
WordPiece vocabulary covering every caption and zero-shot prompt, so a tiny model can be trained and evaluated end
to end without any download:

    data = prepare_quickstart("/tmp/quickstart", num_train=6000, num_val=500)
    tokenizer = load_tokenizer(data.vocab_dir)
    for task in zero_shot_tasks(): ...
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import webdataset as wds
from PIL import Image, ImageDraw

# Bump when the drawing or the captions change: prepared data with another version is regenerated.
GENERATOR_VERSION = 1

SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}
SIZES = ("small", "large")
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
# Object diameter as a fraction of the image side; the two sizes are far apart so "small"/"large" stay unambiguous.
DIAMETERS = {"small": 0.13, "large": 0.22}
COUNTS = (1, 2, 3)
COUNT_WORDS = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
# Grid cells in reading order, with the ways a caption may name each of them.
POSITIONS = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
POSITION_PHRASES = {
    "top left": ("at the top left", "in the top left corner", "in the upper left corner"),
    "top": ("at the top", "near the top"),
    "top right": ("at the top right", "in the top right corner", "in the upper right corner"),
    "left": ("on the left", "on the left side"),
    "centre": ("in the centre", "in the center", "in the middle"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left corner"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right corner"),
}
PICTURE_WORDS = ("picture", "image")
# `{n}` count word, `{np}` noun phrase, `{pos}` position phrase, `{be}` is/are, `{view}` "a picture" etc.
CAPTION_TEMPLATES = (
    "{n} {np} {pos}",
    "{n} {np} {pos}.",
    "{view} of {n} {np} {pos}.",
    "there {be} {n} {np} {pos}.",
    "{pos} there {be} {n} {np}.",
    "{pos} you can see {n} {np}.",
    "{n} {np} {pos} on a plain background.",
    "{view} showing {n} {np} {pos}.",
)
VIEWS = ("a picture", "an image", "a drawing", "a photo")

# Object offsets within a group, in units of the centre-to-centre spacing. Spacing exceeds the diameter, so objects
# never touch and the count stays readable. Only arrangements that fit the cell are drawn (see `_place_group`).
_H = math.sqrt(3) / 2
ARRANGEMENTS = {
    1: (((0.0, 0.0),),),
    2: (
        ((-0.5, 0.0), (0.5, 0.0)),
        ((0.0, -0.5), (0.0, 0.5)),
        ((-0.35, -0.35), (0.35, 0.35)),
        ((-0.35, 0.35), (0.35, -0.35)),
    ),
    3: (
        ((-1.0, 0.0), (0.0, 0.0), (1.0, 0.0)),
        ((0.0, -1.0), (0.0, 0.0), (0.0, 1.0)),
        ((-0.5, _H / 2), (0.5, _H / 2), (0.0, -_H / 2)),
        ((-0.5, -_H / 2), (0.5, -_H / 2), (0.0, _H / 2)),
    ),
}
SPACING = 1.3  # centre-to-centre distance / diameter
SIZE_JITTER = 0.05  # relative
SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered down: cheap anti-aliasing


@dataclass
class SyntheticSample:
    image: Image.Image  # RGB, image_size x image_size
    caption: str
    meta: dict


@dataclass
class QuickstartData:
    """Where ``prepare_quickstart`` put the data: shard paths, sample counts and the tokenizer folder."""

    root: Path
    train_urls: list[str]
    val_urls: list[str]
    num_train: int
    num_val: int
    vocab_dir: Path


@dataclass(frozen=True)
class ZeroShotTask:
    """A zero-shot classification task over one metadata attribute.

    Class names are written to be dropped into the templates as they are (``template.format(classname)``), which is
    why the count and position classes read "two shapes" and "at the top left".
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]  # each with one `{}` for the class name
    attribute: str  # metadata key
    values: tuple  # metadata value of each class

    def label(self, meta: dict) -> int | None:
        """The class index of a sample, or None when its metadata does not have this attribute."""
        value = meta.get(self.attribute)
        return self.values.index(value) if value in self.values else None


def zero_shot_tasks() -> list[ZeroShotTask]:
    """One task per attribute; prompts use the words and phrasings of the training captions."""
    return [
        ZeroShotTask(
            "shape", SHAPES,
            ("a picture of a {}.", "an image of a {}.", "a drawing of a {}.", "there is a {} in the picture.",
             "a {} on a plain background."),
            "shape", SHAPES,
        ),
        ZeroShotTask(
            "colour", tuple(COLOURS),
            ("a picture of a {} shape.", "an image of a {} shape.", "a drawing of {} shapes.",
             "there is a {} shape in the picture.", "{} shapes on a plain background."),
            "colour", tuple(COLOURS),
        ),
        ZeroShotTask(
            "size", SIZES,
            ("a picture of a {} shape.", "an image of {} shapes.", "a drawing of a {} shape.",
             "there is a {} shape in the picture."),
            "size", SIZES,
        ),
        ZeroShotTask(
            "count", ("one shape", "two shapes", "three shapes"),
            ("a picture of {}.", "an image of {}.", "a drawing of {}.", "{} on a plain background."),
            "count", COUNTS,
        ),
        ZeroShotTask(
            "position", tuple(POSITION_PHRASES[p][0] for p in POSITIONS),
            ("a picture of a shape {}.", "an image with shapes {}.", "there is a shape {} of the picture.",
             "a drawing of shapes {}."),
            "position", POSITIONS,
        ),
    ]  # fmt: skip


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    # String seeds go through SHA-512: stable across processes and Python versions, independent of PYTHONHASHSEED.
    return random.Random(f"evlp-quickstart/{seed}/{split}/{index}")


def generate_sample(index: int, *, seed: int = 0, split: str = "train", image_size: int = 64) -> SyntheticSample:
    """Draw sample ``index`` of ``split``; a pure function of its arguments."""
    rng = sample_rng(seed, split, index)
    shape, colour, size = rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(SIZES)
    count, position = rng.choice(COUNTS), rng.choice(POSITIONS)
    meta = dict(image_id=index, shape=shape, colour=colour, size=size, count=count, position=position)
    image, boxes = _render(rng, meta, image_size)
    meta["boxes"] = boxes
    return SyntheticSample(image, describe(meta, rng), meta)


def describe(meta: dict, rng: random.Random) -> str:
    """A caption naming every attribute of ``meta``, in one of several phrasings."""
    count = meta["count"]
    noun = meta["shape"] if count == 1 else PLURALS[meta["shape"]]
    if rng.random() < 0.25:
        noun = f"{meta['shape']} {'shape' if count == 1 else 'shapes'}"
    phrase = f"{rng.choice(SIZE_WORDS[meta['size']])} {meta['colour']} {noun}"
    pos = rng.choice(POSITION_PHRASES[meta["position"]])
    template = rng.choice(CAPTION_TEMPLATES)
    if rng.random() < 0.4 and "{view}" not in template:  # not "a picture of ... of the picture"
        pos = f"{pos} of the {rng.choice(PICTURE_WORDS)}"
    caption = template.format(
        n=rng.choice(COUNT_WORDS[count]), np=phrase, pos=pos, be="is" if count == 1 else "are", view=rng.choice(VIEWS)
    )
    return caption[0].upper() + caption[1:] if rng.random() < 0.5 else caption


def _render(rng: random.Random, meta: dict, size: int) -> tuple[Image.Image, list[list[float]]]:
    image = _background(rng, size)
    diameter = DIAMETERS[meta["size"]] * size * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    centres = _place_group(rng, meta["count"], POSITIONS.index(meta["position"]), diameter, size)

    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    r = diameter / 2
    for x, y in centres:
        _draw_shape(draw, meta["shape"], x * SUPERSAMPLE, y * SUPERSAMPLE, r * SUPERSAMPLE, rng.uniform(-15, 15))
    colour = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[meta["colour"]])
    image.paste(colour, mask=mask.reduce(SUPERSAMPLE))
    boxes = [[round(x - r, 1), round(y - r, 1), round(x + r, 1), round(y + r, 1)] for x, y in centres]
    return image, boxes


def _background(rng: random.Random, size: int) -> Image.Image:
    # Light, nearly grey tints keep every object colour clearly visible.
    grey = rng.randint(175, 240)
    tint = tuple(min(255, grey + rng.randint(-10, 10)) for _ in range(3))
    image = Image.new("RGB", (size, size), tint)
    if rng.random() < 0.5:
        # Smooth low-amplitude mottling: a few random grey levels upsampled bilinearly.
        cells = rng.randint(3, 8)
        noise = Image.frombytes("L", (cells, cells), rng.randbytes(cells * cells))
        noise = noise.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
        image = Image.blend(image, noise, rng.uniform(0.05, 0.15))
    return image


def _place_group(rng: random.Random, count: int, cell: int, diameter: float, size: int) -> list[tuple[float, float]]:
    """Object centres (pixels) for a group whose centre lies in grid ``cell`` and which fits inside the image."""
    third = size / 3
    row, col = divmod(cell, 3)
    spacing = SPACING * diameter
    margin = size / 32  # keeps the group centre clearly inside its cell
    fitting = []
    for offsets in ARRANGEMENTS[count]:
        # Allowed range of the group centre on each axis: inside the cell and far enough from the image border.
        ranges = []
        for axis, index in ((0, col), (1, row)):
            half = max(abs(o[axis]) for o in offsets) * spacing + diameter / 2
            lo, hi = max(index * third + margin, half), min((index + 1) * third - margin, size - half)
            ranges.append((lo, hi))
        if all(lo <= hi for lo, hi in ranges):
            fitting.append((offsets, ranges))
    # A compact arrangement (single object, diagonal pair, triangle) always fits, whatever the cell and size.
    offsets, ranges = rng.choice(fitting)
    centre = []
    for (lo, hi), index in zip(ranges, (col, row)):
        middle = (index + 0.5) * third
        centre.append(min(hi, max(lo, middle + rng.uniform(-third / 4, third / 4))))
    return [(centre[0] + ox * spacing, centre[1] + oy * spacing) for ox, oy in offsets]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, angle: float) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        return
    if shape == "square":
        points = [(r, 45 + 90 * k) for k in range(4)]
    elif shape == "triangle":
        points = [(r, -90 + 120 * k) for k in range(3)]
    elif shape == "star":
        points = [(r if k % 2 == 0 else 0.45 * r, -90 + 36 * k) for k in range(10)]
    else:  # cross: a plus sign with arms of width 0.6 r, its corners on the circle of radius r
        w, e = 0.3 * r, 0.95 * r
        corners = [(w, e), (w, w), (e, w), (e, -w), (w, -w), (w, -e), (-w, -e), (-w, -w), (-e, -w), (-e, w), (-w, w),
                   (-w, e)]  # fmt: skip
        points = [(math.hypot(px, py), math.degrees(math.atan2(py, px))) for px, py in corners]
    polygon = [
        (x + d * math.cos(math.radians(a + angle)), y + d * math.sin(math.radians(a + angle))) for d, a in points
    ]
    draw.polygon(polygon, fill=255)


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Level 1 encodes twice as fast as the default level 6 for ~25% more bytes (about 1.6 KB per 64x64 image).
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _words(text: str) -> list[str]:
    # What BERT's basic tokenizer produces for lower-case ASCII text: runs of letters/digits and single punctuation.
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def vocabulary() -> list[str]:
    """The WordPiece vocabulary: special tokens ([PAD] = 0), every caption and prompt word, and single characters.

    Single letters and digits (plus their ``##`` continuations) let any other lower-case word be spelled out
    instead of collapsing to [UNK].
    """
    texts = [*SHAPES, *PLURALS.values(), *COLOURS, *PICTURE_WORDS, *VIEWS]
    texts += ["is are", "shape shapes", "of the"]  # what `describe` writes around the tables' words
    texts += [w for words in SIZE_WORDS.values() for w in words]
    texts += [w for words in COUNT_WORDS.values() for w in words]
    texts += [p for phrases in POSITION_PHRASES.values() for p in phrases] + list(POSITIONS)
    texts += [re.sub(r"\{\w*\}", " ", t) for t in CAPTION_TEMPLATES]
    for task in zero_shot_tasks():
        texts += [t.format(c) for t in task.templates for c in task.classnames]
    words = sorted({w for text in texts for w in _words(text)})
    chars = [*"abcdefghijklmnopqrstuvwxyz0123456789"]
    punctuation = [*".,;:!?'\"()-/&"]
    pieces = [*punctuation, *chars, *(f"##{c}" for c in chars)]
    return [*SPECIAL_TOKENS, *pieces, *(w for w in words if w not in pieces)]


def write_vocab(directory: str | os.PathLike) -> Path:
    """Write ``vocab.txt`` and ``tokenizer_config.json`` for ``AutoTokenizer.from_pretrained(directory)``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": 512,
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    _write_if_changed(directory / "vocab.txt", "\n".join(vocabulary()) + "\n")
    _write_if_changed(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return directory


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Shards


def prepare_quickstart(
    root: str | os.PathLike,
    num_train: int,
    num_val: int,
    image_size: int = 64,
    shard_size: int = 1000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> QuickstartData:
    """Write (or find already written) the quickstart shards and vocabulary under ``root``.

    Layout: ``root/{train,val}/{000000..}.tar`` + ``stats.json``, ``root/vocab/``. A split whose ``stats.json``
    records the same parameters and whose shards all exist is left untouched; otherwise it is regenerated from
    scratch. Shards are written under a temporary name and renamed, and ``stats.json`` is written last, so an
    interrupted run is redone rather than mistaken for a complete one. ``progress`` receives one line per split
    that is (re)generated.
    """
    if num_train < 1 or num_val < 1 or image_size < 16 or shard_size < 1:
        raise ValueError("quickstart needs num_train, num_val, shard_size >= 1 and image_size >= 16")
    root = Path(root)
    urls = {}
    for split, n in (("train", num_train), ("val", num_val)):
        params = dict(version=GENERATOR_VERSION, seed=seed, image_size=image_size, shard_size=shard_size)
        urls[split] = _prepare_split(root / split, split, n, params, progress)
    return QuickstartData(root, urls["train"], urls["val"], num_train, num_val, write_vocab(root / "vocab"))


def _prepare_split(directory: Path, split: str, n: int, params: dict, progress) -> list[str]:
    shard_size = params["shard_size"]
    names = [f"{k:06d}.tar" for k in range(math.ceil(n / shard_size))]
    stats_path = directory / "stats.json"
    if stats_path.exists():
        try:
            stats = json.loads(stats_path.read_text())
        except json.JSONDecodeError:
            stats = {}
        if (
            stats.get("params") == params
            and stats.get("num_samples") == n
            and all((directory / name).is_file() for name in names)
        ):
            return [str(directory / name) for name in names]
    if progress is not None:
        progress(f"generating {n} quickstart {split} samples in {directory}")

    directory.mkdir(parents=True, exist_ok=True)
    stats_path.unlink(missing_ok=True)
    # Leftovers of an interrupted or differently sized run must not be picked up by a `*.tar` glob.
    for stale in directory.iterdir():
        if stale.name.endswith(".tmp") or (stale.suffix == ".tar" and stale.name not in names):
            stale.unlink()
    counts = {}
    for k, name in enumerate(names):
        indices = range(k * shard_size, min(n, (k + 1) * shard_size))
        tmp = directory / f"{name}.{os.getpid()}.tmp"
        # Fixed mtime, user and group: the shard bytes depend on the samples only.
        with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, user="evlp", group="evlp") as sink:
            for i in indices:
                s = generate_sample(i, seed=params["seed"], split=split, image_size=params["image_size"])
                sink.write(
                    {
                        "__key__": f"{i:08d}",
                        "png": _encode_png(s.image),
                        "txt": s.caption.encode(),
                        "json": json.dumps(s.meta).encode(),
                    }
                )
        os.replace(tmp, directory / name)
        counts[name] = len(indices)
    stats = dict(num_samples=n, shards=counts, params=params)
    _write_if_changed(stats_path, json.dumps(stats, indent=2) + "\n")
    return [str(directory / name) for name in names]
