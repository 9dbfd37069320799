"""The user's own image-text pairs -> WebDataset shards (``evlp data convert INPUT --out DIR``).

INPUT is one of

* a CSV, TSV or JSON-lines file with a header / keys: one column names the image (a path, relative to the file's
  folder, or an http(s) URL) and one holds the caption (``--image-column``, ``--caption-column``; by default the
  first of ``IMAGE_COLUMNS`` / ``CAPTION_COLUMNS`` present);
* a folder of images, each with its caption in a text file of the same name (``cat.jpg`` + ``cat.txt``), searched
  recursively in sorted order.

Rows keep their order (the row number is the sample's ``image_id``) and the output has the same resumable layout and
stats files as the downloaders (see ``shardwriter``). Any WebDataset folder or brace pattern can then be named in a
training config's ``data.train``.
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
from evlp.data.shardwriter import ShardFolder
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
) -> RunResult:
    source = Path(input).expanduser()
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
        rows, num_rows = table.rows(columns["image"], columns["caption"]), table.count()
    else:
        raise EvlpError(f"{source} not found: give a CSV, TSV or JSON-lines file, or a folder of images + .txt files")
    params = dict(
        source=f"convert {source.resolve()}",
        **columns,
        rows=num_rows,
        **image_options.params(),
    )
    with ShardFolder(out, shard_size, params, info=dict(input=str(source.resolve()))) as folder:
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
        try:
            caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            caption = None
        except (OSError, UnicodeDecodeError) as e:
            raise EvlpError(f"cannot read the caption of {image}: {e}") from e
        yield Row(i, str(image), caption, meta=dict(path=image.relative_to(root).as_posix()))


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
        with open(self.path, newline="", encoding="utf-8") as f:
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

    def rows(self, image_column: str, caption_column: str) -> Iterator[Row]:
        for i, record in enumerate(self._records()):
            image, caption = record.get(image_column), record.get(caption_column)
            image = str(image).strip() if image is not None else ""
            caption = str(caption).strip() if caption is not None else ""
            meta = dict(url=image) if is_url(image) else dict(path=image)
            yield Row(i, image or None, caption or None, meta=meta)
