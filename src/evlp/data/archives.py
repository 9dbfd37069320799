"""Safe extraction of zip and tar(.gz) archives, with a progress bar over the archive's bytes.

Archives from mirrors are untrusted input, so extraction is ours, member by member, and relies on no library
filter (tarfile's ``data`` filter is bypassable before Python 3.11.13 / 3.12.11 / 3.13.4, CVE-2025-4517): a member
is written only if

* it is a regular file or a folder: symbolic and hard links, devices, FIFOs and anything else are refused (the
  datasets we extract hold none, and a link is how every known bypass escapes);
* its name is relative, without ``..``, drive letters or backslash tricks, and the path it resolves to (through any
  link already in the target folder) lies inside the target folder; files are opened without following a link;
* the archive would not expand past ``MAX_RATIO`` times its own size (with a floor of ``MIN_BUDGET`` for small
  archives) nor past ``MAX_TOTAL`` bytes: a zip's sizes are checked from its directory before anything is written,
  a tar's member by member (the size each header declares is what tarfile then reads).

Files get mode 0644 and folders 0755 (no setuid bits, no modes from the archive). Any refusal stops the extraction
with an ``EvlpError`` naming the member. A damaged archive (bad CRC, a corrupt deflate or gzip stream, a cut file)
is one line naming it and saying what to do: delete it and rerun to download it again.
"""

from __future__ import annotations

import errno
import gzip
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from evlp.errors import EvlpError

MAX_RATIO = 100  # extracted bytes per archive byte: JPEG and pickle archives are ~1x, JSON ~5-10x, bombs 1000x+
MIN_BUDGET = 256 << 20  # what any archive may expand to, however small
MAX_TOTAL = 2 << 40  # 2 TiB: no archive we fetch comes near it (ImageNet's largest is ~30 GB)
_CHUNK = 1 << 20
_TAR_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE:
              "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO",
              tarfile.GNUTYPE_SPARSE: "a sparse file"}
_MODE_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
               stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def extraction_budget(archive: Path) -> int:
    """How many bytes ``archive`` may expand to (see the module docstring)."""
    return min(MAX_TOTAL, max(MIN_BUDGET, MAX_RATIO * archive.stat().st_size))


def extract_zip(
    archive: str | os.PathLike, dest: str | os.PathLike, members: Iterable[str] | None = None
) -> list[Path]:
    """Extract ``members`` (all when None) of a zip into ``dest``; returns the extracted file paths."""
    archive, dest = Path(archive), Path(dest)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if members is not None:
                wanted = set(members)
                infos = [i for i in infos if i.filename in wanted]
                missing = wanted - {i.filename for i in infos}
                if missing:
                    raise EvlpError(f"{archive.name} has no {', '.join(sorted(missing))}: not the expected archive")
            for info in infos:
                kind = _MODE_KINDS.get(stat.S_IFMT(info.external_attr >> 16)) if info.create_system == 3 else None
                if kind:
                    raise EvlpError(f"refusing to extract {archive.name}: member {info.filename!r} is {kind}")
            # The directory's sizes are binding: zipfile stops each member at its declared size (and its CRC check
            # then fails), so checking them here bounds what can be written.
            total, budget = sum(info.file_size for info in infos), extraction_budget(archive)
            if total > budget:
                raise _bomb(archive, budget)
            targets = [(info, _target(dest, info.filename, archive)) for info in infos]
            written = []
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"extracting {archive.name}", leave=False) as bar:
                for info, target in targets:
                    if info.is_dir():
                        _make_folder(target, dest, info.filename, archive)
                        continue
                    _make_folder(target.parent, dest, info.filename, archive)
                    with zf.open(info) as src:
                        _write_file(src, target, bar)
                    written.append(target)
            return written
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a bad CRC, a corrupt deflate stream, a cut file
        raise _damaged(archive, e) from None
    except OSError as e:
        raise _write_error(e, archive, dest) from e


def extract_tar(archive: str | os.PathLike, dest: str | os.PathLike) -> int:
    """Extract a tar or tar.gz into ``dest`` (regular files and folders only, see the module docstring); returns
    the number of files extracted."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    n, extracted, budget = 0, 0, extraction_budget(archive)
    with open(archive, "rb") as raw, tqdm(
        total=archive.stat().st_size, unit="B", unit_scale=True, desc=f"extracting {archive.name}"
    ) as bar:
        try:
            # Stream mode ("r|*"): one pass over the compressed file, no seeking back for each member.
            with tarfile.open(fileobj=_Counting(raw, bar), mode="r|*") as tar:
                for member in tar:
                    kind = _TAR_KINDS.get(member.type) or (None if member.isreg() or member.isdir() else
                                                           f"an unsupported member type {member.type!r}")
                    if kind:
                        raise EvlpError(f"refusing to extract {archive.name}: member {member.name!r} is {kind}")
                    target = _target(dest, member.name, archive)
                    if member.isdir():
                        _make_folder(target, dest, member.name, archive)
                        continue
                    extracted += member.size
                    if extracted > budget:
                        raise _bomb(archive, budget)
                    _make_folder(target.parent, dest, member.name, archive)
                    _write_file(tar.extractfile(member), target)
                    n += 1
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise _damaged(archive, e) from None
        except OSError as e:  # gzip's BadGzipFile is an OSError about the archive, the rest are about writing
            if isinstance(e, gzip.BadGzipFile):
                raise _damaged(archive, e) from None
            raise _write_error(e, archive, dest) from e
    return n


def _target(dest: Path, name: str, archive: Path) -> Path:
    """Where member ``name`` goes: checked by its name, then by the real path it resolves to now."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise EvlpError(f"refusing to extract {archive.name}: member {name!r} would land outside {dest}")
    target = dest / path
    if not target.resolve().is_relative_to(dest.resolve()):  # through a link already in dest
        raise EvlpError(f"refusing to extract {archive.name}: member {name!r} would land outside {dest}")
    return target


def _make_folder(folder: Path, dest: Path, name: str, archive: Path) -> None:
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    if not folder.resolve().is_relative_to(dest.resolve()):
        raise EvlpError(f"refusing to extract {archive.name}: member {name!r} would land outside {dest}")


def _write_file(src, target: Path, bar: tqdm | None = None) -> None:
    # O_NOFOLLOW: a link put in place of the file after the check above is not followed.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_BINARY", 0), 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(_CHUNK):
            out.write(chunk)
            if bar is not None:
                bar.update(len(chunk))


def _bomb(archive: Path, budget: int) -> EvlpError:
    return EvlpError(f"refusing to extract {archive.name}: it would expand to more than {budget:,} bytes "
                     f"({MAX_RATIO}x its {archive.stat().st_size:,} bytes, at most {MAX_TOTAL:,}); not the expected "
                     f"archive: delete it and check where it came from")


def _damaged(archive: Path, e: BaseException) -> EvlpError:
    """The archive itself is corrupt (not an attack, not a disk problem): the fix is to download it again."""
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return EvlpError(f"{archive} is damaged ({why}): delete it and rerun to download it again")


def _write_error(e: OSError, archive: Path, dest: Path) -> EvlpError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return EvlpError(f"no space left in {dest} while extracting {archive.name}: free some space and rerun")
    if e.errno == errno.ELOOP:
        return EvlpError(f"refusing to extract {archive.name}: a link in {dest} stands where a file goes")
    return EvlpError(f"extracting {archive.name} into {dest} failed: {e.strerror or e}")


class _Counting:
    """A read-only file wrapper that advances a progress bar by the compressed bytes read."""

    def __init__(self, f, bar: tqdm):
        self._f, self._bar = f, bar

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._bar.update(len(data))
        return data
