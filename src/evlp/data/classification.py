"""Image classification data for fine-tuning: ImageNet-1K from its flat folders and CIFAR-10/100 from the official
python tarballs (downloaded when missing).

Layouts, relative to ``data_path``::

    imagenet/train/<name>_<synset>.JPEG            1,281,167 files (`evlp download imagenet` writes this)
    imagenet/val/<name>_<synset>.JPEG              50,000 files
    cifar10/cifar-10-batches-py/data_batch_{1..5}, test_batch
    cifar100/cifar-100-python/train, test

CIFAR comes from https://www.cs.toronto.edu/~kriz/ (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``): the
tarball is downloaded resumably to ``<data_path>/cifar10/`` (``cifar100/``), checked against its published MD5,
extracted safely into a temporary folder that is renamed into place once complete (so a half-extracted folder never
looks like a dataset) and deleted. ``base_url`` (``data.download_url``) points at a mirror holding the same files.

The batches are pickled dicts of bytes keys, lists and numpy arrays. They are read with :class:`NumpyUnpickler`,
which can build numpy arrays and nothing else: plain ``pickle.load`` would run whatever callable a tampered file
names. CIFAR's test split is the validation set, as in the original (reference §7.7).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from evlp.errors import EvlpError

log = logging.getLogger("evlp")

CIFAR_BASE_URL = "https://www.cs.toronto.edu/~kriz"


@dataclass(frozen=True)
class CifarLayout:
    archive: str  # the official tarball's name
    md5: str  # published by the dataset's page (and torchvision)
    folder: str  # what the tarball extracts to, inside <data_path>/<name>/
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    num_classes: int


CIFAR = {
    "cifar10": CifarLayout("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
                           tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10),
    "cifar100": CifarLayout("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
                            ("train",), ("test",), b"fine_labels", 100),
}


@dataclass
class ClassificationSplit:
    """One split of a classification dataset: image files or an in-memory uint8 array, and class indices."""

    dataset: str  # imagenet | cifar10 | cifar100
    split: str  # train | val | test
    root: Path
    labels: list[int]
    num_classes: int
    paths: list[Path] | None = None  # image files (ImageNet)
    pixels: np.ndarray | None = None  # (N, H, W, 3) uint8 (CIFAR)

    def __len__(self) -> int:
        return len(self.labels)

    def first(self, limit: int | None) -> ClassificationSplit:
        """The first ``limit`` samples (all when None): the same subset at every call."""
        if limit is None or limit >= len(self):
            return self
        return ClassificationSplit(self.dataset, self.split, self.root, self.labels[:limit], self.num_classes,
                                   self.paths[:limit] if self.paths is not None else None,
                                   self.pixels[:limit] if self.pixels is not None else None)


class LabeledImages(Dataset):
    """Map-style dataset over a split: ``(transform(PIL image), label, index)``; the index lets corpus-level metrics
    drop the samples a DistributedSampler repeats to even out the ranks."""

    def __init__(self, data: ClassificationSplit, transform):
        self.transform = transform
        self.pixels = data.pixels
        # Numpy arrays rather than lists of objects: loader workers read them without touching reference counts,
        # so the 1.28M ImageNet paths stay shared with the parent instead of being copied into every worker.
        self.paths = np.array([os.fsencode(p) for p in data.paths]) if data.paths is not None else None
        self.labels = np.asarray(data.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.pixels is not None:
            image = Image.fromarray(self.pixels[i])
        else:
            path = os.fsdecode(self.paths[i])
            try:
                with Image.open(path) as opened:
                    opened.load()
                    image = opened.convert("RGB") if opened.mode != "RGB" else opened.copy()
            except OSError as e:
                raise EvlpError(f"cannot read image {path}: {e}") from None
        return self.transform(image), int(self.labels[i]), i


# ---------------------------------------------------------------------------------------------------------------
# ImageNet


def load_imagenet(data_path: str | os.PathLike, split: str) -> ClassificationSplit:
    """ImageNet ``train`` or ``val`` from the flat layout; ``EvlpError`` when the folder is missing or not that
    layout (see :func:`evlp.eval.datasets.load_imagenet_split`)."""
    from evlp.eval.datasets import load_imagenet_split

    found = load_imagenet_split(data_path, split)
    return ClassificationSplit("imagenet", split, found.root, found.labels, 1000, paths=found.paths)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR: download


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def cifar_folder(data_path: str | os.PathLike, name: str) -> Path:
    return Path(data_path) / name / CIFAR[name].folder


def _expected_layout(data_path, name: str) -> str:
    layout = CIFAR[name]
    files = ", ".join((*layout.train, *layout.test))
    return f"{cifar_folder(data_path, name)}/{{{files}}} (the official {layout.archive} extracted)"


def download_cifar(data_path: str | os.PathLike, name: str, base_url: str | None = None) -> Path:
    """Make sure ``<data_path>/<name>/<folder>`` holds the dataset, downloading and extracting the official tarball
    when it does not; returns the folder. Safe to interrupt: the download resumes, the extraction starts over."""
    from evlp.data.archives import extract_tar
    from evlp.pretrained.download import download_file

    layout = CIFAR[name]
    root = Path(data_path) / name
    folder = root / layout.folder
    if all((folder / f).is_file() for f in (*layout.train, *layout.test)):
        return folder
    url = f"{(base_url or CIFAR_BASE_URL).rstrip('/')}/{layout.archive}"
    archive = root / layout.archive
    if not archive.is_file():
        log.info("%s: downloading %s", name, url)
        download_file(url, archive)
    digest = _md5(archive)
    if digest != layout.md5:
        archive.unlink()
        raise EvlpError(f"{url} is not the official {layout.archive} (MD5 {digest}, expected {layout.md5}); the "
                        f"download was deleted: rerun, or point data.download_url at another mirror")
    staging = root / ".extracting"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        extract_tar(archive, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-extracted left behind
        raise
    extracted = staging / layout.folder
    missing = [f for f in (*layout.train, *layout.test) if not (extracted / f).is_file()]
    if missing:
        shutil.rmtree(staging, ignore_errors=True)
        raise EvlpError(f"{archive} does not hold {layout.folder}/{missing[0]}: not the official {layout.archive}; "
                        f"delete it and rerun")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(extracted, folder)
    shutil.rmtree(staging, ignore_errors=True)
    archive.unlink()
    return folder


# ---------------------------------------------------------------------------------------------------------------
# CIFAR: reading the pickled batches without running code


class _NdarrayName:
    """What the name ``numpy.ndarray`` resolves to: an inert marker that ``_reconstruct`` accepts (the real class
    would let a pickle create arrays of any dtype by calling it)."""


def _reconstruct(subtype, shape, dtype):
    if subtype is not _NdarrayName:
        raise pickle.UnpicklingError(f"refusing to rebuild an array of type {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype))


def _frombuffer(buffer, dtype, shape, order):
    array = np.frombuffer(buffer, dtype=dtype)
    return array.reshape(shape, order=order)


def _dtype(spec, align=False, copy=False):
    dtype = np.dtype(spec, align, copy)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing an object array (dtype {spec!r})")
    return dtype


def _encode(text, encoding):
    # How a Python 3 pickle of protocol < 3 spells bytes: codecs.encode(<str>, "latin1").
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refusing codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


class NumpyUnpickler(pickle.Unpickler):
    """Unpickler that can build numbers, strings, bytes, lists, tuples, dicts and numeric numpy arrays, and nothing
    else: every callable a pickle can obtain comes from ``find_class``, and it only hands out the four functions
    below (array reconstruction, its dtype, numpy 2's buffer form, and latin-1 bytes). Any other global stops the
    load with ``UnpicklingError``."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1.x (and the Python 2 CIFAR files)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,  # numpy 2.x, protocol 5
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): _NdarrayName,  # only ever an argument of _reconstruct
        ("numpy", "dtype"): _dtype,
        ("_codecs", "encode"): _encode,
    }

    def find_class(self, module: str, name: str):
        allowed = self.ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return allowed


def read_cifar_batch(path: Path) -> dict:
    """A CIFAR python batch file as a dict with ``str`` keys (the files' keys are bytes)."""
    try:
        with open(path, "rb") as f:
            content = NumpyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise EvlpError(f"{path} is not a CIFAR python batch ({type(e).__name__}: {e}); delete the folder "
                        f"{path.parent} and rerun to download it again") from None
    if not isinstance(content, dict):
        raise EvlpError(f"{path} is not a CIFAR python batch (a {type(content).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def load_cifar(data_path: str | os.PathLike, name: str, split: str) -> ClassificationSplit:
    """CIFAR-10/100 ``train`` or ``test`` as (N, 32, 32, 3) uint8 pixels and labels; ``EvlpError`` when the files
    are missing (call :func:`download_cifar` first) or malformed."""
    layout = CIFAR[name]
    folder = cifar_folder(data_path, name)
    files = layout.train if split == "train" else layout.test
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise EvlpError(f"{name} {split}: {folder / missing[0]} not found; expected {_expected_layout(data_path, name)}"
                        f" (data.download=true fetches it from {CIFAR_BASE_URL})")
    pixels, labels = [], []
    key = layout.label_key.decode()
    for f in files:
        batch = read_cifar_batch(folder / f)
        data, batch_labels = batch.get("data"), batch.get(key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise EvlpError(f"{folder / f}: 'data' is not a (N, 3072) uint8 array; not a CIFAR batch")
        if batch_labels is None or len(batch_labels) != len(data):
            raise EvlpError(f"{folder / f}: {len(data)} images but {key!r} holds "
                            f"{'nothing' if batch_labels is None else len(batch_labels)} labels")
        batch_labels = [int(x) for x in batch_labels]
        if min(batch_labels) < 0 or max(batch_labels) >= layout.num_classes:
            raise EvlpError(f"{folder / f}: labels outside 0..{layout.num_classes - 1}")
        pixels.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch_labels)
    return ClassificationSplit(name, split, folder, labels, layout.num_classes,
                               pixels=np.ascontiguousarray(np.concatenate(pixels)))


def make_cifar_tarball(path: Path, name: str, images_per_file: int, seed: int = 0) -> Path:
    """A small tarball in the official layout (random pixels, every class present), for tests and offline demos."""
    import tarfile

    layout = CIFAR[name]
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for f in (*layout.train, *layout.test):
            labels = [int(i % layout.num_classes) for i in range(images_per_file)]
            batch = {b"batch_label": f.encode(), layout.label_key: labels,
                     b"data": rng.integers(0, 256, (images_per_file, 3072), dtype=np.uint8),
                     b"filenames": [f"{f}_{i}.png".encode() for i in range(images_per_file)]}
            data = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"{layout.folder}/{f}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


__all__ = ["CIFAR", "ClassificationSplit", "LabeledImages", "NumpyUnpickler", "download_cifar", "load_cifar",
           "load_imagenet", "make_cifar_tarball", "read_cifar_batch"]
