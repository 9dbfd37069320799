"""Image-text pairs from WebDataset tar shards, as whole batches, with DDP-equal epochs and exact resume.

A shard is a tar of samples ``<key>.{jpg,jpeg,png,webp}`` + ``<key>.{txt,text,caption}`` (+ optional ``<key>.json``
metadata). ``ImageTextShards`` yields batches (build the DataLoader with ``batch_size=None``; ``make_loader`` does):

    image         float32 (B, 3, H, W)   transformed in the workers (uint8 with a transform that leaves the
                                         normalisation to the device: ``TrainTransform(normalize=False)``)
    text          int64   (B, L)         [CLS] caption [SEP] [PAD]...
    padding_mask  bool    (B, L)         True at padding
    image_id      int64   (B,)           json "image_id", else the numeric key, else a hash of the key
    meta          list[dict]             the json metadata ({} when absent)
    caption       list[str]

Training (``train=True``), call ``configure(epoch, start_batch, rank, world_size)`` before each epoch's iter():

* The epoch's shard order comes from ``(seed, epoch)``. Each loader worker slot reads its own part of the data:
  whole shards when there are at least as many shards as workers, otherwise every n-th sample of every shard. It
  reads ``open_shards`` of its shards at once, taking each next sample from one of them at random (a finished
  shard is replaced by the next), and its samples pass through a shuffle buffer seeded by ``(seed, epoch, slot)``;
  a slot that runs out before its quota reads its data again.
* The world size does not change the data: every rank reads the same stream of *global* batches of
  ``batch_size * world_size`` pairs and decodes only its own slice of each (``rank_slice``), so W processes with
  batch B train on exactly the batches one process with batch B*W would (same in-batch negatives, same order of the
  memory-bank push). Each rank reads the raw bytes of every pair (W times the reading, shared by the page cache on
  one machine); decoding and augmentation, the expensive part, are split. A slice with no decodable image at all is
  replaced by that rank alone, after which that rank's slices no longer line up with the others'.
* Every rank yields exactly ``len(dataset) = num_samples // (batch_size * world_size)`` batches, so DDP ranks stay
  in step. Global batch ``b`` comes from worker ``b % num_workers``, the order in which the DataLoader collects them.
* Each sample's augmentation is drawn after seeding torch's and Python's RNGs from ``(seed, epoch, sample)``, so a
  batch is a function of its position alone. ``configure(epoch, start_batch=s)`` then reproduces batches
  ``s, s+1, ...`` of the uninterrupted epoch bit for bit: each worker skips the raw bytes of the batches already
  done (nothing is decoded) and takes over the role of the worker that produced batch ``s + worker_id``.

Several sources (``data.train`` in a config) are mixed pair by pair. ``urls`` is one source (a folder, a brace
pattern, or a list of them or of shards) or a list of sources, each itself a list (with ``weights``, every entry is
a source). Each slot reads each source through its own part of that source's shards (split over loader workers as
above, the shard order reshuffled per epoch and source), with its share of ``open_shards`` and of ``shuffle_buffer``
(in proportion to the source's size or weight, so memory stays the same), and draws the source of each next sample
with a generator seeded by ``(seed, epoch, slot)``:

* by default in proportion to the sizes, without replacement: source ``k`` with probability (what is left of the
  slot's part of ``k``) / (what is left of all its parts), i.e. a uniformly random interleave of the sources, as a
  global shuffle of their union would give. Every pair is read once per pass, and a batch's share of a source
  spreads around the source's size share as i.i.d. sampling's does (binomially);
* with ``weights=[w_1, ..., w_n]``, with replacement: source ``k`` with probability ``w_k / sum(w)``. The epoch keeps
  its length: ``num_samples`` is the total of the sources with a positive weight, so an epoch draws as many pairs
  as there are. A source drawn more often than its size share is read again (a new ``pass``, with new
  augmentations), one drawn less often is only partly read in an epoch (other shards first in the next: the shard
  order changes per epoch);
* everything above still holds: equal epochs per rank, the ranks' slices of one global batch, and exact resume,
  since the draws are a function of the position in the slot's stream.

Evaluation (``train=False``): every sample once, in shard order, the last batch possibly partial, no randomness and
no rank split. Worker ``w`` decodes batches ``w, w + num_workers, ...`` of the common stream.

A sample the loader cannot use is skipped and counted by reason (``skipped()``, ``SKIP_REASONS``): no image or no
caption, not an image, an image that fails to decode, and the size limits of ``data convert`` read from the image's
header before any pixel is decoded (a shorter side under 2 pixels, more than Pillow's 89 Mpx). A shard that cannot
be read on (a truncated file, a malformed tar header such as a size field of 2^70) ends after the samples before the
damage, with a warning naming it, and counts once as ``unreadable_shard``. The counts of every DataLoader worker
reach the main process (``make_loader`` shares them). A warning also names any shard where more than
``max_bad_fraction`` of the samples are bad. A training batch whose image fails to decode only after passing the
cheap header check is filled up with a copy of another sample of the same batch, which keeps the batch size and the
resume positions intact.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import itertools
import json
import logging
import lzma
import math
import os
import random
import re
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import base_plus_ext, tarfile_samples

from evlp.data.imaging import size_problem
from evlp.data.tokenizer import TextTokenizer
from evlp.data.transforms import jpeg_size
from evlp.errors import EvlpError
from evlp.pretrained.files import first_line

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "text", "caption")
MAX_FAILED_BATCHES = 10  # whole training batches in a row with no decodable image before we give up on the data
# Why a sample (or, for the first, the rest of a shard) was skipped; the image reasons are data convert's.
SKIP_REASONS = ("unreadable_shard", "missing_image", "missing_caption", "not_an_image", "decode_error", "too_small",
                "too_large")
# What reading a damaged tar can raise: tarfile's errors, a cut or corrupt compressed stream, a malformed number.
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, OverflowError, zlib.error, lzma.LZMAError)


def expand_urls(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard paths from a brace pattern (``/data/cc3m/{000000..000331}.tar``), a folder of ``*.tar``, or a list."""
    if isinstance(urls, (str, os.PathLike)):
        urls = [urls]
    expanded = []
    for url in map(str, urls):
        if os.path.isdir(url):
            expanded += sorted(str(p) for p in Path(url).glob("*.tar"))
        else:
            expanded += wds.shardlists.expand_urls(url)
    if not expanded:
        raise EvlpError(f"no shards found in {urls}")
    return expanded


def count_samples(urls: str | Iterable[str]) -> int:
    """Number of samples in the shards: from ``stats.json`` next to them when it lists them, else from img2dataset's
    ``<shard>_stats.json``, else by reading tars.

    ``stats.json`` (written by ``prepare_quickstart`` and the downloaders) holds ``{"shards": {"000000.tar": n, ...}}``.
    img2dataset writes ``00000_stats.json`` beside each ``00000.tar`` once the tar is closed, whose ``successes`` are
    the samples in the tar. Counting a tar reads its headers only.
    """
    return sum(shard_counts(expand_urls(urls)))


def shard_counts(urls: list[str]) -> list[int]:
    """The number of samples of each shard of ``urls`` (shard paths), found as ``count_samples`` finds them."""
    counts = []
    listed: dict[str, dict] = {}
    for url in urls:
        directory, name = os.path.split(url)
        if directory not in listed:
            listed[directory] = _listed_counts(Path(directory) / "stats.json")
        n = listed[directory].get(name)
        if not isinstance(n, int):
            n = _img2dataset_count(url)
        counts.append(n if isinstance(n, int) else _count_tar(url))
    return counts


def _img2dataset_count(url: str) -> int | None:
    """``successes`` of img2dataset's stats file for the shard ``url`` (None when there is none)."""
    if not url.endswith(".tar"):
        return None
    try:
        n = json.loads(Path(url[: -len(".tar")] + "_stats.json").read_text()).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def _listed_counts(stats_path: Path) -> dict:
    try:
        shards = json.loads(stats_path.read_text()).get("shards", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return shards if isinstance(shards, dict) else {}


def _count_tar(url: str) -> int:
    if ":" in url.split("/", 1)[0]:  # pipe:, http:, s3: ...
        raise EvlpError(f"cannot count the samples of {url} (not a local file): give num_samples explicitly")
    if not os.path.isfile(url):
        raise EvlpError(f"shard {url} not found")
    keys = set()
    try:
        with open(url, "rb") as f, _decompressed(f) as stream:
            end = os.fstat(f.fileno()).st_size if stream is f else None
            for name, _ in _tar_members(stream, end, read=False):  # headers only: the contents are skipped
                prefix, _ = base_plus_ext(name)
                if prefix is not None and not os.path.basename(name).startswith("__"):
                    keys.add(prefix)
    except TAR_ERRORS as e:
        log.warning("%s: unreadable past %d samples (%s)", url, len(keys), e)
    return len(keys)


def _decompressed(f):
    """``f`` itself for a plain tar, else a stream of its decompressed bytes (gzip, bzip2, xz)."""
    head = f.peek(6)[:6]
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=f)
    if head.startswith(b"BZh"):
        return bz2.BZ2File(f)
    if head.startswith(b"\xfd7zXZ"):
        return lzma.LZMAFile(f)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        raise tarfile.CompressionError("zstd-compressed tar: give num_samples, or a stats.json next to the shards")
    return f


def check_weights(weights: Sequence[float], num_sources: int, name: str = "weights") -> list[float]:
    """The mixture weights as floats; EvlpError unless there is one per source, none negative and one positive."""
    weights = list(weights)
    if len(weights) != num_sources:
        sources = f"{num_sources} data source" + ("" if num_sources == 1 else "s")
        entries = f"{len(weights)} " + ("entry" if len(weights) == 1 else "entries")
        raise EvlpError(f"{name} has {entries} for {sources}: give one weight per source, in the same order")
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise EvlpError(f"{name} must be numbers, got {weights}") from None
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise EvlpError(f"{name} must be finite and non-negative, got {weights}")
    if not any(w > 0 for w in weights):
        raise EvlpError(f"{name} are all zero: at least one source needs a positive weight")
    return weights


def _folder_of(urls: list[str]) -> str:
    try:
        return os.path.commonpath(urls) if len(urls) > 1 else os.path.dirname(urls[0]) or urls[0]
    except ValueError:
        return urls[0]


def _slot_part(urls: list[str], order: random.Random, slot: int, num_slots: int):
    """``(shards, select)`` of one loader worker slot: after shuffling the shard order with ``order``, every
    ``num_slots``-th shard when there are enough, else all shards and ``select = (slot, num_slots)``: of the ``i``-th
    shard, the samples ``j`` with ``(i + j) % num_slots == slot`` (``_kept``), so the slots share out every shard."""
    shards = list(urls)
    order.shuffle(shards)
    if len(shards) >= num_slots:
        return shards[slot::num_slots], None
    return shards, (slot, num_slots)


def _kept(i: int, select: tuple[int, int] | None) -> tuple[int, int] | None:
    """``(first, step)``: the samples ``first, first + step, ...`` that a slot keeps of the ``i``-th shard of its
    part (None: all of them)."""
    if select is None:
        return None
    slot, num_slots = select
    return (slot - i) % num_slots, num_slots


def _kept_count(counts: list[int], select: tuple[int, int] | None) -> int:
    """How many samples a slot keeps of its part, from the sample counts of its shards (in the part's order)."""
    if select is None:
        return sum(counts)
    return sum(max(0, (n - first + step - 1) // step) for i, n in enumerate(counts)
               for first, step in [_kept(i, select)])


def rank_slice(global_batch: list, rank: int, batch_size: int) -> list:
    """Rank ``rank``'s part of a global batch: items ``[rank * B, (rank + 1) * B)``. The one place where the data is
    split across DDP processes: concatenated in rank order, the ranks' batches are the global batch."""
    return global_batch[rank * batch_size:(rank + 1) * batch_size]


def _batches_of(worker: int, end: int, num_workers: int) -> int:
    """How many of the batches ``0 .. end-1`` come from ``worker`` (batch b comes from worker b % num_workers)."""
    return (end - worker + num_workers - 1) // num_workers


class ImageTextShards(IterableDataset):
    """Batches of image-text pairs from tar shards; see the module docstring for the guarantees."""

    def __init__(
        self,
        urls: str | Iterable[str],
        tokenizer: TextTokenizer,
        transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        num_samples: int | None = None,
        max_bad_fraction: float = 0.1,
        weights: Sequence[float] | None = None,
        open_shards: int = 32,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if open_shards < 1:
            raise ValueError(f"open_shards must be >= 1, got {open_shards}")
        entries = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
        if weights is None and all(isinstance(entry, (str, os.PathLike)) for entry in entries):
            entries = [entries]  # shards, folders or patterns: one source
        self.weights = check_weights(weights, len(entries)) if weights is not None else None
        self.sources = [expand_urls(entry) for entry in entries]
        self.source_names = [str(entry) if isinstance(entry, (str, os.PathLike)) else _folder_of(source)
                             for entry, source in zip(entries, self.sources)]
        self.urls = [url for source in self.sources for url in source]
        try:
            self.shard_sizes: list[list[int]] | None = [shard_counts(source) for source in self.sources]
        except EvlpError:  # shards that cannot be counted (URLs): fine for evaluation, or with num_samples given
            if train and num_samples is None:
                raise
            self.shard_sizes = None
        self.source_sizes = [sum(counts) for counts in self.shard_sizes] if self.shard_sizes is not None else None
        if num_samples is None and self.source_sizes is not None:  # a source never drawn does not lengthen epochs
            num_samples = sum(n for k, n in enumerate(self.source_sizes) if self._drawn(k))
        self.num_samples = num_samples  # None only for evaluation over shards that cannot be counted
        self.tokenizer = tokenizer
        self.transform = transform
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.open_shards = open_shards
        self.max_bad_fraction = max_bad_fraction
        self.epoch, self.start_batch, self.rank, self.world_size = 0, 0, 0, 1
        # Skipped samples by reason: one row per DataLoader worker (make_loader shares the table with them).
        self._skips = torch.zeros((1, len(SKIP_REASONS)), dtype=torch.long)
        # Per-shard bookkeeping for the warnings; each DataLoader worker keeps its own copy.
        self._seen: Counter[str] = Counter()
        self._bad: Counter[str] = Counter()
        self._read: set[str] = set()  # shards read to the end at least once
        self._warned: set[str] = set()
        self._broken: set[str] = set()  # shards that could not be read to the end
        self._reports_reading = True
        self._seed_names: dict[str, str] = {}

    def share_skip_counts(self, num_workers: int) -> None:
        """Put the skip counts in shared memory with a row for each of ``num_workers`` DataLoader workers, so that
        what the workers count reaches this process (call before the loader starts its workers)."""
        rows = max(1, num_workers)
        if self._skips.shape[0] != rows or not self._skips.is_shared():
            table = torch.zeros((rows, len(SKIP_REASONS)), dtype=torch.long)
            table[0] = self._skips.sum(0)  # what earlier loaders counted
            self._skips = table.share_memory_()

    def skipped(self) -> dict[str, int]:
        """How many samples were skipped so far, by reason (nonzero reasons only); ``unreadable_shard`` counts
        shards cut short, whose remaining samples are unknown."""
        return {reason: n for reason, n in zip(SKIP_REASONS, self._skips.sum(0).tolist()) if n}

    @property
    def num_bad(self) -> int:
        """Samples skipped so far (unreadable shards not included)."""
        return sum(n for reason, n in self.skipped().items() if reason != "unreadable_shard")

    def configure(self, epoch: int, start_batch: int = 0, rank: int = 0, world_size: int = 1) -> None:
        """Set the epoch, the batch to resume from, and this process's DDP rank. Call before iter(); evaluation
        ignores ``rank`` and ``world_size`` (every process gets every sample)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"epoch and start_batch must be >= 0, got {epoch} and {start_batch}")
        self.epoch, self.rank, self.world_size = epoch, rank, world_size
        if self.train and start_batch > len(self):
            raise ValueError(f"start_batch {start_batch} is past the end of the epoch ({len(self)} batches)")
        self.start_batch = start_batch

    def __len__(self) -> int:
        """Batches in a full epoch on this rank (after ``configure(start_batch=s)``, iteration yields len - s)."""
        if self.num_samples is None:
            raise TypeError("the number of samples of these shards is unknown: pass num_samples")
        if not self.train:
            return math.ceil(self.num_samples / self.batch_size)
        n = self.num_samples // (self.batch_size * self.world_size)
        if n == 0:
            raise EvlpError(
                f"{self.num_samples} samples do not fill one batch of {self.batch_size} on each of "
                f"{self.world_size} processes: lower data.batch_size or add data"
            )
        return n

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # In evaluation every worker reads the whole stream (and decodes only its own batches): worker 0 alone
        # reports what reading finds, so that nothing is counted twice.
        self._reports_reading = self.train or worker == 0
        if self.train:
            return self._train_batches(worker, num_workers)
        return self._eval_batches(worker, num_workers)

    # -- batch schedules ------------------------------------------------------------------------------------------

    def _train_batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        n, s = len(self), self.start_batch
        # The DataLoader restarts its round robin at worker 0, so after a resume worker `worker` yields batches
        # s + worker, s + worker + num_workers, ...: those of worker `role` in the uninterrupted epoch.
        role = (s + worker) % num_workers
        done, quota = _batches_of(role, s, num_workers), _batches_of(role, n, num_workers)
        global_batch = self.batch_size * self.world_size
        records = self._slot_records(role, num_workers)  # the same stream on every rank
        records = itertools.islice(records, done * global_batch, None)  # raw bytes only: nothing decoded
        for _ in range(quota - done):
            # None only when not one image of the slice decodes; then the next global batch stands in for it.
            for _ in range(MAX_FAILED_BATCHES):
                batch = self._make_batch(rank_slice(list(itertools.islice(records, global_batch)), self.rank,
                                                    self.batch_size))
                if batch is not None:
                    break
            else:
                raise EvlpError(f"{MAX_FAILED_BATCHES} batches in a row without a decodable image ({self.urls[0]}, ...)")
            yield batch

    def _eval_batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        records = self._records(self.urls, pass_=0)
        for b in itertools.count():
            chunk = list(itertools.islice(records, self.batch_size))
            if not chunk:
                return
            if b >= self.start_batch and (b - self.start_batch) % num_workers == worker:
                batch = self._make_batch(chunk)
                if batch is not None:
                    yield batch

    def _slot_records(self, slot: int, num_slots: int) -> Iterator[dict]:
        """The endless record stream of one loader worker slot for the configured epoch: its part of every source,
        interleaved pair by pair.

        Without weights the sources are drawn without replacement in proportion to what is left of the slot's part
        of each (sequential sampling of a random interleave): every pair once per pass, and the source of each pair
        as in a global shuffle of the union. With weights, source ``k`` is drawn with probability
        ``weights[k] / sum(weights)``, its stream read again (next ``pass``) as often as needed."""
        drawn = [k for k in range(len(self.sources)) if self._drawn(k)]
        streams = {k: self._source_stream(k, slot, num_slots, self._share(k, self.shuffle_buffer),
                                          self._share(k, self.open_shards)) for k in drawn}
        if len(drawn) == 1:
            yield from streams[drawn[0]]
            return
        choose = random.Random(f"{self.seed}/{self.epoch}/{slot}/{num_slots}/mixture")
        if self.weights is not None:
            cumulative = list(itertools.accumulate(self.weights[k] for k in drawn))
            while True:
                yield next(streams[choose.choices(drawn, cum_weights=cumulative)[0]])
        parts = [self._part_size(k, slot, num_slots) for k in drawn]
        if not any(parts):
            raise EvlpError(f"data slot {slot} of {num_slots} holds no pair of any source: add data or use fewer "
                            f"loader workers")
        while True:  # one round per pass over the slot's parts
            left = list(parts)
            for _ in range(sum(parts)):
                i = choose.choices(range(len(drawn)), weights=left)[0]
                left[i] -= 1
                yield next(streams[drawn[i]])

    def _drawn(self, k: int) -> bool:
        return self.weights is None or self.weights[k] > 0

    def _share(self, k: int, total: int) -> int:
        """Source ``k``'s share of ``total`` (shuffle buffer, open shards), in proportion to its weight (or size)."""
        weights = self.weights or self.source_sizes or [len(source) for source in self.sources]
        return max(1, round(total * weights[k] / max(sum(weights), 1e-12)))

    def _part_size(self, k: int, slot: int, num_slots: int) -> int:
        """How many pairs the slot's part of source ``k`` holds (estimated per shard if they cannot be counted)."""
        shards, select = _slot_part(self.sources[k], self._shard_order(k), slot, num_slots)
        if self.shard_sizes is not None:
            sizes = dict(zip(self.sources[k], self.shard_sizes[k]))
            counts = [sizes[url] for url in shards]
        else:  # num_samples given for shards that cannot be counted
            counts = [max(1, round(self.num_samples / len(self.urls)))] * len(shards)
        return _kept_count(counts, select)

    def _shard_order(self, k: int) -> random.Random:
        """The generator that shuffles source ``k``'s shards for the epoch: the same on every rank and worker."""
        return random.Random(f"{self.seed}/{self.epoch}/source{k}")

    def _source_stream(self, k: int, slot: int, num_slots: int, buffer: int, width: int) -> Iterator[dict]:
        """The slot's endless shuffled stream of source ``k``: ``width`` of its shards open at once, their samples
        interleaved at random, through a shuffle buffer of ``buffer`` samples; then the next pass."""
        shards, select = _slot_part(self.sources[k], self._shard_order(k), slot, num_slots)
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot}/{num_slots}/source{k}")
        for pass_ in itertools.count():
            # Drained at the end of each pass, so the first pass yields each of the slot's samples exactly once.
            shuffle = wds.filters.shuffle(buffer, buffer, rng=rng)
            n = 0
            for record in shuffle(self._interleaved(shards, select, pass_, rng, width)):
                n += 1
                yield record
            if n == 0:
                raise EvlpError(f"no valid sample in the {len(shards)} shards of data slot {slot} of source "
                                f"{self.source_names[k]} ({shards[0]}, ...)")

    def _interleaved(self, shards: list[str], select, pass_: int, rng: random.Random, width: int) -> Iterator[dict]:
        """The records of ``shards``, ``width`` shards open at a time, each next record from one of them chosen at
        random; a shard that ends is replaced by the next one."""
        upcoming = iter(enumerate(shards))
        readers = [self._shard_records(url, _kept(i, select), pass_) for i, url in itertools.islice(upcoming, width)]
        while readers:
            j = rng.randrange(len(readers))
            record = next(readers[j], None)
            if record is not None:
                yield record
                continue
            following = next(upcoming, None)
            if following is not None:
                readers[j] = self._shard_records(following[1], _kept(following[0], select), pass_)
            else:
                readers[j] = readers[-1]
                readers.pop()

    def mixture_summary(self) -> list[str]:
        """One line per source of several: its pairs, share of the draws and, with weights, passes per epoch."""
        if len(self.sources) < 2:
            return []
        weights = self.weights or self.source_sizes
        if weights is None:
            return []
        total, lines = sum(weights), []
        draws = len(self) * self.batch_size * self.world_size if self.train and self.num_samples else None
        for k, (name, weight) in enumerate(zip(self.source_names, weights)):
            line = (f"{name}: weight {weight:g} ({100 * weight / total:.1f}% of the draws)" if self.weights else
                    f"{name}: {100 * weight / total:.1f}% of the draws")
            if self.source_sizes is not None:
                line += f", {self.source_sizes[k]:,} pairs"
                if self.weights and draws and self.source_sizes[k]:
                    line += f", ~{weight / total * draws / self.source_sizes[k]:.2f} passes per epoch"
            lines.append(line)
        return lines

    # -- reading and decoding -------------------------------------------------------------------------------------

    def _records(self, shards: list[str], pass_: int) -> Iterator[dict]:
        """Valid raw samples of ``shards``, in order."""
        for url in shards:
            yield from self._shard_records(url, None, pass_)

    def _shard_records(self, url: str, kept: tuple[int, int] | None, pass_: int) -> Iterator[dict]:
        """Valid raw samples of one shard, in order; ``kept=(first, step)`` keeps samples first, first + step, ...
        Checks only what is cheap: an image whose header parses and a caption."""
        for position, sample in enumerate(tar_samples(url, on_error=self._unreadable)):
            if kept is not None and (position < kept[0] or (position - kept[0]) % kept[1]):
                continue
            self._seen[url] += 1
            record = _to_record(sample, url, pass_)
            if isinstance(record, str):
                if self._reports_reading:
                    self._count_bad(url, record, f"sample {sample.get('__key__')}")
                continue
            yield record
        self._read.add(url)
        self._check_shard(url)

    def _make_batch(self, records: list[dict]) -> dict | None:
        # A transform with ``into`` (TrainTransform) takes the encoded bytes and writes into a row of the batch;
        # any other gets a PIL image and its results are stacked.
        into = getattr(self.transform, "into", None)
        rows = None
        if into is not None:
            rows = _new_batch(len(records), self.transform.output_shape, self.transform.output_dtype)
        images, kept = [], []
        if self.train:
            # Per-sample seeding below must not leak into the caller's RNG streams (num_workers=0 runs in the
            # training process, where the same generators drive dropout).
            saved = torch.get_rng_state(), random.getstate()
        for r in records:
            if self.train:
                seed = self._sample_seed(r)
                torch.default_generator.manual_seed(seed)
                random.seed(seed)
            try:
                if rows is not None:
                    into(r["image"], rows[len(kept)])
                else:
                    with Image.open(io.BytesIO(r["image"])) as image:
                        images.append(self.transform(image))
            except Exception as e:  # any decoder or transform failure: the sample is bad, the run goes on
                self._count_bad(r["url"], "decode_error", f"sample {r['key']}: {type(e).__name__}: {e}")
                continue
            kept.append(r)
        if self.train:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
        if not kept:
            return None
        good = len(kept)
        if self.train:
            # Fixed batch size (DDP gathers need it): fill the holes with copies of samples that did decode.
            for i in range(len(records) - good):
                if rows is not None:
                    rows[good + i].copy_(rows[i % good])
                else:
                    images.append(images[i % good])
                kept.append(kept[i % good])
        metas = [_parse_meta(r.get("json")) for r in kept]
        captions = [r["caption"] for r in kept]
        text, padding_mask = self.tokenizer(captions)
        return dict(
            # in a loader worker, both ways end in shared memory without another copy
            image=rows[: len(kept)] if rows is not None else default_collate(images),
            text=text,
            padding_mask=padding_mask,
            image_id=torch.tensor([_image_id(m, r["key"]) for m, r in zip(metas, kept)], dtype=torch.long),
            meta=metas,
            caption=captions,
        )

    def _sample_seed(self, record: dict) -> int:
        # The shard's last two path components, not its full path: a moved dataset resumes with the same augmentations.
        url = record["url"]
        source = self._seed_names.get(url)
        if source is None:
            source = self._seed_names[url] = "/".join(Path(url).parts[-2:])
        text = f"{self.seed}/{self.epoch}/{record['pass']}/{source}/{record['key']}"
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1

    def _count(self, reason: str) -> None:
        info = get_worker_info()
        row = info.id if info is not None and info.id < self._skips.shape[0] else 0
        self._skips[row, SKIP_REASONS.index(reason)] += 1

    def _count_bad(self, url: str, reason: str, what: str) -> None:
        self._count(reason)
        self._bad[url] += 1
        log.debug("%s: skipping %s (%s)", url, what, reason)
        self._check_shard(url)

    def _unreadable(self, url: str, error: BaseException) -> None:
        # Once per shard: a slot that reads its data again meets the damage again.
        if self._reports_reading and url not in self._broken:
            self._broken.add(url)
            self._count("unreadable_shard")
            _warn_unreadable(url, error)

    def _check_shard(self, url: str) -> None:
        seen, bad = self._seen[url], self._bad[url]
        if url in self._read and url not in self._warned and bad > self.max_bad_fraction * seen:
            self._warned.add(url)
            log.warning(
                "%s: %d of %d samples are bad (unreadable image or missing caption), more than max_bad_fraction=%g",
                url, bad, seen, self.max_bad_fraction,
            )  # fmt: skip


_BLOCK = 512
_END_BLOCK = bytes(_BLOCK)
_META = re.compile(r"__[^/]*__($|/)")


def tar_samples(url: str, on_error: Callable[[str, BaseException], None] | None = None) -> Iterator[dict]:
    """The samples of one shard, grouped as WebDataset's ``tarfile_samples`` groups them: ``{"__key__": "dir/name",
    "__url__": url, "<ext>": bytes, ...}`` for each run of members named ``dir/name.<ext>`` (extensions lower-cased,
    ``__...__`` members skipped, a repeated extension ignored).

    A local tar (plain, gzip, bzip2 or xz) is read by a minimal ustar/pax/GNU reader that checks each header's size
    against what the file holds (``_tar_members``); it is also fast: Python's ``tarfile`` spends ~0.1 ms per member
    parsing headers, more than a third of the time it takes to decode a 256-px JPEG. URLs (``pipe:``, ``http:``,
    ...) and zstd go through WebDataset. A shard that cannot be read on ends after the samples read so far, with
    ``on_error(url, exception)`` (by default a warning)."""
    report = on_error or _warn_unreadable

    def handler(exn: Exception) -> bool:  # WebDataset's: report, then stop reading this shard
        report(url, exn)
        return False

    try:
        f = open(url, "rb", buffering=1 << 20)
    except OSError:  # not a local file (or missing): WebDataset opens it, or warns why it cannot
        yield from tarfile_samples([dict(url=url)], handler=handler)
        return
    with f:
        try:
            stream = _decompressed(f)
        except tarfile.CompressionError:
            yield from tarfile_samples([dict(url=url)], handler=handler)
            return
        sample = None
        try:
            for name, data in _tar_members(stream, end=os.fstat(f.fileno()).st_size if stream is f else None):
                if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
                    continue
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue
                suffix = suffix.lower()
                if sample is None or prefix != sample["__key__"]:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": prefix, "__url__": url}
                if suffix in sample:
                    log.warning("%s: duplicate member %s, ignored", url, name)
                    continue
                sample[suffix] = data
        except TAR_ERRORS as e:
            report(url, e)
        if sample is not None:
            yield sample


def _warn_unreadable(url: str, error: BaseException) -> None:
    log.warning("%s: cannot read on, skipping the rest of this shard (%s)", url, first_line(error))


def _tar_members(f, end: int | None = None, read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """``(name, content)`` of the regular files of an uncompressed tar stream, in order (content None when not
    ``read``: it is skipped). A header is untrusted: the size it declares must fit in what the file still holds
    (``end``, its size, when known) before anything is read, and contents are read in bounded chunks, so a size
    field of 2^70 or 100 GB is a ``HeaderError``, never a huge allocation."""
    long_name, pax = None, {}
    while True:
        header = f.read(_BLOCK)
        if not header or header == _END_BLOCK:
            return  # end of the archive (a missing end marker is tolerated, as tarfile tolerates it)
        if len(header) < _BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        stored = _tar_number(header[148:156])
        if stored != 256 + sum(header) - sum(header[148:156]) and stored != 256 + sum(
            struct.unpack_from("148b8x356b", header)  # some old tars sum signed bytes (tarfile accepts both)
        ):
            raise tarfile.HeaderError("bad checksum")
        kind, size = header[156:157], _checked_size(_tar_number(header[124:136]), f, end, header)
        if kind in (b"x", b"g", b"L", b"K"):  # pax / GNU headers describing the next member
            data = _read_exactly(f, _padded(size))[:size]
            if kind == b"x":
                pax = _pax_records(data)
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        name = pax.get("path") or long_name or name
        size = _checked_size(int(pax["size"]), f, end, header) if "size" in pax else size
        long_name, pax = None, {}
        if kind in (b"0", b"\0", b"7") and not name.endswith("/"):
            if read:
                data = _read_exactly(f, size)
                _skip(f, _padded(size) - size)
            else:
                data = None
                _skip(f, _padded(size))
            yield name, data
        elif kind in (b"1", b"2", b"3", b"4", b"5", b"6"):  # links, devices, directories, fifos: no content
            continue
        else:
            _skip(f, _padded(size))


def _checked_size(size: int, f, end: int | None, header: bytes) -> int:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if size < 0:
        raise tarfile.HeaderError(f"member {name!r} has a negative size ({size})")
    if end is not None and size > end - f.tell():
        raise tarfile.HeaderError(f"member {name!r} claims {size:,} bytes, more than the {end - f.tell():,} left in "
                                  f"the file")
    return size


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


_READ_CHUNK = 16 << 20


def _read_exactly(f, size: int) -> bytes:
    if size <= _READ_CHUNK:
        data = f.read(size)
    else:  # in chunks: memory follows the bytes that actually arrive, not the size a header claims
        parts, left = [], size
        while left and (part := f.read(min(left, _READ_CHUNK))):
            parts.append(part)
            left -= len(part)
        data = b"".join(parts)
    if len(data) < size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _skip(f, size: int) -> None:
    if size == 0:
        return
    if f.seekable() and not isinstance(f, (gzip.GzipFile, bz2.BZ2File, lzma.LZMAFile)):
        f.seek(size, os.SEEK_CUR)  # a plain file: its size was checked against the header already
        return
    while size:  # a decompressed stream: read through, stopping at its end
        part = f.read(min(size, _READ_CHUNK))
        if not part:
            raise tarfile.ReadError("unexpected end of data")
        size -= len(part)


def _tar_number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[:1] == b"\xff" else n
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:
        raise tarfile.HeaderError(f"invalid number {field!r} in a tar header") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """``length key=value\\n`` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise tarfile.HeaderError("invalid pax header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _to_record(sample: dict, url: str, pass_: int) -> dict | str:
    """The fields we use from a raw WebDataset sample, or the reason (one of ``SKIP_REASONS``) it cannot be used:
    checked from the caption and the image's header only, nothing is decoded."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    text_ext = next((e for e in TEXT_EXTENSIONS if e in sample), None)
    if image_ext is None:
        return "missing_image"
    try:
        caption = sample[text_ext].decode("utf-8").strip() if text_ext is not None else ""
    except UnicodeDecodeError:
        caption = ""
    if not caption:
        return "missing_caption"
    size = jpeg_size(sample[image_ext])  # a JPEG's frame header is read in microseconds, else PIL reads the header
    if size is None:
        try:
            with Image.open(io.BytesIO(sample[image_ext])) as image:
                size = image.size
        except Image.DecompressionBombError:
            return "too_large"
        except Exception:  # Pillow's header parsers raise anything on junk
            return "not_an_image"
    problem = size_problem(*size)
    if problem:
        return problem
    return {
        "key": sample["__key__"],
        "url": url,
        "pass": pass_,
        "image": sample[image_ext],
        "caption": caption,
        "json": sample.get("json"),
    }


def _parse_meta(raw: bytes | None) -> dict:
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _image_id(meta: dict, key: str) -> int:
    image_id = meta.get("image_id")
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        return image_id
    stem = key.rsplit("/", 1)[-1]
    if stem.isdigit():
        return int(stem)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def read_images(urls: Iterable[str], image_ids: set[int]) -> dict[int, bytes]:
    """The encoded image of each of ``image_ids`` (numbered as ``ImageTextShards`` numbers them) found in the shards,
    first occurrence; for showing a few images of a split, so nothing is decoded."""
    found: dict[int, bytes] = {}
    for url in urls:
        for sample in tar_samples(url):
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            image_id = _image_id(_parse_meta(sample.get("json")), sample["__key__"])
            if image_ext is not None and image_id in image_ids and image_id not in found:
                found[image_id] = sample[image_ext]
        if len(found) == len(image_ids):
            break
    return found


def _new_batch(n: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (n, *shape) batch; in a DataLoader worker in shared memory, where the batch has to go anyway
    (what ``default_collate`` does: it saves a copy of every batch)."""
    if get_worker_info() is not None:
        try:
            storage = torch.UntypedStorage._new_shared(n * math.prod(shape) * dtype.itemsize)
        except (AttributeError, RuntimeError):  # private API: fall back to a plain tensor, moved when sent
            pass
        else:
            return torch.empty(0, dtype=dtype).set_(storage).view(n, *shape)
    return torch.empty((n, *shape), dtype=dtype)


def make_loader(dataset: ImageTextShards, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over whole batches. Workers are not persistent, so each epoch's iter() sees ``configure``."""
    if num_workers > 0:
        # The tokenizer runs in the workers; Rust-side threads in forked workers only add contention and warnings.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dataset.share_skip_counts(num_workers)
    return DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False
    )
