"""``evlp download cc3m/cc12m`` against a threaded HTTP server on 127.0.0.1 serving every kind of good and bad
response; the hub source with a fake ``snapshot_download``. Helpers here are shared by the other data tests."""

import asyncio
import dataclasses
import errno
import fnmatch
import io
import json
import shutil
import socket
import ssl
import struct
import tarfile
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import evlp.data.hub as hub
import evlp.data.shardwriter as shardwriter
import evlp.data.web as web
from evlp.data import ImageTextShards, count_samples, eval_transform, load_tokenizer
from evlp.data.fetch import Fetcher, FetchOptions, classify_error, opted_out
from evlp.data.imaging import ImageOptions, Rejected, prepare_image
from evlp.data.synthetic import write_vocab
from evlp.data.tokenizer import TextTokenizer
from evlp.data.web import download_hub, download_web
from evlp.errors import EvlpError

FAST = FetchOptions(timeout=1.0, retries=1, backoff=0.01)  # generous for a loaded machine, short for the slow route
SLOW_SECONDS = 2.5

# -- images ------------------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A smooth random colour field: resizes and compresses like a photo, unlike a flat colour."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8))
    return low.resize((width, height), Image.Resampling.BICUBIC)


def transparent_png() -> bytes:
    """Left half opaque red, right half fully transparent (black underneath, as many encoders leave it)."""
    rgba = Image.new("RGBA", (64, 40), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 32, 40))
    return encode(rgba, "PNG")


def palette_png() -> bytes:
    p = Image.new("P", (40, 40), 0)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 20, 40))  # left half blue, right half index 0 = transparent
    return encode(p, "PNG", transparency=0)


def corrupt_png() -> bytes:
    """A valid header and a garbled image data chunk."""
    data = bytearray(encode(photo(50, 50), "PNG"))
    start = data.index(b"IDAT") + 8
    data[start : start + 64] = b"\xff" * 64
    return bytes(data)


def gray16_png() -> bytes:
    return encode(Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16)), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (48, 32), (0, 255, 255, 0)), "JPEG")  # red in CMYK


def exif_rotated_jpeg() -> bytes:
    """Stored 60x30, EXIF orientation 6 (rotate 90 degrees clockwise to display): displays 30x60."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(60, 30), "JPEG", exif=exif)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A 1x1 PNG whose header claims width x height: Pillow refuses it on open, before decoding anything."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


GOOD = {  # name -> (bytes, content type, stored size after resizing to a 256-px shorter side, or None: unchanged)
    "photo.jpg": (encode(photo(640, 480), "JPEG", quality=90), "image/jpeg", (341, 256)),
    "small.png": (encode(photo(100, 80, seed=1), "PNG"), "image/png", (100, 80)),
    "pic.webp": (encode(photo(300, 400, seed=2), "WEBP"), "image/webp", (256, 341)),
    "alpha.png": (transparent_png(), "image/png", (64, 40)),
    "palette.png": (palette_png(), "image/png", (40, 40)),
    "gray16.png": (gray16_png(), "image/png", (40, 30)),
    "cmyk.jpg": (cmyk_jpeg(), "image/jpeg", (48, 32)),
    "rotated.jpg": (exif_rotated_jpeg(), "image/jpeg", (30, 60)),
    "huge.jpg": (encode(photo(6000, 4000, seed=3), "JPEG", quality=70), "image/jpeg", (384, 256)),
}
BAD = {  # name -> (bytes, content type, reason)
    "page.html": (b"<!doctype html><html><body>Image removed</body></html>", "text/html", "not_an_image"),
    "empty.jpg": (b"", "image/jpeg", "not_an_image"),
    "truncated.jpg": (encode(photo(400, 300, seed=4), "JPEG")[:1500], "image/jpeg", "decode_error"),
    "corrupt.png": (corrupt_png(), "image/png", "decode_error"),
    "pixel.png": (encode(Image.new("RGB", (1, 1)), "PNG"), "image/png", "too_small"),
    "line.png": (encode(Image.new("RGB", (300, 1)), "PNG"), "image/png", "too_small"),
    "bomb.png": (bomb_png(), "image/png", "too_large"),
}

# -- the server --------------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """/img/NAME, /status/CODE, /flaky/NAME (503 on the first request of each URL), /redirect/NAME, /loop/NAME
    (redirects to itself), /slow/NAME, /trickle/NAME (a byte every 0.2 s), /optout/NAME (X-Robots-Tag: noai),
    /files/NAME (server.files: archives and indexes)."""

    def do_GET(self):
        server = self.server
        with server.lock:
            server.log.append(self.path)
            first = server.seen[self.path] == 0
            server.seen[self.path] += 1
        path = self.path.split("?", 1)[0]
        _, kind, name = path.split("/", 2) if path.count("/") >= 2 else ("", "", "")
        if kind == "status":
            self.send_error(int(name))
            return
        if kind in ("redirect", "loop"):
            self.send_response(302)
            self.send_header("Location", f"/img/{name}" if kind == "redirect" else self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "flaky" and first:
            self.send_error(503)
            return
        if kind == "slow":
            time.sleep(SLOW_SECONDS)
        if kind == "trickle":  # the whole body, one byte every 0.2 s: no single read waits long
            body = GOOD[name][0][:40]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass  # the client gave up
            return
        if kind == "files":
            body, ctype = server.files.get(name, (None, None)), "application/octet-stream"
            body = body[0] if isinstance(body, tuple) else body
        else:
            body, ctype = (GOOD | {k: v[:2] for k, v in BAD.items()}).get(name, (None, None))[:2]
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        if kind == "optout":
            self.send_header("X-Robots-Tag", "noai, noimageai")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up (the slow route): nothing left to send to

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True  # slow handlers must not hold up shutdown
    httpd.log, httpd.seen, httpd.lock, httpd.files = [], Counter(), threading.Lock(), {}
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/img/photo.jpg"  # nothing listens there any more: connection refused


@pytest.fixture
def dead_dns(monkeypatch):
    """Make the host ``dead.invalid`` fail to resolve the way a vanished domain does, without asking any resolver."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "dead.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def tokenizer(tmp_path) -> TextTokenizer:
    return TextTokenizer(load_tokenizer(write_vocab(tmp_path / "vocab")), max_len=16)


def read_pairs(shards, tmp_path) -> list[dict]:
    """Every sample of the shards, read back by the training reader in evaluation mode."""
    dataset = ImageTextShards(shards, tokenizer(tmp_path), eval_transform(32), batch_size=4, train=False)
    pairs = []
    for batch in dataset:
        for image_id, caption, meta in zip(batch["image_id"].tolist(), batch["caption"], batch["meta"]):
            pairs.append(dict(image_id=image_id, caption=caption, meta=meta))
    assert dataset.num_bad == 0
    return pairs


def stored_image(shard_dir: Path, key: str) -> Image.Image:
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            try:
                member = tar.extractfile(f"{key}.jpg")
            except KeyError:
                continue
            return Image.open(io.BytesIO(member.read()))
    raise KeyError(key)


# -- the CC3M index used by most tests ---------------------------------------------------------------------------


def web_rows(url: str) -> list[tuple[str, str | None]]:
    """(URL path or full URL, expected failure reason or None for a good pair), in TSV order."""
    rows = [(f"/img/{name}", None) for name in GOOD]
    rows += [(f"/img/{name}", reason) for name, (_, _, reason) in BAD.items()]
    rows += [
        ("/status/404", "http_404"),
        ("/status/403", "http_403"),
        ("/status/500", "http_500"),
        ("/flaky/photo.jpg", None),
        ("/redirect/small.png", None),
        ("/slow/photo.jpg", "timeout"),
        ("/optout/photo.jpg", "opted_out"),
        (closed_port_url(), "connection"),
        ("http://dead.invalid/photo.jpg", "dns"),
        ("ftp://example.invalid/photo.jpg", "invalid_url"),
    ]
    return rows


def write_cc3m_index(path: Path, url: str) -> list[tuple[int, str | None]]:
    """A CC3M-format TSV (caption<TAB>url) of ``web_rows`` plus a malformed line; returns (row, reason)."""
    lines, expected = [], []
    for i, (target, reason) in enumerate(web_rows(url)):
        full = target if "://" in target else f"{url}{target}?row={i}"
        lines.append(f"caption number {i}\t{full}")
        expected.append((i, reason))
    lines.append("a line without any tab")
    expected.append((len(expected), "invalid_row"))
    path.write_text("\n".join(lines) + "\n")
    return expected


def run_cc3m(data, index, **kwargs):
    return download_web("cc3m", data, index=index, shard_size=4, fetch_options=FAST, concurrency=8, workers=2,
                        **kwargs)


# -- tests -------------------------------------------------------------------------------------------------------


def test_cc3m_counts_every_outcome_and_keeps_exactly_the_good_pairs(server, tmp_path, dead_dns):
    index = tmp_path / "Train-GCC-training.tsv"
    expected = write_cc3m_index(index, server.url)
    result = run_cc3m(tmp_path / "data", index)

    shards = tmp_path / "data" / "conceptual_captions_3m" / "shards"
    good_rows = [i for i, reason in expected if reason is None]
    failed = Counter(reason for _, reason in expected if reason is not None)
    stats = json.loads((shards / "stats.json").read_text())
    assert stats["failed"] == dict(failed)
    assert stats["attempted"] == len(expected) and stats["succeeded"] == len(good_rows) == stats["num_samples"]
    assert result.succeeded == len(good_rows) and result.failed == failed
    assert count_samples(str(shards)) == len(good_rows)

    # Per shard: rows [4k, 4k+4), with their own counts; a shard with no good row has stats but no tar.
    for k in range(-(-len(expected) // 4)):
        rows = expected[4 * k : 4 * k + 4]
        shard_stats = json.loads((shards / f"{k:06d}.stats.json").read_text())
        assert shard_stats["rows"] == [4 * k, 4 * k + 4] and shard_stats["attempted"] == len(rows)
        assert shard_stats["failed"] == dict(Counter(r for _, r in rows if r is not None))
        n_good = sum(r is None for _, r in rows)
        assert shard_stats["succeeded"] == n_good
        assert (shards / f"{k:06d}.tar").is_file() == (n_good > 0)
        assert stats["shards"].get(f"{k:06d}.tar", 0) == n_good

    pairs = read_pairs(str(shards), tmp_path)
    assert [p["image_id"] for p in pairs] == good_rows
    assert [p["caption"] for p in pairs] == [f"caption number {i}" for i in good_rows]
    assert all(p["meta"]["url"].startswith(server.url) for p in pairs)

    # Stored images: RGB JPEGs, shorter side 256 at most, transparency on white, EXIF rotation applied.
    names = list(GOOD) + ["photo.jpg", "small.png"]  # then the flaky and the redirected row
    for i, name in zip(good_rows, names):
        image = stored_image(shards, f"{i:09d}")
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == GOOD[name][2], name
    alpha = stored_image(shards, f"{list(GOOD).index('alpha.png'):09d}").convert("RGB")
    assert alpha.getpixel((5, 20))[0] > 240 and alpha.getpixel((5, 20))[1] < 30  # red stays red
    assert min(alpha.getpixel((58, 20))) > 240  # transparent -> white, not black
    palette = stored_image(shards, f"{list(GOOD).index('palette.png'):09d}")
    assert min(palette.getpixel((35, 20))) > 240 and palette.getpixel((5, 20))[2] > 200
    gray = stored_image(shards, f"{list(GOOD).index('gray16.png'):09d}")
    assert 120 < gray.getpixel((10, 10))[0] < 136  # 32768 / 65535 -> mid grey, not clipped to white
    cmyk = stored_image(shards, f"{list(GOOD).index('cmyk.jpg'):09d}")
    assert cmyk.getpixel((10, 10))[0] > 200 and cmyk.getpixel((10, 10))[2] < 60
    first = pairs[0]["meta"]
    assert (first["original_width"], first["original_height"], first["width"], first["height"]) == (640, 480, 341, 256)

    # Retries: the flaky URL was asked twice, a 404 once (not retried), the 500 twice, the slow one twice.
    seen = server.seen
    flaky_row = next(i for i, (t, _) in enumerate(web_rows(server.url)) if t.startswith("/flaky"))
    assert seen[f"/flaky/photo.jpg?row={flaky_row}"] == 2
    assert sum(n for p, n in seen.items() if p.startswith("/status/404")) == 1
    assert sum(n for p, n in seen.items() if p.startswith("/status/500")) == 2

    line = result.line()
    assert f"{len(good_rows)} of {len(expected)} rows" in line and "pairs/s" in line and "written" in line


def test_rerun_fetches_nothing_and_interrupted_shards_are_redone_identically(server, tmp_path, dead_dns):
    index = tmp_path / "Train-GCC-training.tsv"
    write_cc3m_index(index, server.url)
    reference = tmp_path / "reference"
    run_cc3m(reference, index)
    ref_shards = reference / "conceptual_captions_3m" / "shards"

    data = tmp_path / "data"
    run_cc3m(data, index)
    shards = data / "conceptual_captions_3m" / "shards"
    # A killed run: shard 1's stats never written, shard 2 half-written (tmp file, stale stats gone).
    (shards / "000001.stats.json").unlink()
    (shards / "000002.stats.json").unlink()
    (shards / "000002.tar").rename(shards / "000002.tar.tmp")
    server.log.clear()
    result = download_web("cc3m", data, shard_size=4, fetch_options=FAST, concurrency=8, workers=2)  # no --index
    assert result.attempted == 8  # rows 4..11 only
    assert {int(p.split("row=")[1]) for p in server.log if "row=" in p} == set(range(4, 12))
    assert not list(shards.glob("*.tmp"))
    for tar in ref_shards.glob("*.tar"):
        assert (shards / tar.name).read_bytes() == tar.read_bytes(), tar.name
    assert json.loads((shards / "stats.json").read_text())["shards"] == \
        json.loads((ref_shards / "stats.json").read_text())["shards"]

    server.log.clear()
    result = download_web("cc3m", data, shard_size=4, fetch_options=FAST)
    assert result.attempted == 0 and server.log == []
    assert "nothing left to do" in result.line()

    with pytest.raises(EvlpError, match="shard_size=4.*shard_size=5"):
        download_web("cc3m", data, shard_size=5, fetch_options=FAST)


def test_full_disk_stops_cleanly_and_the_rerun_completes(server, tmp_path, dead_dns, monkeypatch):
    index = tmp_path / "Train-GCC-training.tsv"
    write_cc3m_index(index, server.url)
    reference = tmp_path / "reference"
    run_cc3m(reference, index)

    calls = []
    real_fsync = shardwriter.os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(shardwriter.os, "fsync", fsync)
    data = tmp_path / "data"
    # Shards 0 and 1 are written (2 fsyncs); shard 2, the third with images, hits the full disk.
    with pytest.raises(EvlpError, match="no space left .* the 2 shards finished before are kept.*rerun"):
        download_web("cc3m", data, index=index, shard_size=4, fetch_options=FAST, concurrency=1, workers=1)
    shards = data / "conceptual_captions_3m" / "shards"
    assert not list(shards.glob("*.tmp"))
    kept = {p.name.split(".")[0] for p in shards.glob("*.stats.json")}
    assert {"000000", "000001"} <= kept and "000002" not in kept and not (shards / "000002.tar").exists()
    monkeypatch.setattr(shardwriter.os, "fsync", real_fsync)
    run_cc3m(data, index)
    ref_shards = reference / "conceptual_captions_3m" / "shards"
    for tar in ref_shards.glob("*.tar"):
        assert (shards / tar.name).read_bytes() == tar.read_bytes()


def test_missing_index_names_the_download_page(tmp_path):
    with pytest.raises(EvlpError, match="ai.google.com/research/ConceptualCaptions/download"):
        download_web("cc3m", tmp_path, index=tmp_path / "nope.tsv")
    with pytest.raises(EvlpError, match="ai.google.com/research/ConceptualCaptions/download"):
        download_web("cc3m", tmp_path)


def test_cc12m_fetches_its_index_and_reads_url_first_rows(server, tmp_path, monkeypatch):
    rows = [f"{server.url}/img/photo.jpg\tfirst <PERSON> caption", f"{server.url}/status/404\tgone",
            f"{server.url}/img/pic.webp\tthird\tcaption with a tab", f"{server.url}/img/photo.jpg\tfourth",
            f"{server.url}/img/small.png\tfifth"]
    server.files["cc12m.tsv"] = "\n".join(rows).encode()
    options = dict(index_url=f"{server.url}/files/cc12m.tsv", shard_size=2, fetch_options=FAST, concurrency=4,
                   workers=1)
    result = download_web("cc12m", tmp_path, max_rows=1, **options)  # rounded up to the whole first shard
    root = tmp_path / "conceptual_captions_12m"
    assert (root / "cc12m.tsv").read_bytes() == server.files["cc12m.tsv"]
    assert result.attempted == 2 and result.succeeded == 1 and result.failed == Counter(http_404=1)
    # By default only the first rows, as the thesis crawled the first 3,000,000 (here 3, i.e. two shards of 2).
    assert web.DATASETS["cc12m"].default_max_rows == web.CC12M_THESIS_ROWS == 3_000_000
    monkeypatch.setitem(web.DATASETS, "cc12m", dataclasses.replace(web.DATASETS["cc12m"], default_max_rows=3))
    result = download_web("cc12m", tmp_path, **options)
    assert result.attempted == 2 and result.succeeded == 2
    result = download_web("cc12m", tmp_path, max_rows="all", **options)  # the rest of the index
    assert result.attempted == 1 and result.succeeded == 1
    pairs = read_pairs(str(root / "shards"), tmp_path)
    assert [(p["image_id"], p["caption"]) for p in pairs] == [(0, "first <PERSON> caption"),
                                                              (2, "third\tcaption with a tab"), (3, "fourth"),
                                                              (4, "fifth")]


# -- units -------------------------------------------------------------------------------------------------------


def test_prepare_image_never_raises_anything_but_rejected():
    options = ImageOptions()
    for name, (data, _, reason) in BAD.items():
        with pytest.raises(Rejected) as info:
            prepare_image(data, options)
        assert info.value.reason == reason, name
    assert prepare_image(GOOD["photo.jpg"][0], ImageOptions(size=0)).width == 640  # 0 keeps the size
    with pytest.raises(Rejected, match="too_small"):
        prepare_image(GOOD["small.png"][0], ImageOptions(min_size=90))


def test_error_classification():
    def chained(outer, inner):
        try:
            try:
                raise inner
            except Exception as e:
                raise outer from e
        except Exception as e:
            return e

    assert classify_error(chained(httpx.ConnectError("x"), socket.gaierror(socket.EAI_NONAME, "gone"))) == ("dns",
                                                                                                              False)
    assert classify_error(chained(httpx.ConnectError("x"), socket.gaierror(socket.EAI_AGAIN, "again"))) == ("dns",
                                                                                                             True)
    assert classify_error(chained(httpx.ConnectError("x"), ssl.SSLCertVerificationError("bad cert")))[0] == "ssl"
    assert classify_error(httpx.RemoteProtocolError("cut")) == ("connection", True)
    assert classify_error(httpx.TooManyRedirects("loop"))[0] == "redirect_loop"
    assert opted_out(["noai"]) and opted_out(["evlp: noimageai, nofollow"]) and opted_out(["a", "NoIndex"])
    assert not opted_out(["otherbot: noindex"]) and not opted_out(["nofollow"])


def test_a_redirect_loop_and_a_trickle_are_counted_not_fatal(server):
    """The crawler's deadline covers the whole exchange (a body trickled a byte at a time never trips a per-read
    timeout), and a redirect loop is a reason, not an exception."""

    async def fetch(path):
        async with Fetcher(FetchOptions(timeout=2, retries=0), concurrency=2) as fetcher:
            try:
                await fetcher.fetch(server.url + path)
            except Rejected as e:
                return e.reason

    start = time.monotonic()
    assert asyncio.run(fetch("/loop/photo.jpg")) == "redirect_loop"
    assert asyncio.run(fetch("/trickle/photo.jpg")) == "timeout"
    assert time.monotonic() - start < 10


def test_body_over_the_limit_is_too_large(server, tmp_path):
    index = tmp_path / "idx.tsv"
    index.write_text(f"big\t{server.url}/img/huge.jpg\nsmall\t{server.url}/img/small.png\n")
    options = FetchOptions(timeout=2, retries=0, max_bytes=100_000)
    result = download_web("cc3m", tmp_path / "d", index=index, fetch_options=options, concurrency=2, workers=1)
    assert result.failed == Counter(too_large=1) and result.succeeded == 1


# -- the hub source ----------------------------------------------------------------------------------------------


def fake_hub(repo_files: dict[str, bytes], calls: list):
    """A stand-in for ``huggingface_hub.snapshot_download`` serving ``repo_files`` the way the hub lays them out."""

    def snapshot_download(repo_id, *, repo_type, allow_patterns, ignore_patterns=None, local_dir, token=None):
        calls.append(dict(repo_id=repo_id, repo_type=repo_type, allow_patterns=allow_patterns,
                          ignore_patterns=ignore_patterns, token=token))
        local_dir = Path(local_dir)
        (local_dir / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)
        for name, data in repo_files.items():
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns) and not any(
                    fnmatch.fnmatch(name, p) for p in ignore_patterns or []):
                (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
                (local_dir / name).write_bytes(data)
        return str(local_dir)

    return snapshot_download


def wds_tar(samples: list[tuple[str, bytes, str]]) -> bytes:
    """A tar shard as img2dataset writes them (jpg, txt, json per key)."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False) as sink:
        for key, jpg, caption in samples:
            sink.write({"__key__": key, "jpg": jpg, "txt": caption.encode(),
                        "json": json.dumps({"key": key, "caption": caption, "status": "success"}).encode()})
    return buffer.getvalue()


def test_hub_source_downloads_train_shards_and_indexes_them(tmp_path, monkeypatch):
    jpg = GOOD["photo.jpg"][0]
    repo = {
        "cc3m-train-0000.tar": wds_tar([(f"{i:09d}", jpg, f"train {i}") for i in range(3)]),
        "cc3m-train-0001.tar": wds_tar([(f"{i:09d}", jpg, f"train {i}") for i in range(3, 5)]),
        "cc3m-validation-0000.tar": wds_tar([("000000009", jpg, "val")]),
        "_info.json": b"{}",
    }
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", fake_hub(repo, calls))
    line = download_hub("cc3m", tmp_path)
    shards = tmp_path / "conceptual_captions_3m" / "shards"
    assert calls[0]["repo_id"] == "pixparse/cc3m-wds" and calls[0]["repo_type"] == "dataset"
    assert calls[0]["allow_patterns"] == ["*train*.tar"]
    assert sorted(p.name for p in shards.glob("*.tar")) == ["cc3m-train-0000.tar", "cc3m-train-0001.tar"]
    stats = json.loads((shards / "stats.json").read_text())
    assert stats["shards"] == {"cc3m-train-0000.tar": 3, "cc3m-train-0001.tar": 2} and stats["num_samples"] == 5
    assert "5 pairs in 2 shards" in line
    assert [p["caption"] for p in read_pairs(str(shards), tmp_path)] == [f"train {i}" for i in range(5)]

    # A rerun keeps the counts of unchanged files instead of reading every tar again.
    monkeypatch.setattr(web, "count_samples", lambda url: pytest.fail(f"recounted {url}"))
    download_hub("cc3m", tmp_path)

    # Crawled shards and hub shards never share a folder.
    (tmp_path / "other" / "conceptual_captions_3m" / "shards").mkdir(parents=True)
    (tmp_path / "other" / "conceptual_captions_3m" / "shards" / "000000.stats.json").write_text("{}")
    with pytest.raises(EvlpError, match="another --data-path"):
        download_hub("cc3m", tmp_path / "other")
    shutil.rmtree(tmp_path / "other")


def test_one_writer_per_folder(tmp_path):
    from evlp.data.shardwriter import ShardFolder

    with ShardFolder(tmp_path, 10, dict(source="a")):
        with pytest.raises(EvlpError, match="another evlp process is writing"):
            ShardFolder(tmp_path, 10, dict(source="a"))
    with ShardFolder(tmp_path, 10, dict(source="a")) as folder:  # released on exit
        folder.write_shard(0, [], dict(attempted=1, succeeded=0, failed={"http_404": 1}))
    with pytest.raises(EvlpError, match="shard_size=10, source=a .* source=b"):
        ShardFolder(tmp_path, 10, dict(source="b"))
    ShardFolder(tmp_path, 10, dict(source="a")).close()  # the failed attempt above let go of the lock
