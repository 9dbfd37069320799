"""COCO and Flickr30K with the Karpathy splits: the raw files (read by evaluation) and WebDataset shards (training).

    evlp download coco --data-path /data        # train2014.zip, val2014.zip, caption_datasets.zip
    evlp download flickr30k --data-path /data   # after placing flickr30k-images/ in /data/flickr30k/

Layout::

    coco/train2014/*.jpg, coco/val2014/*.jpg, coco/dataset_coco.json
    coco/shards/{train,val,test}/       train = Karpathy train + restval
    flickr30k/flickr30k-images/*.jpg, flickr30k/dataset_flickr30k.json
    flickr30k/shards/{train,val,test}/

One sample per caption; ``image_id`` is the COCO id (``cocoid``) or the Flickr photo id (the file name), the same for
all captions of an image, so retrieval can group them. Within each block of ``shard_size`` images the samples come
caption by caption (every image's first caption, then every second caption, ...): a shard then holds ~one caption
per image instead of five neighbours that a contrastive batch would wrongly treat as negatives of each other, and
each image is still decoded once. Archives are downloaded resumably and removed once extracted (``keep_archives``
keeps them); a folder that exists is taken as extracted (each is moved into place only when complete).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from evlp.data.archives import extract_zip
from evlp.data.imaging import ImageOptions
from evlp.data.pipeline import Row, RunResult, build_shards, rows_to_do
from evlp.data.shardwriter import ShardFolder
from evlp.errors import EvlpError
from evlp.pretrained.download import download_file

COCO_BASE_URL = "http://images.cocodataset.org/zips/"
KARPATHY_BASE_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/"
FLICKR_FORM = "https://forms.illinois.edu/sec/229675"
SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def download_coco(
    data_path: str | os.PathLike,
    *,
    base_url: str | None = None,
    shard_size: int = 1000,
    image_options: ImageOptions = ImageOptions(),
    workers: int | None = None,
    keep_archives: bool = False,
) -> list[RunResult]:
    """Fetch and extract COCO 2014 and the Karpathy split, then write ``coco/shards/{train,val,test}``."""
    root = Path(data_path) / "coco"
    annotations = fetch_coco_files(data_path, base_url=base_url, keep_archives=keep_archives)
    return write_caption_shards(
        "coco", annotations, root, lambda image: f"{image['filepath']}/{image['filename']}",
        lambda image: image["cocoid"], shard_size=shard_size, image_options=image_options, workers=workers,
    )  # fmt: skip


def download_flickr30k(
    data_path: str | os.PathLike,
    *,
    base_url: str | None = None,
    shard_size: int = 1000,
    image_options: ImageOptions = ImageOptions(),
    workers: int | None = None,
    keep_archives: bool = False,
) -> list[RunResult]:
    """Fetch the Karpathy split of Flickr30K and write ``flickr30k/shards/{train,val,test}`` from the user's images."""
    root = Path(data_path) / "flickr30k"
    images = check_flickr30k_images(data_path)
    annotations = _karpathy_json(root, "dataset_flickr30k.json", base_url, keep_archives)
    return write_caption_shards(
        "flickr30k", annotations, images, lambda image: image["filename"], _flickr_id,
        shard_size=shard_size, image_options=image_options, workers=workers,
    )  # fmt: skip


def fetch_coco_files(
    data_path: str | os.PathLike, *, base_url: str | None = None, keep_archives: bool = False
) -> Path:
    """The raw COCO 2014 images (``coco/train2014``, ``coco/val2014``) and ``coco/dataset_coco.json``, each fetched
    only when missing, without writing shards (what retrieval fine-tuning and evaluation read); returns the split
    file."""
    root = Path(data_path) / "coco"
    for name in ("train2014", "val2014"):
        if not (root / name).is_dir():
            archive = _download(base_url or COCO_BASE_URL, f"{name}.zip", root)
            _extract_folder(archive, root, name)
            if not keep_archives:
                archive.unlink()
    return _karpathy_json(root, "dataset_coco.json", base_url, keep_archives)


def check_flickr30k_images(data_path: str | os.PathLike) -> Path:
    """``<data_path>/flickr30k/flickr30k-images``, or the EvlpError that says how to get the (licensed) images."""
    images = Path(data_path) / "flickr30k" / "flickr30k-images"
    if not images.is_dir():
        raise EvlpError(
            f"{images} not found. Flickr30K's images are not public: request access at {FLICKR_FORM}, download "
            f"flickr30k-images.tar.gz, unpack it so that {images}/ holds the .jpg files, and rerun"
        )
    return images


def fetch_flickr30k_split(
    data_path: str | os.PathLike, *, base_url: str | None = None, keep_archives: bool = False
) -> Path:
    """``flickr30k/dataset_flickr30k.json``, fetched when missing (after checking that the user's images are there)."""
    check_flickr30k_images(data_path)
    return _karpathy_json(Path(data_path) / "flickr30k", "dataset_flickr30k.json", base_url, keep_archives)


def _flickr_id(image: dict) -> int:
    stem = Path(image["filename"]).stem
    return int(stem) if stem.isdigit() else image["imgid"]


def _download(base_url: str, name: str, root: Path) -> Path:
    archive = root / name
    if archive.is_file():  # download_file renames only complete files: this one is whole
        return archive
    return download_file(base_url.rstrip("/") + "/" + name, archive)


def _extract_folder(archive: Path, root: Path, name: str) -> None:
    """Extract ``archive`` (whose top folder is ``name``) into ``root/name``, which appears only when complete."""
    with _staging(root / f".{name}.extracting") as tmp:
        extract_zip(archive, tmp)
        if not (tmp / name).is_dir():
            raise EvlpError(f"{archive} has no top folder {name}/: not the expected archive")
        os.replace(tmp / name, root / name)


@contextmanager
def _staging(tmp: Path) -> Iterator[Path]:
    """An empty folder to extract into, removed afterwards whether or not the extraction succeeded (a failed one
    leaves nothing that a rerun would trip over)."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _karpathy_json(root: Path, member: str, base_url: str | None, keep_archives: bool) -> Path:
    target = root / member
    if target.is_file():
        return target
    archive = _download(base_url or KARPATHY_BASE_URL, "caption_datasets.zip", root)
    with _staging(root / ".karpathy.extracting") as tmp:
        extract_zip(archive, tmp, members=[member])
        os.replace(tmp / member, target)
    if not keep_archives:
        archive.unlink()
    return target


def load_karpathy(path: Path) -> list[dict]:
    """The ``images`` of a Karpathy split file, checked for the fields used here."""
    problem = f"{path} is not a Karpathy split file"
    try:
        images = json.loads(path.read_text())["images"]
        valid = all(
            isinstance(image["filename"], str)
            and isinstance(image["split"], str)
            and all(isinstance(sentence["raw"], str) for sentence in image["sentences"])
            for image in images
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvlpError(f"{problem} ({type(e).__name__}: {e}); delete it and rerun") from e
    if not valid:
        raise EvlpError(f"{problem} (a filename, split or caption is not a string); delete it and rerun")
    return images


def write_caption_shards(
    name: str,
    annotations: Path,
    image_root: Path,
    image_path: Callable[[dict], str],
    image_id: Callable[[dict], int],
    *,
    shard_size: int,
    image_options: ImageOptions,
    workers: int | None,
) -> list[RunResult]:
    """Shards of every Karpathy split into ``<annotations folder>/shards/<split>``, one sample per caption."""
    images = load_karpathy(annotations)
    results = []
    for split, karpathy_splits in SPLITS.items():
        chosen = [image for image in images if image["split"] in karpathy_splits]
        if not chosen:
            raise EvlpError(f"{annotations} lists no image of split {'/'.join(karpathy_splits)}")
        present = sum((image_root / image_path(image)).is_file() for image in chosen[:100])
        if present == 0:
            raise EvlpError(f"none of the first images of {annotations.name} ({image_path(chosen[0])}, ...) is in "
                            f"{image_root}: is the image folder complete, and not nested one level deeper?")
        num_pairs = sum(len(image["sentences"]) for image in chosen)
        params = dict(
            source=f"{annotations.name} {split}",
            images=len(chosen),
            pairs=num_pairs,
            **image_options.params(),
        )
        folder_path = annotations.parent / "shards" / split
        with ShardFolder(folder_path, shard_size, params, info=dict(dataset=name, split=split)) as folder:
            results.append(build_shards(
                _caption_rows(chosen, shard_size, image_root, image_path, image_id),
                folder,
                label=f"{name} {split}",
                image_options=image_options,
                concurrency=2 * (workers or os.cpu_count() or 1),
                workers=workers,
                total=rows_to_do(num_pairs, folder),
                reuse=2 * shard_size,
            ))  # fmt: skip
    return results


def _caption_rows(images, block, image_root, image_path, image_id) -> Iterator[Row]:
    """One row per caption, caption-major within each block of ``block`` images (see the module docstring)."""
    index = 0
    for start in range(0, len(images), block):
        group = images[start : start + block]
        for r in range(max(len(image["sentences"]) for image in group)):
            for image in group:
                if r < len(image["sentences"]):
                    sentence = image["sentences"][r]
                    meta = dict(image_id=image_id(image), filename=image["filename"], sentid=sentence.get("sentid"))
                    yield Row(index, str(image_root / image_path(image)), sentence["raw"].strip(), meta)
                    index += 1
