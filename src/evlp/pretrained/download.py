"""Resumable HTTP downloads of large weight files, with httpx.

A file is written to ``<dest>.part`` and renamed to ``<dest>`` only once complete (``os.replace``, atomic within a
filesystem), so an existing ``<dest>`` is always a whole file. An interrupted transfer keeps the ``.part``; the next
attempt (a retry here, or a later run) asks for the rest with ``Range: bytes=<size>-`` and appends when the server
answers ``206 Partial Content``, or starts over when it answers a plain ``200``.

Each file has an overall deadline, whatever the server does: ``DEADLINE_BASE_S`` plus its size at ``MIN_RATE``
(the size as declared, or as received so far when none is), so a server trickling bytes slowly enough to never trip
a read timeout is still stopped. ``verify`` checks the complete ``.part`` before it gets its real name; a file that
fails is deleted. A stop for any reason is one line naming the file and what to do; the ``.part`` keeps what
arrived, and the next run resumes there.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from tqdm import tqdm

from evlp.errors import EvlpError
from evlp.pretrained.files import first_line

CHUNK = 1 << 20
CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)")
DEADLINE_BASE_S = 600.0  # every file may take this long, plus its size at MIN_RATE
MIN_RATE = 256 * 1024  # bytes per second, on average over the whole file
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 30.0, 120.0


class Interrupted(Exception):
    """A transfer that stopped before the end; retried from what the ``.part`` file holds."""


class _Deadline:
    """The time a file must have arrived by: ``start + DEADLINE_BASE_S + size / MIN_RATE``."""

    def __init__(self):
        self.start, self.size = time.monotonic(), 0

    def expect(self, size: int | None) -> None:
        self.size = max(self.size, size or 0)

    @property
    def limit(self) -> float:
        return DEADLINE_BASE_S + self.size / MIN_RATE

    def left(self) -> float:
        return self.start + self.limit - time.monotonic()


class _TooSlow(Exception):
    pass


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _content_range(response: httpx.Response) -> tuple[int | None, int | None]:
    """``(first byte, total size)`` of a ``Content-Range: bytes 100-199/1000`` (or ``bytes */1000``) header."""
    m = CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
    if not m:
        return None, None
    start, total = m.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _fetch(client: httpx.Client, url: str, part: Path, label: str, deadline: _Deadline) -> None:
    """One GET that continues ``part`` from its current size; raises ``Interrupted`` if it stops early and
    ``_TooSlow`` past the deadline."""
    offset = part.stat().st_size if part.exists() else 0
    # Byte offsets must be those of the file itself, not of a compressed transfer of it.
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={offset}-"} if offset else {})
    if deadline.left() <= 0:
        raise _TooSlow
    wait = max(0.1, min(READ_TIMEOUT_S, deadline.left()))  # no single wait may outlast the deadline
    timeout = httpx.Timeout(min(CONNECT_TIMEOUT_S, wait), read=wait)
    with client.stream("GET", url, headers=headers, timeout=timeout) as response:
        if response.status_code == 416 and offset:  # nothing left to send: the .part is whole, or not this file
            if _content_range(response)[1] == offset:
                return
            part.unlink()
            raise Interrupted(f"{part.name} is longer than the remote file")
        if response.status_code >= 500:
            raise Interrupted(f"HTTP {response.status_code} {response.reason_phrase}")
        if response.status_code not in (200, 206):
            raise EvlpError(f"download of {url} failed: HTTP {response.status_code} {response.reason_phrase}")
        if response.headers.get("content-type", "").startswith("text/html"):
            raise EvlpError(f"download of {url} failed: the server sent an HTML page instead of the file (a login or "
                            f"error page?); check the URL")
        if response.status_code == 206:
            start, total = _content_range(response)
            if start != offset:  # a server that resumes elsewhere than asked cannot be trusted to append to
                part.unlink()
                raise Interrupted(f"the server resumed at byte {start}, not {offset}")
        else:  # 200: the server ignored the Range header (or none was sent): start over
            offset = 0
            length = response.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
        deadline.expect(total)
        with open(part, "ab" if offset else "wb") as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar:
            for chunk in response.iter_bytes():  # as received, so that a cut transfer keeps what arrived
                f.write(chunk)
                bar.update(len(chunk))
                deadline.expect(bar.n)
                if deadline.left() < 0:
                    raise _TooSlow
    size = part.stat().st_size
    if total is not None and size != total:
        raise Interrupted(f"received {size:,} of {total:,} bytes")


def download_file(url: str, dest: str | Path, attempts: int = 3, retry_wait: float = 2.0,
                  verify: Callable[[Path], None] | None = None) -> Path:
    """Download ``url`` to ``dest``, resuming ``<dest>.part`` if a previous run left one. ``verify(part)`` may raise
    ``EvlpError`` for a complete file that is not what was asked for; it is then deleted. Returns ``dest``."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    deadline = _Deadline()

    def kept() -> str:
        size = part.stat().st_size if part.exists() else 0
        return f"; {part.name} keeps the {size:,} bytes received and the next run resumes there" if size else ""

    with httpx.Client(follow_redirects=True) as client:
        for attempt in range(1, attempts + 1):
            try:
                _fetch(client, url, part, dest.name, deadline)
                break
            except _TooSlow:
                raise EvlpError(f"download of {url} did not finish within {deadline.limit:.0f} s (slower than "
                                f"{MIN_RATE // 1024} KiB/s on average){kept()}: rerun, or use another mirror"
                                ) from None
            except httpx.TooManyRedirects:
                raise EvlpError(f"download of {url} failed: the server redirects in a loop; check the URL or use "
                                f"another mirror") from None
            except (httpx.TransportError, Interrupted) as e:
                if attempt == attempts or deadline.left() <= 0:
                    reason = "timed out" if isinstance(e, httpx.TimeoutException) else first_line(e)
                    tries = f"{attempt} attempt" + ("s" if attempt > 1 else "")
                    raise EvlpError(f"download of {url} failed after {tries} ({type(e).__name__}: {reason}){kept()}; "
                                    f"rerun, or use another mirror") from e
                time.sleep(retry_wait * attempt)
            except httpx.HTTPError as e:  # an invalid URL or protocol: retrying cannot help
                raise EvlpError(f"download of {url} failed: {first_line(e)}; check the URL") from None
    if verify is not None:
        try:
            verify(part)
        except EvlpError as e:
            part.unlink(missing_ok=True)
            raise EvlpError(f"download of {url} is not what was expected, deleted it: {e}") from None
    os.replace(part, dest)
    return dest
