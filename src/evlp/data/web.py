"""Conceptual Captions 3M / 12M as WebDataset shards: crawled from the URLs of the TSV index, or pre-crawled (hub).

    evlp download cc3m --data-path /data --index Train-GCC-training.tsv   # -> /data/conceptual_captions_3m/shards/
    evlp download cc12m --data-path /data                                # fetches cc12m.tsv itself
    evlp download cc3m --data-path /data --source hub                    # pixparse/cc3m-wds, no crawling

Rows are the lines of the TSV (split on ``\\n`` only, 0-based; CC3M: ``caption<TAB>url``, CC12M: ``url<TAB>caption``);
a row's number is its sample's ``image_id`` and fixes its shard. The index is kept next to the shards
(``conceptual_captions_3m/Train-GCC-training.tsv``, ``conceptual_captions_12m/cc12m.tsv``), so a rerun needs no
``--index`` and resumes (see ``shardwriter``). About 30-40% of the URLs are dead by now (docs/data.md).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from evlp.data.fetch import FetchOptions
from evlp.data.hub import fetch_snapshot
from evlp.data.imaging import ImageOptions
from evlp.data.pipeline import Row, RunResult, build_shards, rows_to_do
from evlp.data.shards import count_samples
from evlp.data.shardwriter import SHARD_STATS, ShardFolder, write_json
from evlp.errors import EvlpError
from evlp.pretrained.download import download_file

CC3M_PAGE = "https://ai.google.com/research/ConceptualCaptions/download"
CC12M_INDEX_URL = "https://storage.googleapis.com/conceptual_12m/cc12m.tsv"


@dataclass(frozen=True)
class WebDataset:
    name: str
    folder: str  # under data_path
    index_name: str
    url_first: bool  # column order of the TSV
    hub_repo: str
    default_max_rows: int | None = None  # rows crawled unless told otherwise (None: all)


# The thesis' CC12M subset is what the original crawler got from the first 3,000,000 rows of the index (1,181,988
# pairs); CC3M was crawled whole.
CC12M_THESIS_ROWS = 3_000_000

DATASETS = {
    "cc3m": WebDataset("cc3m", "conceptual_captions_3m", "Train-GCC-training.tsv", False, "pixparse/cc3m-wds"),
    "cc12m": WebDataset("cc12m", "conceptual_captions_12m", "cc12m.tsv", True, "pixparse/cc12m-wds",
                        default_max_rows=CC12M_THESIS_ROWS),
}

ALL_ROWS = "all"  # max_rows meaning the whole index


def shards_dir(data_path: str | os.PathLike, name: str) -> Path:
    return Path(data_path) / DATASETS[name].folder / "shards"


def download_web(
    name: str,
    data_path: str | os.PathLike,
    *,
    index: str | os.PathLike | None = None,
    index_url: str | None = None,
    shard_size: int = 1000,
    image_options: ImageOptions = ImageOptions(),
    fetch_options: FetchOptions = FetchOptions(),
    concurrency: int = 128,
    workers: int | None = None,
    max_rows: int | str | None = None,
) -> RunResult:
    """Crawl the images of CC3M or CC12M into ``data_path/<folder>/shards``; resumes a previous run.

    ``max_rows`` limits the crawl to the first rows of the index, rounded up to whole shards; ``None`` takes the
    dataset's default (CC12M: the first 3,000,000 rows, what the thesis crawled; CC3M: all), ``"all"`` the whole
    index. A later run with a larger limit continues from there.
    """
    dataset = DATASETS[name]
    if max_rows is None:
        max_rows = dataset.default_max_rows
    elif max_rows == ALL_ROWS:
        max_rows = None
    root = Path(data_path) / dataset.folder
    index_path = _index(dataset, root, Path(data_path), index, index_url)
    num_rows = count_rows(index_path)
    params = dict(
        source=f"{name} web index",
        index_rows=num_rows,
        **image_options.params(),
    )
    limit = num_rows if max_rows is None else min(num_rows, math.ceil(max_rows / shard_size) * shard_size)
    info = dict(dataset=name, index=str(index_path.resolve()))
    with ShardFolder(root / "shards", shard_size, params, info=info) as folder:
        return build_shards(
            itertools.islice(tsv_rows(index_path, dataset.url_first), limit),
            folder,
            label=name,
            image_options=image_options,
            fetch_options=fetch_options,
            concurrency=concurrency,
            workers=workers,
            total=rows_to_do(limit, folder),
        )


def _index(dataset: WebDataset, root: Path, data_path: Path, given, index_url: str | None) -> Path:
    """The TSV inside ``root``: copied there from ``given``, kept from an earlier run, or (CC12M) downloaded."""
    kept = root / dataset.index_name
    if given is not None:
        given = Path(given).expanduser()
        if not given.is_file():
            raise EvlpError(_missing_index(dataset, f"{given} does not exist"))
        root.mkdir(parents=True, exist_ok=True)
        if not (kept.exists() and os.path.samefile(given, kept)):
            _link_or_copy(given, kept)
        return kept
    if kept.is_file():
        return kept
    if dataset.name == "cc12m":
        return download_file(index_url or CC12M_INDEX_URL, kept)
    # Where the original toolkit expected it.
    legacy = data_path / dataset.index_name
    if legacy.is_file():
        root.mkdir(parents=True, exist_ok=True)
        _link_or_copy(legacy, kept)
        return kept
    raise EvlpError(_missing_index(dataset, f"no --index given and none in {root}"))


def _missing_index(dataset: WebDataset, why: str) -> str:
    if dataset.name == "cc12m":
        return f"cc12m: index not found ({why}): pass an existing file, or no --index to download {CC12M_INDEX_URL}"
    return (f"{dataset.name}: index {dataset.index_name} not found ({why}): download it from {CC3M_PAGE} "
            f"(section Downloads, button 'Training split') and pass --index PATH")


def _link_or_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)  # no second copy of a large file when both are on one filesystem
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def count_rows(path: Path) -> int:
    """Lines of a file, counting a last line without ``\\n``."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def tsv_rows(path: Path, url_first: bool) -> Iterator[Row]:
    """The rows of a CC index. Lines are split on ``\\n`` alone: a stray ``\\r`` inside a caption must not shift the
    row numbers (pandas' parser would treat it as a line break)."""
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            if url_first:
                url, sep, caption = text.partition("\t")
            else:
                caption, sep, url = text.rpartition("\t")
            url, caption = url.strip(), caption.strip()
            if not sep or not url:
                yield Row(i, None, None, invalid="invalid_row")
            else:
                yield Row(i, url, caption, meta=dict(url=url))


def download_hub(name: str, data_path: str | os.PathLike, *, repo: str | None = None, token: str | None = None) -> str:
    """Pre-crawled shards of ``repo`` (pixparse/cc3m-wds, pixparse/cc12m-wds) into ``data_path/<folder>/shards``,
    indexed in ``stats.json``. Returns the summary line."""
    dataset = DATASETS[name]
    repo = repo or dataset.hub_repo
    directory = shards_dir(data_path, name)
    if directory.is_dir() and any(SHARD_STATS.fullmatch(p.name) for p in directory.iterdir()):
        raise EvlpError(f"{directory} holds shards crawled by `evlp download {name}`: use another --data-path for the "
                        f"hub's shards (mixing both would count many images twice)")
    fetch_snapshot(repo, directory, allow_patterns=["*train*.tar"], token=token)
    tars = sorted(p for p in directory.rglob("*.tar") if not any(part.startswith(".") for part in p.parts))
    nested = [p for p in tars if p.parent != directory]
    if nested:
        raise EvlpError(f"{repo} keeps its shards in subfolders ({nested[0].relative_to(directory)}, ...): "
                        f"training reads only {directory}/*.tar; move them up or name them in data.train")
    if not tars:
        raise EvlpError(f"no *train*.tar files in {repo}: is it a WebDataset repository?")
    counts, sizes = _hub_counts(directory, tars)
    stats = dict(
        num_samples=sum(counts.values()),
        shards=counts,
        shard_bytes=sizes,
        params=dict(source=f"hub:{repo}"),
        dataset=name,
        repo=repo,
    )
    write_json(directory / "stats.json", stats)
    return f"{name}: {stats['num_samples']:,} pairs in {len(tars):,} shards from {repo} in {directory}"


def _hub_counts(directory: Path, tars: list[Path]) -> tuple[dict, dict]:
    """Samples per shard; counts from an earlier run are kept for files of unchanged size (counting reads every
    tar header of hundreds of GB)."""
    try:
        old = json.loads((directory / "stats.json").read_text())
        old_counts, old_sizes = old.get("shards", {}), old.get("shard_bytes", {})
    except (OSError, ValueError, AttributeError):
        old_counts, old_sizes = {}, {}
    (directory / "stats.json").unlink(missing_ok=True)  # so that count_samples reads the tars themselves
    counts, sizes = {}, {}
    for tar in tars:
        size = tar.stat().st_size
        if old_sizes.get(tar.name) == size and isinstance(old_counts.get(tar.name), int):
            counts[tar.name] = old_counts[tar.name]
        else:
            counts[tar.name] = count_samples(str(tar))
        sizes[tar.name] = size
    return counts, sizes
