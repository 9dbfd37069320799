"""ImageNet-1K from the Hugging Face hub (gated: accept the terms at https://huggingface.co/datasets/ILSVRC/imagenet-1k
and log in), extracted into the flat folders the zero-shot evaluation reads::

    imagenet/train/<...>_<synset>.JPEG     1,281,167 files
    imagenet/val/ILSVRC2012_val_<n>_<synset>.JPEG   50,000 files

The hub's ``data/train_images_*.tar.gz`` and ``data/val_images.tar.gz`` (~150 GB) are downloaded resumably into
``imagenet/data/``, extracted safely one by one, and deleted once extracted (``keep_archives`` keeps them). An empty
marker ``imagenet/.extracted/<archive>`` records each finished extraction, so a rerun neither downloads nor extracts
that archive again; an archive interrupted mid-extraction is extracted again (files are overwritten).
"""

from __future__ import annotations

import os
from pathlib import Path

from evlp.data.archives import extract_tar
from evlp.data.hub import fetch_snapshot
from evlp.errors import EvlpError

REPO = "ILSVRC/imagenet-1k"
ALLOW_PATTERNS = ["data/train_images_*", "data/val_images*"]
EXPECTED = {"train": 1_281_167, "val": 50_000}


def download_imagenet(data_path: str | os.PathLike, *, token: str | None = None, keep_archives: bool = False) -> str:
    """Download and extract ImageNet-1K train and val; returns the summary line."""
    root = Path(data_path) / "imagenet"
    counts = {split: _count_images(root / split) for split in EXPECTED}
    if counts == EXPECTED:
        return f"imagenet: already prepared in {root} ({_describe(counts)})"
    markers = root / ".extracted"
    extracted = {p.name for p in markers.iterdir()} if markers.is_dir() else set()
    fetch_snapshot(REPO, root, ALLOW_PATTERNS, ignore_patterns=[f"data/{name}" for name in sorted(extracted)],
                   token=token)
    archives = sorted(p for p in (root / "data").glob("*.tar.gz") if p.name not in extracted and _split(p.name))
    if not archives and not extracted:
        raise EvlpError(f"no train_images_*.tar.gz or val_images.tar.gz arrived from {REPO} in {root / 'data'}")
    markers.mkdir(parents=True, exist_ok=True)
    for archive in archives:
        extract_tar(archive, root / _split(archive.name))
        (markers / archive.name).touch()
        if not keep_archives:
            archive.unlink()
    counts = {split: _count_images(root / split) for split in EXPECTED}
    line = f"imagenet: {_describe(counts)} in {root}"
    if counts != EXPECTED:
        line += f" (the full dataset has {_describe(EXPECTED)})"
    return line


def _split(name: str) -> str | None:
    if name.startswith("train_images"):
        return "train"
    if name.startswith("val_images"):
        return "val"
    return None


def _count_images(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    with os.scandir(folder) as entries:
        return sum(1 for e in entries if e.name.endswith(".JPEG"))


def _describe(counts: dict) -> str:
    return ", ".join(f"{n:,} {split}" for split, n in counts.items()) + " images"
