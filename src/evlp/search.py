"""Search your own images by text: an incremental embedding index of a folder and a top-k search over it.

    evlp index ~/Photos --model my-export/              # embeds every image below ~/Photos (jpg, png, webp, ...)
    evlp index ~/Photos --model my-export/              # again later: only new and changed files are embedded
    evlp search "a dog on a beach" --top 10             # the model stored in the index embeds the query

The index is one safetensors file: ``embeddings`` (N, D) float32, L2-normalised, and in its metadata (key
``evlp_index``, JSON) the image folder, the model's path and fingerprint, and per row the file's path relative to
the folder, its size and mtime. A rerun re-embeds a file only when its size or mtime changed, drops rows of deleted
files, and re-embeds everything when the model changed (embeddings of two models are not comparable). Unreadable
images are skipped, counted and remembered, so an unchanged broken file is not retried on every run.

Scores are cosine similarities. Above ``FAISS_MIN_VECTORS`` rows the search uses faiss (exact inner product,
``IndexFlatIP``) when it is installed (``pip install evlp[search]``), else one matrix product.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from evlp.errors import EvlpError

INDEX_FORMAT = "evlp-image-index"
INDEX_FORMAT_VERSION = 1
METADATA_KEY = "evlp_index"
DEFAULT_INDEX = "evlp-index.safetensors"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
FAISS_MIN_VECTORS = 50_000  # below this, one matrix product is as fast as building a faiss index
SAVE_EVERY = 5_000  # images embedded between two writes of a growing index


@dataclass
class FileEntry:
    path: str  # relative to the index root, with '/' separators
    size: int
    mtime_ns: int

    def same_file(self, other: FileEntry) -> bool:
        return self.size == other.size and self.mtime_ns == other.mtime_ns


@dataclass
class ImageIndex:
    root: Path
    model: dict  # {"path", "fingerprint", "embed_dim"}
    files: list[FileEntry]  # row i of `embeddings` is files[i]
    embeddings: torch.Tensor  # (N, D) float32, L2-normalised
    unreadable: dict[str, FileEntry] = field(default_factory=dict)  # path -> entry, with the error in `errors`
    errors: dict[str, str] = field(default_factory=dict)
    _faiss_index: object = field(default=None, repr=False)  # built on the first large search, then reused

    def __len__(self) -> int:
        return len(self.files)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file + rename): an interrupted run keeps the previous index intact."""
        path = Path(path)
        meta = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "root": str(self.root),
            "model": self.model,
            "files": [[f.path, f.size, f.mtime_ns] for f in self.files],
            "unreadable": [[f.path, f.size, f.mtime_ns, self.errors.get(f.path, "")]
                           for f in self.unreadable.values()],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"embeddings": self.embeddings.contiguous()}, tmp, metadata={METADATA_KEY: json.dumps(meta)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImageIndex:
        path = Path(path)
        if not path.is_file():
            raise EvlpError(f"index {path} does not exist; build it with `evlp index IMAGES_DIR --model MODEL "
                            f"--out {path}`")
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "null"))
                embeddings = f.get_tensor("embeddings") if "embeddings" in f.keys() else None
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise EvlpError(f"{path} is not an evlp image index ({str(e).splitlines()[0]})") from None
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT or embeddings is None:
            raise EvlpError(f"{path} is not an evlp image index (built by `evlp index`)")
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise EvlpError(f"{path} has index format version {meta.get('format_version')}; this evlp reads "
                            f"version {INDEX_FORMAT_VERSION}: rebuild it with `evlp index`")
        try:
            files = [_entry(row, 3) for row in meta["files"]]
            unreadable = {row[0]: _entry(row, 4) for row in meta["unreadable"]}
            errors = {row[0]: str(row[3]) for row in meta["unreadable"]}
            root, model = Path(meta["root"]), dict(meta["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise EvlpError(f"{path} is not an evlp image index (its metadata is malformed: {e})") from None
        # An index is data that may come from elsewhere: a row can only name what `evlp index` would have listed
        # (an image file below the folder), so that no reader, `evlp serve` included, is pointed at other files.
        odd = next((f.path for f in [*files, *unreadable.values()] if not is_indexable(f.path)), None)
        if not root.is_absolute() or odd is not None:
            what = f"lists {odd!r}, which is not an image file below its folder" if odd else f"has root {root}"
            raise EvlpError(f"{path} {what}: not an index built by `evlp index`; rebuild it with `evlp index`")
        if len(files) != len(embeddings):
            raise EvlpError(f"{path} has {len(files)} files but {len(embeddings)} embeddings: rebuild it")
        return cls(root, model, files, embeddings, unreadable, errors)

    def search(self, queries: torch.Tensor, top: int = 10) -> list[list[tuple[int, float]]]:
        """For each of the (Q, D) queries, the ``top`` rows ``(row, cosine)`` best first."""
        queries = F.normalize(queries.float().reshape(-1, queries.shape[-1]).cpu(), dim=-1)
        k = min(top, len(self))
        if k == 0:
            return [[] for _ in range(len(queries))]
        faiss = _faiss() if len(self) >= FAISS_MIN_VECTORS else None
        if faiss is not None:
            if self._faiss_index is None:
                self._faiss_index = faiss.IndexFlatIP(self.embeddings.shape[1])
                self._faiss_index.add(self.embeddings.numpy())
            scores, rows = (torch.from_numpy(a) for a in self._faiss_index.search(queries.numpy(), k))
        else:
            scores, rows = (queries @ self.embeddings.T).topk(k, dim=1)  # (Q, k)
        return [list(zip(r.tolist(), s.tolist())) for r, s in zip(rows, scores)]


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


# ---------------------------------------------------------------------------------------------------------------
# Building and updating


def is_indexable(rel: str) -> bool:
    """Whether ``rel`` (a path relative to an index's folder) is one ``scan_images`` could list: relative, no
    ``..``, no hidden part, an image suffix."""
    parts = rel.split("/")
    return (bool(rel) and not rel.startswith("/")
            and all(part not in ("", ".", "..") and not part.startswith(".") for part in parts)
            and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES)


def _entry(row, width: int) -> FileEntry:
    if not isinstance(row, list) or len(row) != width:
        raise ValueError(f"a row {str(row)[:80]} is not [path, size, mtime_ns{', error' if width == 4 else ''}]")
    path, size, mtime_ns = row[:3]
    if not isinstance(path, str) or not isinstance(size, int) or not isinstance(mtime_ns, int):
        raise ValueError(f"a row {str(row)[:80]} is not [path, size, mtime_ns]")
    return FileEntry(path, size, mtime_ns)


def scan_images(root: Path) -> dict[str, FileEntry]:
    """Every image file below ``root`` by suffix (hidden files and folders skipped, links not followed)."""
    found = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            full = Path(folder) / name
            try:
                st = full.stat()
            except OSError:  # vanished or a dangling link
                continue
            rel = full.relative_to(root).as_posix()
            found[rel] = FileEntry(rel, st.st_size, st.st_mtime_ns)
    return found


@dataclass
class IndexStats:
    total: int = 0  # images in the index after the run
    embedded: int = 0  # new or changed files embedded in this run
    reused: int = 0  # unchanged files whose embedding was kept
    removed: int = 0  # rows dropped: files deleted, changed into unreadable ones, or from a different model
    unreadable: int = 0  # image files that could not be decoded (all of them, not only this run's)


class _ImageFiles(torch.utils.data.Dataset):
    """Decoded, preprocessed images; an unreadable file yields its error message instead of a tensor."""

    def __init__(self, root: Path, paths: list[str], preprocess: Callable):
        self.root, self.paths, self.preprocess = root, paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.root / self.paths[i]) as image:
                return i, self.preprocess(image), ""
        except Exception as e:  # any decoder error: truncated file, wrong suffix, decompression bomb ...
            return i, None, (str(e).splitlines() or [type(e).__name__])[0][:200]


def _collate(items):
    return items  # decoded one by one; stacked in `_embed` once failures are set aside


def build_index(
    images_dir: str | os.PathLike,
    loaded,
    out: str | os.PathLike,
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> IndexStats:
    """Create or update the index ``out`` for the images below ``images_dir`` with ``loaded`` (an
    ``evlp.api.LoadedModel``); returns what was done."""
    root = Path(images_dir).expanduser().resolve()
    if not root.is_dir():
        raise EvlpError(f"{images_dir} is not a folder")
    found = scan_images(root)
    if not found:
        raise EvlpError(f"no images (extensions {', '.join(sorted(IMAGE_SUFFIXES))}) found below {root}")
    identity = {"path": str(loaded.source.resolve()), "fingerprint": loaded.fingerprint(),
                "embed_dim": loaded.model.embed_dim}

    out = Path(out)
    old = ImageIndex.load(out) if out.exists() else None
    stats = IndexStats()
    if old is not None and old.model["fingerprint"] != identity["fingerprint"]:
        log(f"{out} was built with another model ({old.model['path']}); re-embedding all {len(old)} images")
        stats.removed, old = len(old), None
    old_rows = {f.path: i for i, f in enumerate(old.files)} if old is not None else {}
    old_unreadable = old.unreadable if old is not None else {}

    keep_rows, keep_files, to_embed = [], [], []
    unreadable, errors = {}, {}
    for rel, entry in found.items():
        if rel in old_rows and old.files[old_rows[rel]].same_file(entry):
            keep_rows.append(old_rows[rel])
            keep_files.append(entry)
        elif rel in old_unreadable and old_unreadable[rel].same_file(entry):
            unreadable[rel], errors[rel] = entry, old.errors.get(rel, "")
        else:
            to_embed.append(entry)
    stats.reused = len(keep_rows)

    # Rows are written every SAVE_EVERY images and at the end: an interrupted run keeps what it embedded.
    files = keep_files
    chunks = [old.embeddings[keep_rows] if old is not None else torch.empty(0, identity["embed_dim"])]

    def save() -> ImageIndex:
        index = ImageIndex(root, identity, list(files), torch.cat(chunks), unreadable, errors)
        index.save(out)
        return index

    since_save = 0
    for batch_files, batch_embeddings, batch_failed in _embed(root, to_embed, loaded, batch_size, workers,
                                                               progress):
        files += batch_files
        chunks.append(batch_embeddings)
        for entry, error in batch_failed:
            unreadable[entry.path], errors[entry.path] = entry, error
        stats.embedded += len(batch_files)
        since_save += len(batch_files) + len(batch_failed)
        if since_save >= SAVE_EVERY:
            save()
            since_save = 0
    index = save()
    # Rows of deleted files, and of changed files that no longer decode, are gone (a re-embedded file is not).
    stats.removed += sum(path not in found or path in unreadable for path in old_rows)
    stats.total, stats.unreadable = len(index), len(unreadable)
    return stats


def _embed(root: Path, entries: list[FileEntry], loaded, batch_size: int, workers: int, progress: bool):
    """Yields per batch: the files embedded, their (b, D) float32 L2-normalised embeddings, the failures."""
    from evlp.eval.embed import inference, to_unit_float

    if not entries:
        return
    model = loaded.model
    device = next(model.parameters()).device
    dataset = _ImageFiles(root, [e.path for e in entries], loaded.preprocess)
    # Worker processes pay off only when there is more than a batch to decode.
    workers = workers if len(entries) > batch_size else 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    with inference(model, device, None), tqdm(total=len(entries), desc="embedding images", unit="img",
                                              disable=not progress) as bar:
        for batch in loader:
            good = [(i, x) for i, x, _ in batch if x is not None]
            failed = [(entries[i], error) for i, x, error in batch if x is None]
            embeddings = torch.empty(0, model.embed_dim)
            if good:
                images = torch.stack([x for _, x in good]).to(device)
                embeddings = to_unit_float(model.encode_image(images))
            bar.update(len(batch))
            yield [entries[i] for i, _ in good], embeddings, failed


# ---------------------------------------------------------------------------------------------------------------
# Searching


def search_text(index: ImageIndex, loaded, queries: list[str], top: int = 10) -> list[list[tuple[str, float]]]:
    """The ``top`` images ``(relative path, cosine)`` for each text query, best first."""
    if loaded.fingerprint() != index.model["fingerprint"]:
        raise EvlpError(f"the index was built with another model ({index.model['path']}); search with that "
                        f"model, or rebuild the index with `evlp index {index.root} --model {loaded.source}`")
    from evlp.eval.embed import inference

    model = loaded.model
    device = next(model.parameters()).device
    token_ids, padding_mask = loaded.tokenizer(list(queries))
    with inference(model, device, None):
        embeddings = model.encode_text(token_ids.to(device), padding_mask.to(device))
    return [[(index.files[row].path, score) for row, score in hits] for hits in index.search(embeddings, top)]
