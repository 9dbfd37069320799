"""Rows (image URL or path + caption) -> a resumable ``ShardFolder``, with many fetches in flight.

One asyncio loop fetches rows (``concurrency`` at a time, through ``Fetcher``), a thread pool decodes and re-encodes
the images (``workers`` threads: Pillow releases the GIL while it decodes, resizes and encodes), and a single writer
thread writes each shard once all its rows are settled. Rows arrive in order; shard ``k`` is rows
``[k * shard_size, (k + 1) * shard_size)``; rows of finished shards are skipped without being fetched. At most
``max_open_shards`` shards are in flight, which bounds memory (a shard's successful images wait in memory, in row
order) while letting later shards proceed past a slow row.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import os
import resource
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from evlp.data.fetch import FetchOptions, Fetcher
from evlp.data.imaging import ImageOptions, PreparedImage, Rejected, prepare_image
from evlp.data.shardwriter import ShardFolder
from evlp.errors import EvlpError


@dataclass
class Row:
    index: int  # position in the source: fixes the shard and the sample key
    source: str | None  # http(s) URL or local path
    caption: str | None
    meta: dict = field(default_factory=dict)  # json fields; "image_id" defaults to ``index``
    invalid: str | None = None  # reason the row is unusable as read (e.g. "invalid_row"), counted without a fetch
    fingerprint: str | None = None  # what the row's sample depends on, where cheap to know (see shardwriter)


@dataclass
class RunResult:
    label: str
    attempted: int
    succeeded: int
    failed: Counter
    bytes_downloaded: int
    bytes_written: int
    seconds: float
    folder: dict  # ShardFolder.totals() at the end

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        sides = self.folder.get("sides", {"": self.folder})
        folder = ", ".join(f"{side + ' ' if side else ''}{totals['num_samples']:,} pairs in "
                           f"{len(totals['shards']):,} shards" for side, totals in sides.items())
        if self.attempted == 0:
            return f"{self.label}: nothing left to do; {folder}"
        rate = self.succeeded / self.attempted
        failed = ", ".join(f"{reason} {n:,}" for reason, n in self.failed.most_common(5))
        return (
            f"{self.label}: {self.succeeded:,} of {self.attempted:,} rows ({rate:.1%}) in {_duration(self.seconds)}, "
            f"{self.succeeded / max(self.seconds, 1e-9):,.1f} pairs/s, {_size(self.bytes_downloaded)} read, "
            f"{_size(self.bytes_written)} written; failed: {failed or 'none'}; folder now {folder}"
        )


@dataclass
class _Shard:
    k: int
    samples: dict = field(default_factory=dict)  # row index -> sample dict
    failed: Counter = field(default_factory=Counter)
    attempted: int = 0
    pending: int = 0
    bytes_downloaded: int = 0
    enumerated: bool = False  # every row of the shard has been started
    inputs: str | None = None  # digest of the rows' fingerprints, recorded in the stats file
    started: float = field(default_factory=time.monotonic)


def rows_to_do(num_rows: int, folder: ShardFolder) -> int:
    """Rows of ``num_rows`` that lie in shards not finished yet (the progress bar's total)."""
    s = folder.shard_size
    done = sum(min(s, num_rows - k * s) for k in folder.finished if k * s < num_rows)
    return num_rows - done


def build_shards(
    rows: Iterable[Row],
    folder: ShardFolder,
    *,
    label: str,
    image_options: ImageOptions = ImageOptions(),
    fetch_options: FetchOptions = FetchOptions(),
    concurrency: int = 128,
    workers: int | None = None,
    total: int | None = None,
    base: Path | None = None,
    reuse: int = 0,
    max_open_shards: int | None = None,
) -> RunResult:
    """Fetch, convert and shard ``rows`` (in increasing ``index`` order) into ``folder``.

    ``reuse`` > 0 keeps the converted images of that many recent sources, for data where one image appears in
    several nearby rows (one row per caption). ``base`` resolves relative local paths.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    _allow_open_files(concurrency + 256)  # a socket per request in flight, plus files and the interpreter's own
    workers = workers or os.cpu_count() or 1
    if max_open_shards is None:
        max_open_shards = 16 + 2 * math.ceil(concurrency / folder.shard_size)
    run = _Run(folder, label, image_options, concurrency, workers, reuse, max_open_shards)
    return asyncio.run(run.main(rows, fetch_options, total, base))


class _Run:
    def __init__(self, folder, label, image_options, concurrency, workers, reuse, max_open_shards):
        self.folder = folder
        self.label = label
        self.image_options = image_options
        self.concurrency = concurrency
        self.reuse = reuse
        self.max_open_shards = max_open_shards
        self.images = ThreadPoolExecutor(workers, thread_name_prefix="evlp-image")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="evlp-writer")  # one at a time: stats.json order
        self.open: dict[int, _Shard] = {}
        self.cache: dict[str, asyncio.Future] = {}  # insertion-ordered: the oldest entries are dropped first
        self.tasks: set[asyncio.Task] = set()
        self.writes: list[asyncio.Future] = []
        self.error: BaseException | None = None
        self.attempted = self.succeeded = self.bytes_downloaded = self.bytes_written = 0
        self.failed: Counter[str] = Counter()

    async def main(self, rows, fetch_options, total, base) -> RunResult:
        loop = asyncio.get_running_loop()
        # Name resolution (getaddrinfo) and file reads run in the loop's default executor, whose default size
        # (cpu_count + 4) would cap the fetches in flight far below `concurrency`.
        loop.set_default_executor(ThreadPoolExecutor(min(self.concurrency, 256), thread_name_prefix="evlp-io"))
        self.slots = asyncio.Semaphore(self.concurrency)
        self.changed = asyncio.Event()
        start = time.monotonic()
        self.progress = tqdm(total=total, unit="row", desc=self.label, dynamic_ncols=True, smoothing=0.05,
                             disable=total == 0)
        try:
            async with Fetcher(fetch_options, self.concurrency, base) as self.fetcher:
                try:
                    await self._produce(rows)
                    while self.tasks:
                        await asyncio.gather(*self.tasks)
                    await asyncio.gather(*self.writes)
                except BaseException:
                    for task in self.tasks:
                        task.cancel()
                    await asyncio.gather(*self.tasks, *self.writes, return_exceptions=True)
                    raise
                self._raise_error()
        finally:
            self.progress.close()
            self.images.shutdown(wait=True, cancel_futures=True)
            self.writer.shutdown(wait=True, cancel_futures=True)
        return RunResult(
            self.label, self.attempted, self.succeeded, self.failed, self.bytes_downloaded, self.bytes_written,
            time.monotonic() - start, self.folder.totals(),
        )  # fmt: skip

    # -- scheduling ------------------------------------------------------------------------------------------------

    async def _produce(self, rows: Iterable[Row]) -> None:
        last = -1
        for k, shard_rows in itertools.groupby(rows, key=lambda row: row.index // self.folder.shard_size):
            if k <= last:
                raise ValueError(f"rows must come in increasing index order; shard {k} came after shard {last}")
            last = k
            shard_rows, inputs = _fingerprinted(shard_rows)
            if self.folder.is_finished(k, inputs):
                continue
            if self.folder.is_finished(k):  # written before, from rows that have changed since: redo it
                self.progress.total = (self.progress.total or 0) + len(shard_rows)
                self.progress.refresh()
            while len(self.open) >= self.max_open_shards and self.error is None:
                self.changed.clear()
                await self.changed.wait()
            current = self.open[k] = _Shard(k, inputs=inputs)
            for row in shard_rows:
                await self.slots.acquire()
                self._raise_error()
                current.attempted += 1
                current.pending += 1
                task = asyncio.create_task(self._process(row, current))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            self._enumerated(current)

    def _enumerated(self, shard: _Shard) -> None:
        shard.enumerated = True
        if shard.pending == 0:
            self._close(shard)

    async def _process(self, row: Row, shard: _Shard) -> None:
        try:
            outcome, nbytes = await self._outcome(row)
        except BaseException as e:
            # A bug or a cancellation, not a bad row: the shard must not be written without this row.
            self._fail(e)
            raise
        finally:
            self.slots.release()
        shard.pending -= 1
        shard.bytes_downloaded += nbytes
        if isinstance(outcome, Rejected):
            shard.failed[outcome.reason] += 1
        else:
            shard.samples[row.index] = _sample(row, outcome)
        self.progress.update()
        if shard.enumerated and shard.pending == 0:
            self._close(shard)

    async def _outcome(self, row: Row) -> tuple[PreparedImage | Rejected, int]:
        """The converted image of the row (or why there is none) and the bytes read for it."""
        if row.invalid:
            return Rejected(row.invalid), 0
        if not row.source:
            return Rejected("no_image"), 0
        if not row.caption:
            return Rejected("no_caption"), 0
        if not self.reuse:
            return await self._convert(row.source)
        future = self.cache.get(row.source)
        if future is not None:
            outcome, _ = await asyncio.shield(future)
            return outcome, 0  # read once, counted once
        future = self.cache[row.source] = asyncio.get_running_loop().create_future()
        while len(self.cache) > self.reuse:
            del self.cache[next(iter(self.cache))]
        try:
            result = await self._convert(row.source)
        except BaseException:
            future.cancel()  # only a cancellation or a bug gets here; rows waiting on it stop too
            raise
        future.set_result(result)
        return result

    async def _convert(self, source: str) -> tuple[PreparedImage | Rejected, int]:
        try:
            data = await self.fetcher.fetch(source)
        except Rejected as e:
            return e, 0
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.images, prepare_image, data, self.image_options), len(data)
        except Rejected as e:
            return e, len(data)

    # -- finishing shards ------------------------------------------------------------------------------------------

    def _close(self, shard: _Shard) -> None:
        del self.open[shard.k]
        samples = [shard.samples[i] for i in sorted(shard.samples)]
        succeeded = len(samples)
        stats = dict(
            attempted=shard.attempted,
            succeeded=succeeded,
            failed=dict(shard.failed.most_common()),
            bytes_downloaded=shard.bytes_downloaded,
            seconds=round(time.monotonic() - shard.started, 3),
            **({"inputs": shard.inputs} if shard.inputs is not None else {}),
        )
        self.attempted += shard.attempted
        self.succeeded += succeeded
        self.failed.update(shard.failed)
        self.bytes_downloaded += shard.bytes_downloaded
        write = asyncio.get_running_loop().run_in_executor(
            self.writer, self.folder.write_shard, shard.k, samples, stats
        )
        write.add_done_callback(self._written)
        self.writes.append(write)
        self.progress.set_postfix_str(f"ok {self.succeeded / max(self.attempted, 1):.1%}", refresh=False)
        self.changed.set()

    def _written(self, write: asyncio.Future) -> None:
        if write.cancelled():
            return
        if write.exception() is not None:
            self._fail(write.exception())
            return
        self.bytes_written += write.result()["bytes_written"]

    def _fail(self, e: BaseException) -> None:
        if self.error is None and not isinstance(e, asyncio.CancelledError):
            self.error = e
        self.changed.set()

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def _fingerprinted(rows: Iterable[Row]) -> tuple[list[Row], str | None]:
    """The rows of one shard and the digest of their fingerprints (None unless every row has one)."""
    rows = list(rows)
    if any(row.fingerprint is None for row in rows):
        return rows, None
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row.index}\0{row.fingerprint}\0".encode("utf-8", "surrogatepass"))
    return rows, digest.hexdigest()


def _allow_open_files(needed: int) -> None:
    """Raise the soft limit on open files to ``needed`` if the hard limit allows: past the limit, every new
    connection would fail with EMFILE and be counted as a dead URL."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise EvlpError(f"--concurrency needs about {needed} open files but the limit is {hard}: lower "
                        f"--concurrency or raise the limit (ulimit -n)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _sample(row: Row, image: PreparedImage) -> dict:
    meta = {
        "image_id": row.index,
        **row.meta,
        "width": image.width,
        "height": image.height,
        "original_width": image.original_width,
        "original_height": image.original_height,
    }
    return {
        "__key__": f"{row.index:09d}",
        "__source_sha256__": image.source_sha256,  # not written (TarWriter skips "_" keys): SplitFolders reads it
        "jpg": image.jpeg,
        "txt": row.caption.encode("utf-8"),
        # A file name that is not UTF-8 (kept by surrogateescape) becomes \udcxx escapes, still valid JSON.
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8", "backslashreplace"),
    }


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
