"""Benchmark data on disk: ImageNet-1K val (zero-shot) and the Karpathy test splits of COCO and Flickr30K (retrieval).

Layouts are the original EV-LP ones (reference §7.5, §7.7, §7.10), relative to ``data_path``:

    imagenet/val/<anything>_<synset>.JPEG        e.g. ILSVRC2012_val_00000001_n01751748.JPEG (50,000 files)
    coco/dataset_coco.json                       Karpathy's caption_datasets.zip; images at coco/<filepath>/<filename>
    flickr30k/dataset_flickr30k.json             same zip; images at flickr30k/flickr30k-images/<filename>

Every loader checks the whole split before anything long runs (all image files present, no empty caption, labels
known) and raises one ``EvlpError`` saying what was expected where. The class names, prompt templates and synset
order ship with the package (``evlp/eval/assets``), so nothing is downloaded and open_clip is not needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from evlp.errors import EvlpError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


# ---------------------------------------------------------------------------------------------------------------
# Packaged ImageNet metadata


def _asset_lines(name: str) -> list[str]:
    return resources.files("evlp.eval").joinpath("assets", name).read_text().splitlines()


def imagenet_classnames() -> list[str]:
    """The 1,000 OpenAI/open_clip class names, in class-index order (998 distinct: two "missile", two "sunglasses")."""
    return _asset_lines("imagenet_classnames.txt")


def openai_imagenet_templates() -> list[str]:
    """The 80 OpenAI prompt templates, as format strings with one ``{}``."""
    return _asset_lines("openai_imagenet_templates.txt")


def imagenet_synsets() -> list[str]:
    """The 1,000 ILSVRC2012 WordNet ids in standard (sorted) order: the class index of a synset is its position."""
    return _asset_lines("imagenet_synsets.txt")


def text_sha256(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Split descriptions


@dataclass
class ImageNetVal:
    """ImageNet val images, their class indices, and what identifies the split."""

    root: Path
    paths: list[Path]
    labels: list[int]
    list_sha256: str  # of the sorted file names, the split's fingerprint (the original has no split file)

    def subset(self, indices: list[int]) -> ImageNetVal:
        return ImageNetVal(self.root, [self.paths[i] for i in indices], [self.labels[i] for i in indices],
                           self.list_sha256)


@dataclass
class RetrievalSplit:
    """One Karpathy split: distinct images, and every caption with the row of the image it describes."""

    dataset: str  # coco | flickr30k
    split: str
    split_file: Path
    split_sha256: str
    image_paths: list[Path]
    captions: list[str]
    caption_image: list[int]  # (M,) row in image_paths of each caption

    def subset(self, rows: list[int]) -> RetrievalSplit:
        """The given images (in that order) and all their captions."""
        new_row = {old: new for new, old in enumerate(rows)}
        keep = [j for j, i in enumerate(self.caption_image) if i in new_row]
        return RetrievalSplit(
            self.dataset, self.split, self.split_file, self.split_sha256,
            [self.image_paths[i] for i in rows], [self.captions[j] for j in keep],
            [new_row[self.caption_image[j]] for j in keep],
        )


# The splits as published (reference §7.5, §7.7): anything else is reported as non-standard.
STANDARD_IMAGENET_VAL = 50_000
STANDARD_TEST_SIZES = {"coco": (5000, 25010), "flickr30k": (1000, 5000)}


class KarpathyLayout(NamedTuple):
    folder: str  # under data_path
    split_file: str  # in that folder
    images: str  # where an entry's image lies, for messages
    image_path: Callable[[Path, dict], Path]  # (dataset folder, split-file entry) -> image file


RETRIEVAL_LAYOUT = {
    "coco": KarpathyLayout("coco", "dataset_coco.json", "<data_path>/coco/<filepath>/<filename>",
                           lambda root, entry: root / entry["filepath"] / entry["filename"]),
    "flickr30k": KarpathyLayout("flickr30k", "dataset_flickr30k.json",
                                "<data_path>/flickr30k/flickr30k-images/<filename> (the licensed "
                                "flickr30k-images.tar.gz: https://forms.illinois.edu/sec/229675)",
                                lambda root, entry: root / "flickr30k-images" / entry["filename"]),
}


def load_karpathy_split(dataset: str, data_path: str | os.PathLike, split: str = "test") -> RetrievalSplit:
    """The ``split`` images and captions of ``dataset`` (``coco`` or ``flickr30k``) from Karpathy's split file.

    Captions are the ``raw`` sentences, in file order; images keep the file's order. Raises ``EvlpError`` when the
    split file is missing or malformed, a caption is empty, or any image file is missing.
    """
    if dataset not in RETRIEVAL_LAYOUT:
        raise EvlpError(f"unknown retrieval dataset {dataset!r}; expected one of {', '.join(RETRIEVAL_LAYOUT)}")
    folder, split_name, images_at, image_path = RETRIEVAL_LAYOUT[dataset]
    root = Path(data_path) / folder
    split_file = root / split_name
    if not split_file.is_file():
        hint = ""
        if (Path(data_path) / split_name).is_file():
            hint = f" ({split_name} is in {data_path} itself: pass its parent folder as the data path)"
        raise EvlpError(f"{dataset}: split file {split_file} not found{hint}; expected <data_path>/{folder}/"
                        f"{split_name} from Karpathy's {KARPATHY_URL}")
    try:
        content = json.loads(split_file.read_text())
        entries = content["images"]
        chosen = [e for e in entries if e["split"] == split]
        if not chosen:
            raise EvlpError(f"{split_file} has no image with split {split!r} (splits found: "
                            f"{', '.join(sorted({e['split'] for e in entries}))})")
        image_paths, captions, caption_image = [], [], []
        for row, entry in enumerate(chosen):
            image_paths.append(image_path(root, entry))
            sentences = entry["sentences"]
            if not sentences:
                raise EvlpError(f"{split_file}: image {entry['filename']} has no caption")
            for k, sentence in enumerate(sentences):
                raw = sentence["raw"].strip()
                if not raw:
                    raise EvlpError(f"{split_file}: caption {k} of image {entry['filename']} is empty")
                captions.append(raw)
                caption_image.append(row)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EvlpError(f"{split_file} is not a Karpathy split file (expected {{'images': [{{'split', 'filename', "
                        f"'sentences': [{{'raw'}}]}}]}}): {type(e).__name__}: {e}") from None
    missing = [p for p in image_paths if not p.is_file()]
    if missing:
        raise EvlpError(f"{len(missing):,} of {len(image_paths):,} {dataset} {split} images are missing (first: "
                        f"{missing[0]}); expected at {images_at}")
    return RetrievalSplit(dataset, split, split_file, file_sha256(split_file), image_paths, captions, caption_image)


def load_imagenet_val(data_path: str | os.PathLike) -> ImageNetVal:
    """ImageNet val from ``<data_path>/imagenet/val/*_<synset>.JPEG``; class index = position of the synset in the
    standard sorted order. Raises ``EvlpError`` for a missing folder, another layout or an unknown synset."""
    return load_imagenet_split(data_path, "val")


IMAGENET_EXAMPLE_NAMES = {"val": "ILSVRC2012_val_00000001_n01751748.JPEG", "train": "n01440764_10026_n01440764.JPEG"}


def load_imagenet_split(data_path: str | os.PathLike, split: str) -> ImageNetVal:
    """ImageNet ``split`` (``val`` or ``train``) from the flat ``<data_path>/imagenet/<split>/*_<synset>.JPEG``
    layout; zero-shot evaluation reads ``val``, image fine-tuning both."""
    root = Path(data_path) / "imagenet" / split
    layout = f"<data_path>/imagenet/{split}/<name>_<synset>.JPEG, e.g. {IMAGENET_EXAMPLE_NAMES.get(split, '')}"
    if not root.is_dir():
        raise EvlpError(f"ImageNet {split} folder {root} not found; expected {layout}")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    files = [e for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        folders = [e.name for e in entries if e.is_dir()]
        found = (f"it holds {len(folders)} sub-folders (e.g. {folders[0]}/): the class-folder layout; move the images "
                 f"up into {root}, appending _<synset> to each name" if folders else "it holds no image")
        raise EvlpError(f"{root}: {found}; expected {layout}")
    index = {s: i for i, s in enumerate(imagenet_synsets())}
    paths, labels, unknown = [], [], []
    for e in files:
        synset = Path(e.name).stem.rsplit("_", 1)[-1]
        if synset in index:
            paths.append(Path(e.path))
            labels.append(index[synset])
        else:
            unknown.append(e.name)
    if unknown:
        raise EvlpError(f"{len(unknown):,} of {len(files):,} files in {root} are not named <name>_<synset> with an "
                        f"ILSVRC2012 synset (first: {unknown[0]}); expected {layout}")
    names = "\n".join(e.name for e in files)
    return ImageNetVal(root, paths, labels, hashlib.sha256(names.encode()).hexdigest())


def fixed_subset(total: int, limit: int | None, seed: int = 0) -> list[int]:
    """``limit`` of ``range(total)`` drawn with a fixed seed (sorted), or all of them: the same subset at every call,
    so the numbers of successive validations compare."""
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


# ---------------------------------------------------------------------------------------------------------------
# Loading images


class ImageFiles(Dataset):
    """Map-style dataset over image files: ``{"image": transform(PIL), "meta": {"index": i}}``.

    Map-style (not shards) so a DataLoader's workers split the files and the order is the list's.
    """

    def __init__(self, paths: list[Path], transform):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        try:
            with Image.open(self.paths[i]) as image:
                image.load()
                return {"image": self.transform(image), "meta": {"index": i}}
        except OSError as e:
            raise EvlpError(f"cannot read image {self.paths[i]}: {e}") from None


def collate_images(items: list[dict]) -> dict:
    """Stack the images and keep ``meta`` as a list of dicts (what ``embed_images`` expects)."""
    return {"image": torch.stack([item["image"] for item in items]), "meta": [item["meta"] for item in items]}


def image_loader(paths: list[Path], transform, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(
        ImageFiles(paths, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_images, pin_memory=torch.cuda.is_available(), persistent_workers=False,
    )
