"""Image bytes for a row: over HTTP(S) with retries, exponential back-off and a total timeout, or from a local file.

``Fetcher.fetch(source)`` returns the bytes or raises ``Rejected`` with the reason the row is counted under:

    http_<status>   the final response (after redirects) was not 2xx; 408, 429 and 5xx are retried first
    timeout         the whole request (connect, headers, body) took longer than ``timeout``; retried
    dns             the host name does not resolve (retried only for the resolver's "try again")
    connection      refused, reset, cut short, protocol garbage; retried
    ssl             TLS handshake or certificate failure
    invalid_url     not an http(s) URL, or one that cannot be sent
    redirect_loop   too many redirects
    too_large       a body over ``max_bytes`` (stopped reading there)
    opted_out       an ``X-Robots-Tag`` with noai / noimageai / noindex / noimageindex, as img2dataset honours
    missing_file    (local paths) no such file
    unreadable      (local paths) a folder, no permission, I/O error
    other           anything else a library raised; logged with the URL, never fatal for the run
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import httpx

from evlp.data.imaging import Rejected

log = logging.getLogger(__name__)

RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
UA_TOKEN = "evlp"
MAX_LOGGED_OTHER = 20  # unexpected errors logged individually before going quiet (they are all counted)


def _user_agent() -> str:
    try:
        own = version("evlp")
    except PackageNotFoundError:
        own = "dev"
    # The "compatible" form crawlers use: some hosts refuse user agents that do not start with Mozilla/.
    return f"Mozilla/5.0 (compatible; {UA_TOKEN}/{own}; image-text dataset downloader)"


@dataclass(frozen=True)
class FetchOptions:
    timeout: float = 10.0  # seconds for the whole request, body included
    retries: int = 2  # further attempts after a transient failure
    backoff: float = 1.0  # seconds before the first retry; doubled for each next one, with +-50% jitter
    max_bytes: int = 64 << 20
    user_agent: str = _user_agent()

    def __post_init__(self):
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0 or self.max_bytes < 1:
            raise ValueError(f"invalid fetch options {self}")


class _Status(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class Fetcher:
    """Use as ``async with Fetcher(options, concurrency) as fetcher``; relative local paths are read from ``base``."""

    def __init__(self, options: FetchOptions, concurrency: int, base: Path | None = None):
        self.options = options
        self.concurrency = concurrency
        self.base = base
        self._client: httpx.AsyncClient | None = None
        self._other_logged = 0

    async def __aenter__(self) -> Fetcher:
        self._client = httpx.AsyncClient(
            follow_redirects=True,
            timeout=httpx.Timeout(self.options.timeout),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
            headers={"User-Agent": self.options.user_agent},
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.aclose()

    async def fetch(self, source: str) -> bytes:
        if is_url(source):
            return await self._fetch_url(source)
        if "://" in source:  # ftp://, data://, s3://...: a URL, but not one we fetch
            raise Rejected("invalid_url", source)
        return await asyncio.to_thread(self._read_file, source)

    # -- local files -----------------------------------------------------------------------------------------------

    def _read_file(self, source: str) -> bytes:
        path = Path(source).expanduser()
        if self.base is not None and not path.is_absolute():
            path = self.base / path
        try:
            return path.read_bytes()
        except FileNotFoundError as e:
            raise Rejected("missing_file", str(path)) from e
        except OSError as e:
            raise Rejected("unreadable", f"{path}: {e.strerror or e}") from e

    # -- HTTP ------------------------------------------------------------------------------------------------------

    async def _fetch_url(self, url: str) -> bytes:
        attempt = 0
        while True:
            try:
                # wait_for bounds the whole exchange: httpx's own timeouts apply per read, so a server trickling
                # bytes could otherwise hold a connection forever.
                return await asyncio.wait_for(self._get(url), self.options.timeout)
            except _Status as e:
                reason, transient = f"http_{e.status}", e.status in RETRIED_STATUS
            except (asyncio.TimeoutError, TimeoutError, httpx.TimeoutException):
                reason, transient = "timeout", True
            except (httpx.HTTPError, httpx.InvalidURL) as e:
                reason, transient = classify_error(e)
            except Rejected:  # final by nature (too large, opted out): no retry
                raise
            except Exception as e:  # a library failing on an odd URL or response must not end a multi-day crawl
                self._log_other(url, e)
                reason, transient = "other", False
            if not transient or attempt == self.options.retries:
                raise Rejected(reason, url)
            await asyncio.sleep(self.options.backoff * 2**attempt * random.uniform(0.5, 1.5))
            attempt += 1

    async def _get(self, url: str) -> bytes:
        async with self._client.stream("GET", url) as response:
            if not 200 <= response.status_code < 300:
                raise _Status(response.status_code)
            if opted_out(response.headers.get_list("x-robots-tag")):
                raise Rejected("opted_out", url)
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > self.options.max_bytes:
                raise Rejected("too_large", f"{url}: {int(length):,} bytes")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self.options.max_bytes:
                    raise Rejected("too_large", f"{url}: over {self.options.max_bytes:,} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

    def _log_other(self, url: str, e: Exception) -> None:
        self._other_logged += 1
        if self._other_logged <= MAX_LOGGED_OTHER:
            log.warning("unexpected error fetching %s (counted as 'other'): %s: %s", url, type(e).__name__, e)
            if self._other_logged == MAX_LOGGED_OTHER:
                log.warning("further unexpected fetch errors are only counted")


def classify_error(e: BaseException) -> tuple[str, bool]:
    """``(reason, retry?)`` for an httpx exception, looking through the chain for what the socket layer raised."""
    if isinstance(e, httpx.TooManyRedirects):
        return "redirect_loop", False
    if isinstance(e, (httpx.InvalidURL, httpx.UnsupportedProtocol, httpx.LocalProtocolError)):
        return "invalid_url", False
    gai = _cause(e, socket.gaierror)
    if gai is not None:
        # EAI_AGAIN is the resolver's "temporary failure"; a name that does not exist stays so.
        return "dns", gai.errno == socket.EAI_AGAIN
    if _cause(e, ssl.SSLError) is not None:
        return "ssl", False
    if isinstance(e, httpx.TimeoutException):
        return "timeout", True
    return "connection", True


def _cause(e: BaseException | None, kind: type) -> BaseException | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def opted_out(values: list[str]) -> bool:
    """True when an X-Robots-Tag value opts out of AI use or indexing, for every crawler or for ``evlp`` by name
    (``"noai"``, ``"evlp: noimageai"``; ``"otherbot: noindex"`` is for another crawler)."""
    for value in values:
        token, sep, directives = value.partition(":") if ":" in value else ("", "", value)
        if sep and token.strip().lower() != UA_TOKEN:
            continue
        if {d.strip().lower() for d in directives.split(",")} & OPT_OUT_DIRECTIVES:
            return True
    return False
