"""A resumable folder of WebDataset shards: ``000000.tar`` + ``000000.stats.json`` per shard, ``stats.json`` overall.

Shard ``k`` holds the rows ``[k * shard_size, (k + 1) * shard_size)`` of its source, so a row's shard never depends
on what happened to other rows, and a rerun can skip whole shards. A shard is written in one go once all its rows
are settled: the tar goes to ``000000.tar.tmp`` and is renamed, then its stats file is written (atomically too).
**The stats file marks a finished shard**: a tar without one (the run died between the two renames) or a ``.tmp``
left by a killed run is redone. A shard in which no row succeeded gets a stats file but no tar, since an empty tar
would only be a trap for readers.

Where the rows can be fingerprinted cheaply (``evlp data convert``: each row's path and caption, and the size and
modification time of its local files), the stats file also records ``inputs``, a digest of its rows'
fingerprints, and a shard is finished only while its rows still have that digest: a rerun redoes exactly the
shards whose images or captions changed (a fixed path, an added caption file), and a shard written by a run that
could not read its rows is never taken for finished once they can be read.

``SplitFolders`` writes a deterministic held-out split into ``<out>/train`` and ``<out>/val``, two such folders.

``000000.stats.json``::

    {"shard": "000000.tar", "rows": [0, 1000], "attempted": 1000, "succeeded": 712,
     "failed": {"http_404": 201, "timeout": 40, ...}, "bytes_downloaded": ..., "bytes_written": ..., "params": {...}}

``stats.json`` (rewritten after every shard; ``shards`` and ``num_samples`` are what ``count_samples`` reads)::

    {"num_samples": 712, "shards": {"000000.tar": 712}, "finished_shards": 1, "attempted": 1000,
     "succeeded": 712, "failed": {...}, "bytes_downloaded": ..., "bytes_written": ..., "params": {...}, ...}

``params`` (shard size, image size, source, ...) are recorded with every shard; a rerun with different ones stops
with an error instead of mixing two kinds of shards in one folder. One process at a time may write a folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from collections import Counter
from pathlib import Path

import webdataset as wds

from evlp.errors import EvlpError

SHARD_STATS = re.compile(r"(\d{6,})\.stats\.json")


class DiskFull(EvlpError):
    """No space left while writing; every shard finished before is intact."""


def shard_name(k: int) -> str:
    return f"{k:06d}.tar"


class ShardFolder:
    """Writes finished shards into ``directory``; see the module docstring for the files and their meaning."""

    def __init__(self, directory: str | os.PathLike, shard_size: int, params: dict, info: dict | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = Path(directory)
        self.shard_size = shard_size
        self.params = dict(params, shard_size=shard_size)
        self.info = dict(info or {})  # extra fields for stats.json (source file, row count, ...)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EvlpError(f"cannot create {self.directory}: {e.strerror or e}") from e
        self._lock = self._take_lock()
        self.finished: dict[int, dict] = {}
        try:
            self._check_folder_params()
            self._load_finished()
            self._remove_leftovers()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._lock.close()  # releases the flock

    def __enter__(self) -> ShardFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state -----------------------------------------------------------------------------------------------------

    def _take_lock(self):
        lock = open(self.directory / ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise EvlpError(f"another evlp process is writing to {self.directory}; wait for it or stop it") from None
        return lock

    def _check_folder_params(self) -> None:
        # Shards of another kind (e.g. the hub's pre-crawled ones) must not end up mixed with these.
        try:
            recorded = json.loads((self.directory / "stats.json").read_text()).get("params")
        except (OSError, ValueError, AttributeError):
            return
        if recorded is not None and recorded != self.params:
            raise EvlpError(
                f"{self.directory} holds shards made with {_describe(recorded)} (see stats.json); this run asks for "
                f"{_describe(self.params)}: rerun with the same options or use another folder"
            )

    def _load_finished(self) -> None:
        for path in sorted(self.directory.glob("*.stats.json")):
            m = SHARD_STATS.fullmatch(path.name)
            if not m:
                continue
            try:
                stats = json.loads(path.read_text())
            except (OSError, ValueError):
                stats = None
            if not isinstance(stats, dict) or not isinstance(stats.get("succeeded"), int):
                continue  # unreadable: the shard is simply redone and the file rewritten
            k = int(m.group(1))
            if stats.get("params") != self.params:  # also checked per shard: stats.json is rewritten last
                raise EvlpError(
                    f"{self.directory} holds shards made with {_describe(stats.get('params'))} (see {path.name}); this "
                    f"run asks for {_describe(self.params)}: rerun with the same options or use another folder"
                )
            if stats["succeeded"] > 0 and not (self.directory / shard_name(k)).is_file():
                continue  # its tar was deleted: redo it
            self.finished[k] = stats

    def _remove_leftovers(self) -> None:
        for path in self.directory.iterdir():
            name = path.name
            k = _shard_index(name)
            stale_tar = k is not None and name == shard_name(k) and k not in self.finished
            if name.endswith(".tmp") or stale_tar:
                path.unlink()

    def is_finished(self, k: int, inputs: str | None = None) -> bool:
        """Shard ``k`` is written; with ``inputs``, written from rows with that digest (see the module docstring)."""
        return k in self.finished and (inputs is None or self.finished[k].get("inputs") == inputs)

    def totals(self) -> dict:
        failed: Counter[str] = Counter()
        totals = Counter()
        for stats in self.finished.values():
            failed.update(stats.get("failed", {}))
            for key in ("attempted", "succeeded", "bytes_downloaded", "bytes_written"):
                totals[key] += stats.get(key, 0)
        shards = {shard_name(k): s["succeeded"] for k, s in sorted(self.finished.items()) if s["succeeded"] > 0}
        return dict(
            num_samples=sum(shards.values()),
            shards=shards,
            finished_shards=len(self.finished),
            attempted=totals["attempted"],
            succeeded=totals["succeeded"],
            failed=dict(sorted(failed.items(), key=lambda kv: -kv[1])),
            bytes_downloaded=totals["bytes_downloaded"],
            bytes_written=totals["bytes_written"],
        )

    # -- writing ---------------------------------------------------------------------------------------------------

    def write_shard(self, k: int, samples: list[dict], stats: dict) -> dict:
        """Write shard ``k`` (``samples``: dicts with ``__key__`` and encoded fields, in order) and its stats file;
        returns the stats as written."""
        name = shard_name(k)
        stats = dict(
            shard=name, rows=[k * self.shard_size, (k + 1) * self.shard_size], **stats, params=self.params
        )
        tmp = self.directory / f"{name}.tmp"
        try:
            if samples:
                with open(tmp, "wb") as f:
                    # Fixed mtime, user and group: the shard's bytes depend on its samples only.
                    with wds.TarWriter(f, encoder=False, mtime=0, user="evlp", group="evlp") as sink:
                        for sample in samples:
                            sink.write(sample)
                    f.flush()
                    os.fsync(f.fileno())
                stats["bytes_written"] = tmp.stat().st_size
                os.replace(tmp, self.directory / name)
            else:
                stats["bytes_written"] = 0
                (self.directory / name).unlink(missing_ok=True)  # a shard redone with no pair left
            write_json(self.directory / f"{k:06d}.stats.json", stats)
            self.finished[k] = stats
            self.write_summary()
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(
                    f"no space left on the device of {self.directory} while writing {name}; the "
                    f"{len(self.finished)} shards finished before are kept: free some space and rerun the same "
                    f"command to continue"
                ) from e
            raise EvlpError(f"cannot write {self.directory / name}: {e.strerror or e}") from e
        return stats

    def write_summary(self) -> dict:
        summary = dict(self.totals(), params=self.params, **self.info)
        write_json(self.directory / "stats.json", summary)
        return summary


class SplitFolders:
    """A held-out split: two ``ShardFolder``\ s, ``<directory>/train`` and ``<directory>/val``, with the same shard
    geometry. Shard ``k`` of each holds its side's pairs among the source rows ``[k * shard_size, (k + 1) *
    shard_size)``, and both are written together (val first): shard ``k`` is finished when both sides have it.

    A pair's side depends only on the SHA-256 of its image's bytes as read (``in_val``), never on its row, its caption
    or the other pairs, so a re-conversion (rows added, removed or reordered) keeps every pair on its side, identical
    images always share a side, and a larger ``val_fraction`` only moves pairs from train to val. Rows that fail have
    no side; they are counted in the train folder's stats."""

    SIDES = ("train", "val")

    def __init__(self, directory: str | os.PathLike, shard_size: int, params: dict, val_fraction: float,
                 info: dict | None = None):
        if not 0 < val_fraction < 1:
            raise EvlpError(f"--val-fraction must lie strictly between 0 and 1; got {val_fraction}")
        directory = Path(directory)
        if (directory / "stats.json").is_file():
            raise EvlpError(f"{directory} holds shards converted without --val-fraction; use another --out for a "
                            f"split conversion")
        self.val_fraction = val_fraction
        self.shard_size = shard_size
        self.folders: dict[str, ShardFolder] = {}
        try:
            for side in self.SIDES:
                self.folders[side] = ShardFolder(directory / side, shard_size,
                                                 dict(params, val_fraction=val_fraction, split=side), info)
        except BaseException:
            self.close()
            raise

    @property
    def finished(self) -> dict[int, dict]:
        train, val = self.folders["train"].finished, self.folders["val"].finished
        return {k: stats for k, stats in train.items() if k in val}

    def is_finished(self, k: int, inputs: str | None = None) -> bool:
        return all(folder.is_finished(k, inputs) for folder in self.folders.values())

    def in_val(self, source_sha256: bytes) -> bool:
        """The first 8 bytes of the digest as a fraction of 2^64, against ``val_fraction``."""
        return int.from_bytes(source_sha256[:8], "big") < self.val_fraction * 2**64

    def write_shard(self, k: int, samples: list[dict], stats: dict) -> dict:
        val = [sample for sample in samples if self.in_val(sample["__source_sha256__"])]
        train = [sample for sample in samples if not self.in_val(sample["__source_sha256__"])]
        written = self.folders["val"].write_shard(
            k, val, dict(stats, attempted=len(val), succeeded=len(val), failed={}, bytes_downloaded=0))
        written_train = self.folders["train"].write_shard(
            k, train, dict(stats, attempted=stats["attempted"] - len(val), succeeded=len(train)))
        return dict(written_train, bytes_written=written_train["bytes_written"] + written["bytes_written"])

    def totals(self) -> dict:
        sides = {side: folder.totals() for side, folder in self.folders.items()}
        return dict(num_samples=sum(t["num_samples"] for t in sides.values()),
                    shards={f"{side}/{name}": n for side, t in sides.items() for name, n in t["shards"].items()},
                    sides=sides)

    def close(self) -> None:
        for folder in self.folders.values():
            folder.close()

    def __enter__(self) -> SplitFolders:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shard_index(name: str) -> int | None:
    stem = name.split(".", 1)[0]
    return int(stem) if stem.isdigit() and len(stem) >= 6 else None


def _describe(params) -> str:
    if not isinstance(params, dict):
        return "unknown options"
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()))


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
