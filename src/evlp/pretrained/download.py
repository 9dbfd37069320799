"""Resumable HTTP downloads of large weight files, with httpx.

A file is written to ``<dest>.part`` and renamed to ``<dest>`` only once complete (``os.replace``, atomic within a
filesystem), so an existing ``<dest>`` is always a whole file. An interrupted transfer keeps the ``.part``; the next
attempt (a retry here, or a later run) asks for the rest with ``Range: bytes=<size>-`` and appends when the server
answers ``206 Partial Content``, or starts over when it answers a plain ``200``.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from evlp.errors import EvlpError
from evlp.pretrained.files import first_line

CHUNK = 1 << 20
CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)")


class Interrupted(Exception):
    """A transfer that stopped before the end; retried from what the ``.part`` file holds."""


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


def _fetch(client: httpx.Client, url: str, part: Path, label: str) -> None:
    """One GET that continues ``part`` from its current size; raises ``Interrupted`` if it stops early."""
    offset = part.stat().st_size if part.exists() else 0
    # Byte offsets must be those of the file itself, not of a compressed transfer of it.
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={offset}-"} if offset else {})
    with client.stream("GET", url, headers=headers) as response:
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
        with open(part, "ab" if offset else "wb") as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar:
            for chunk in response.iter_bytes():  # as received, so that a cut transfer keeps what arrived
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise Interrupted(f"received {size:,} of {total:,} bytes")


def download_file(url: str, dest: str | Path, attempts: int = 3, retry_wait: float = 2.0) -> Path:
    """Download ``url`` to ``dest``, resuming ``<dest>.part`` if a previous run left one. Returns ``dest``."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0)) as client:
        for attempt in range(1, attempts + 1):
            try:
                _fetch(client, url, part, dest.name)
                break
            except (httpx.TransportError, Interrupted) as e:
                if attempt == attempts:
                    kept = part.stat().st_size if part.exists() else 0
                    hint = f"; {part} keeps the {kept:,} bytes received and the next run resumes there"
                    raise EvlpError(f"download of {url} failed after {attempts} attempts ({type(e).__name__}: "
                                    f"{first_line(e)}){hint if kept else ''}") from e
                time.sleep(retry_wait * attempt)
    os.replace(part, dest)
    return dest
