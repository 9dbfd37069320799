"""The user's own image-text pairs -> WebDataset shards (``evlp data convert INPUT --out DIR``).

INPUT is one of

* a CSV, TSV or JSON-lines file with a header / keys: one column names the image (a path, relative to the file's
  folder, or an http(s) URL) and one holds the caption (``--image-column``, ``--caption-column``; by default the
  first of ``IMAGE_COLUMNS`` / ``CAPTION_COLUMNS`` present);
* a folder of images, each with its caption in a text file of the same name (``cat.jpg`` + ``cat.txt``), searched
  recursively in sorted order.

Paths may be relative (to the current folder) or absolute, for INPUT, ``--out`` and the table's image cells alike.
Rows keep their order (the row number is the sample's ``image_id``) and the output has the same resumable layout and
stats files as the downloaders (see ``shardwriter``). Any WebDataset folder or brace pattern can then be named in a
training config's ``data.train``. With ``val_fraction`` the pairs are split into ``<out>/train`` and ``<out>/val``
by the hash of each image's bytes (``shardwriter.SplitFolders``).

A row that cannot become a pair is counted by reason, never stops the run: besides the image reasons
(``evlp.data.imaging``), ``no_caption`` (no caption file, an empty cell or only whitespace), ``bad_caption`` (not
UTF-8 text: undecodable bytes, a lone surrogate escaped in JSON), ``unreadable`` (the caption file cannot be read)
and ``invalid_row`` (an image cell that cannot name a file).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from evlp.data.fetch import FetchOptions, is_url
from evlp.data.imaging import ImageOptions
from evlp.data.pipeline import Row, RunResult, build_shards, rows_to_do
from evlp.data.shardwriter import ShardFolder, SplitFolders
from evlp.errors import EvlpError

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_path", "path", "file", "filename", "url", "image_url", "img")
CAPTION_COLUMNS = ("caption", "text", "txt", "title", "sentence", "description", "alt")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def convert(
    input: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    shard_size: int = 1000,
    image_options: ImageOptions = ImageOptions(),
    fetch_options: FetchOptions = FetchOptions(),
    concurrency: int = 128,
    workers: int | None = None,
    val_fraction: float | None = None,
) -> RunResult:
    # Absolute from here on: image paths are then read from one place, whatever folder the rows name them from.
    source = Path(input).expanduser().resolve()
    if source.is_dir():
        images = sorted((p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                        key=lambda p: p.relative_to(source).as_posix())
        if not images:
            raise EvlpError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
        rows, num_rows, columns = _folder_rows(source, images), len(images), {}
    elif source.is_file():
        table = _Table(source)
        columns = dict(
            image=table.pick(image_column, IMAGE_COLUMNS, "image"),
            caption=table.pick(caption_column, CAPTION_COLUMNS, "caption"),
        )
        rows, num_rows = table.rows(columns["image"], columns["caption"], base=source.parent), table.count()
    else:
        raise EvlpError(f"{source} not found: give a CSV, TSV or JSON-lines file, or a folder of images + .txt files")
    params = dict(
        source=f"convert {source}",
        **columns,
        rows=num_rows,
        **image_options.params(),
    )
    info = dict(input=str(source))
    out = Path(out).expanduser()
    if val_fraction is None and all((out / side / "stats.json").is_file() for side in SplitFolders.SIDES):
        raise EvlpError(f"{out} holds a split conversion (train/, val/); pass the same --val-fraction to continue "
                        f"it, or use another --out")
    folders = (ShardFolder(out, shard_size, params, info=info) if val_fraction is None
               else SplitFolders(out, shard_size, params, val_fraction, info=info))
    with folders as folder:
        return build_shards(
            rows,
            folder,
            label=source.name,
            image_options=image_options,
            fetch_options=fetch_options,
            concurrency=concurrency,
            workers=workers,
            total=rows_to_do(num_rows, folder),
            base=source if source.is_dir() else source.parent,
        )


def _folder_rows(root: Path, images: list[Path]) -> Iterator[Row]:
    for i, image in enumerate(images):
        relative = image.relative_to(root).as_posix()  # read from base=root
        caption_file = image.with_suffix(".txt")
        caption, invalid = _caption_file(caption_file)
        yield Row(i, relative, caption, meta=dict(path=relative), invalid=invalid,
                  fingerprint=f"{relative}\0{_file_state(image)}\0{_file_state(caption_file)}")


def _file_state(path: Path) -> str:
    """Size and modification time: what tells a rerun that a file changed since its shard was written."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _caption_file(path: Path) -> tuple[str | None, str | None]:
    """``(caption, reason it is unusable)`` of a caption file; no file is no caption, a BOM is dropped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError:
        return None, "unreadable"
    try:
        return data.decode("utf-8-sig").strip() or None, None
    except UnicodeDecodeError:
        return None, "bad_caption"


def _encodes(text: str, errors: str = "strict") -> bool:
    try:
        text.encode("utf-8", errors)
    except UnicodeEncodeError:
        return False
    return True


class _Table:
    """A CSV/TSV with a header row, or JSON lines (one object per line); read twice: to count and to convert."""

    def __init__(self, path: Path):
        suffix = path.suffix.lower()
        if suffix not in TABLE_SUFFIXES:
            raise EvlpError(f"{path}: unknown table format {suffix or '(no suffix)'}; expected one of "
                            f"{', '.join(TABLE_SUFFIXES)} or a folder")
        self.path = path
        self.delimiter = TABLE_SUFFIXES[suffix]
        self.columns = self._columns()

    def _records(self) -> Iterator[dict]:
        # Huge caption fields exist (HTML alt texts); the csv module's default limit is 128 KB.
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        # Undecodable bytes are kept as surrogates (surrogateescape) and judged per row, not for the whole file;
        # utf-8-sig drops a byte-order mark, which would otherwise glue itself to the first column's name.
        with open(self.path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            if self.delimiter is not None:
                yield from csv.DictReader(f, delimiter=self.delimiter)
                return
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise EvlpError(f"{self.path}:{number}: not a JSON object ({e})") from e
                if not isinstance(record, dict):
                    raise EvlpError(f"{self.path}:{number}: not a JSON object")
                yield record

    def _columns(self) -> list[str]:
        try:
            first = next(self._records(), None)
        except (UnicodeDecodeError, csv.Error) as e:
            raise EvlpError(f"cannot read {self.path}: {e}") from e
        if first is None:
            raise EvlpError(f"{self.path} has no rows")
        return list(first)

    def pick(self, given: str | None, candidates: tuple[str, ...], what: str) -> str:
        if given is not None:
            if given not in self.columns:
                raise EvlpError(f"{self.path} has no column {given!r}; its columns: {', '.join(self.columns)}")
            return given
        lowered = {c.lower(): c for c in self.columns}
        for candidate in candidates:
            if candidate in lowered:
                return lowered[candidate]
        raise EvlpError(f"{self.path}: which column holds the {what}? None of its columns "
                        f"({', '.join(self.columns)}) is a usual name: pass --{what}-column")

    def count(self) -> int:
        """Rows in the file; this first full pass also finds encoding or quoting errors before any work is done."""
        try:
            return sum(1 for _ in self._records())
        except (UnicodeDecodeError, csv.Error) as e:
            raise EvlpError(f"cannot read {self.path}: {e}") from e

    def rows(self, image_column: str, caption_column: str, base: Path) -> Iterator[Row]:
        for i, record in enumerate(self._records()):
            image, caption = record.get(image_column), record.get(caption_column)
            image = str(image).strip() if image is not None else ""
            caption = str(caption).strip() if caption is not None else ""
            meta = dict(url=image) if is_url(image) else dict(path=image)
            # A path may hold any bytes but a lone surrogate (which only a JSON escape makes); a caption must be text.
            invalid = ("invalid_row" if not _encodes(image, "surrogateescape")
                       else "bad_caption" if not _encodes(caption) else None)
            local = _file_state(base / Path(image).expanduser()) if image and not (is_url(image) or invalid) else ""
            yield Row(i, image or None, caption or None, meta=meta, invalid=invalid,
                      fingerprint=f"{image}\0{caption}\0{local}")
