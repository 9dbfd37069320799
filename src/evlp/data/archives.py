"""Safe extraction of zip and tar(.gz) archives, with a progress bar over the archive's bytes.

A member that would land outside the target folder (an absolute path, ``..`` components, a link pointing out, a
device file) stops the extraction with ``EvlpError``: archives from mirrors are untrusted input. Zip members are
CRC-checked as they are read, so a corrupt download fails here rather than yielding damaged images.
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from evlp.errors import EvlpError


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
            targets = [(info, _target(dest, info.filename, archive)) for info in infos]
            for info, _ in targets:
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise EvlpError(f"refusing to extract {archive.name}: member {info.filename!r} is a symbolic link")
            written = []
            total = sum(info.file_size for info in infos)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"extracting {archive.name}", leave=False) as bar:
                for info, target in targets:
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    bar.update(info.file_size)
                    written.append(target)
            return written
    except zipfile.BadZipFile as e:
        raise EvlpError(f"{archive} is not a valid zip ({e}): delete it and rerun to download it again") from e
    except OSError as e:
        raise _write_error(e, archive, dest) from e


def _write_error(e: OSError, archive: Path, dest: Path) -> EvlpError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return EvlpError(f"no space left in {dest} while extracting {archive.name}: free some space and rerun")
    return EvlpError(f"extracting {archive.name} into {dest} failed: {e.strerror or e}")


def _target(dest: Path, name: str, archive: Path) -> Path:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise EvlpError(f"refusing to extract {archive.name}: member {name!r} would land outside {dest}")
    target = (dest / path).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise EvlpError(f"refusing to extract {archive.name}: member {name!r} would land outside {dest}")
    return target


class _Counting:
    """A read-only file wrapper that advances a progress bar by the compressed bytes read."""

    def __init__(self, f, bar: tqdm):
        self._f, self._bar = f, bar

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._bar.update(len(data))
        return data


def extract_tar(archive: str | os.PathLike, dest: str | os.PathLike) -> int:
    """Extract a tar or tar.gz into ``dest`` with the ``data`` filter (no paths outside, no links out, no device
    files, no setuid bits); returns the number of files extracted."""
    archive, dest = Path(archive), Path(dest)
    if not hasattr(tarfile, "data_filter"):
        raise EvlpError("safe tar extraction needs Python >= 3.10.12 or >= 3.11.4 (tarfile's data filter)")
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(archive, "rb") as raw, tqdm(
        total=archive.stat().st_size, unit="B", unit_scale=True, desc=f"extracting {archive.name}"
    ) as bar:
        try:
            # Stream mode ("r|*"): one pass over the compressed file, no seeking back for each member.
            with tarfile.open(fileobj=_Counting(raw, bar), mode="r|*") as tar:
                for member in tar:
                    tar.extract(member, dest, filter="data")
                    n += member.isfile()
        except tarfile.FilterError as e:
            raise EvlpError(f"refusing to extract {archive.name}: {e}") from e
        except (tarfile.TarError, EOFError) as e:
            raise EvlpError(f"{archive} is damaged ({e}): delete it and rerun to download it again") from e
        except OSError as e:  # gzip's BadGzipFile is an OSError about the archive, the rest are about writing
            if isinstance(e, gzip.BadGzipFile):
                raise EvlpError(f"{archive} is damaged ({e}): delete it and rerun to download it again") from e
            raise _write_error(e, archive, dest) from e
    return n
