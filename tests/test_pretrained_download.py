"""``evlp download weights`` against a real HTTP server on 127.0.0.1 that honours Range and can cut transfers."""

import hashlib
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evlp.errors import EvlpError
from evlp.pretrained import load_beitv2, load_data2vec2_image
from evlp.pretrained.commands import WEIGHT_URLS, download_weights
import evlp.pretrained.download as download
from evlp.pretrained.download import download_file
from evlp.pretrained.files import check_download

FIXTURES = Path(__file__).parent / "fixtures" / "pretrained"
# The tiny fixtures stand in for the real files, under the real names.
FILES = {
    "base_imagenet.pt": (FIXTURES / "data2vec2_fairseq_tiny.pt").read_bytes(),
    "beitv2_base_patch16_224_pt1k.pth": (FIXTURES / "beitv2_unilm_tiny.pth").read_bytes(),
    "error.pt": b"<html><body>Access denied</body></html>",
}
CUT = 100_000  # bytes sent before a cut connection


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        folder, _, name = self.path.rpartition("/")
        range_header = self.headers.get("Range")
        server.log.append((name, range_header))
        if folder == "/loop":  # a redirect loop: every answer sends the client back here
            self.send_response(302)
            self.send_header("Location", f"/loop/{name}")
            self.end_headers()
            return
        if folder in ("/trickle", "/stall", "/wrong"):
            self.hostile(folder, name)
            return
        if folder != "/files" or name not in FILES:
            self.send_error(404)
            return
        data, start = FILES[name], 0
        if range_header and server.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "text/html" if name == "error.pt" else "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cuts_left > 0:  # promise the whole body, send part of it, hang up
            server.cuts_left -= 1
            body = body[:CUT]
        self.wfile.write(body)

    def hostile(self, folder: str, name: str) -> None:
        """/trickle: a 30-byte body at 1 byte a second; /stall: headers, then nothing; /wrong: 30 bytes at once."""
        body = b"\x80\x02not a checkpoint at all...."[:30]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if folder == "/wrong":
                self.wfile.write(body)
            elif folder == "/trickle":
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(1)
            else:
                time.sleep(30)
        except OSError:
            pass  # the client gave up and hung up

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True  # the trickling and stalling handlers must not hold up shutdown
    httpd.log, httpd.cuts_left, httpd.honour_range = [], 0, True
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/files"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_weights_fetches_converts_and_loads(server, tmp_path, capsys):
    paths = download_weights(tmp_path, base_url=server.url + "/", convert=True)
    assert [p.name for p in paths] == list(WEIGHT_URLS)
    out = capsys.readouterr().out
    for path in paths:
        assert path.parent == tmp_path / "models" and path.read_bytes() == FILES[path.name]
        assert f"sha256 {hashlib.sha256(FILES[path.name]).hexdigest()}  {path}" in out
        assert not path.with_name(path.name + ".part").exists()
        assert path.with_name(path.name + ".safetensors").is_file()
    fixture = json.loads((FIXTURES / "data2vec2_fairseq_tiny.json").read_text())
    assert fixture["files"]["checkpoint"]["sha256"] in out

    expected = load_file(FIXTURES / "data2vec2_fairseq_tiny_expected.safetensors")
    with torch.no_grad():
        got = load_data2vec2_image(paths[0], depth=2).eval().forward_features(expected["input"])
    assert (got - expected["tokens_depth2"]).abs().max() < 2e-5
    assert len(load_beitv2(paths[1]).blocks) == 3

    server.log.clear()
    download_weights(tmp_path, base_url=server.url)
    assert server.log == [] and "already downloaded" in capsys.readouterr().out


def test_resumes_after_a_cut_connection(server, tmp_path):
    server.cuts_left = 1
    dest = download_file(f"{server.url}/base_imagenet.pt", tmp_path / "base_imagenet.pt", retry_wait=0)
    assert dest.read_bytes() == FILES["base_imagenet.pt"]
    assert server.log == [("base_imagenet.pt", None), ("base_imagenet.pt", f"bytes={CUT}-")]


def test_an_interrupted_run_keeps_the_part_file_and_the_next_run_resumes(server, tmp_path):
    server.cuts_left = 2
    dest = tmp_path / "models" / "beitv2_base_patch16_224_pt1k.pth"
    part = dest.with_name(dest.name + ".part")
    with pytest.raises(EvlpError, match=r"failed after 2 attempts .*keeps the 200,000 bytes received") as info:
        download_file(f"{server.url}/{dest.name}", dest, attempts=2, retry_wait=0)
    assert "\n" not in str(info.value)
    assert not dest.exists() and part.stat().st_size == 2 * CUT

    server.log.clear()
    download_file(f"{server.url}/{dest.name}", dest, retry_wait=0)
    assert server.log == [(dest.name, f"bytes={2 * CUT}-")]
    assert dest.read_bytes() == FILES[dest.name] and not part.exists()


def test_a_server_that_ignores_range_restarts_the_file(server, tmp_path):
    server.honour_range = False
    dest = tmp_path / "base_imagenet.pt"
    dest.with_name(dest.name + ".part").write_bytes(b"stale bytes of some other file")
    download_file(f"{server.url}/{dest.name}", dest, retry_wait=0)
    assert dest.read_bytes() == FILES[dest.name]


def test_http_errors_are_one_line(server, tmp_path):
    with pytest.raises(EvlpError, match=r"download of .*/missing/base_imagenet.pt failed: HTTP 404") as info:
        download_weights(tmp_path, base_url=f"{server.url}/missing")
    assert "\n" not in str(info.value)
    assert list((tmp_path / "models").iterdir()) == []
    with pytest.raises(EvlpError, match="sent an HTML page"):
        download_file(f"{server.url}/error.pt", tmp_path / "error.pt", retry_wait=0)
    assert not (tmp_path / "error.pt").exists()


def test_a_trickled_body_hits_the_per_file_deadline(server, tmp_path, monkeypatch):
    """A 30-byte body sent at 1 byte a second never trips a read timeout; the per-file deadline stops it."""
    monkeypatch.setattr(download, "DEADLINE_BASE_S", 3.0)
    start = time.monotonic()
    with pytest.raises(EvlpError) as info:
        download_weights(tmp_path, base_url=f"{server.url[: -len('/files')]}/trickle")
    message = str(info.value)
    assert time.monotonic() - start < 15 and "\n" not in message
    assert "base_imagenet.pt" in message and "did not finish within 3 s" in message and "rerun" in message
    assert not (tmp_path / "models" / "base_imagenet.pt").exists()

    # A server that sends headers and then nothing: the same deadline bounds the wait.
    start = time.monotonic()
    with pytest.raises(EvlpError, match=r"download of .*/stall/x.pt .*(did not finish within 3 s|timed out)"):
        download_file(f"{server.url[: -len('/files')]}/stall/x.pt", tmp_path / "x.pt", attempts=1)
    assert time.monotonic() - start < 15


def test_a_redirect_loop_is_one_line(server, tmp_path):
    with pytest.raises(EvlpError) as info:
        download_weights(tmp_path, base_url=f"{server.url[: -len('/files')]}/loop")
    message = str(info.value)
    assert "\n" not in message and "base_imagenet.pt" in message and "redirects in a loop" in message


def test_a_download_that_is_not_the_expected_checkpoint_is_refused_and_deleted(server, tmp_path):
    """No publisher gives a sha256 for these files: the zip container's CRCs and the checkpoint's own layout are
    checked before the file gets its real name."""
    base = server.url[: -len("/files")]
    with pytest.raises(EvlpError) as info:
        download_weights(tmp_path, base_url=f"{base}/wrong")
    message = str(info.value)
    assert "\n" not in message and "base_imagenet.pt" in message and "deleted" in message
    assert list((tmp_path / "models").iterdir()) == []

    # A BEiTv2 checkpoint served under the Data2Vec2 name: a real checkpoint, but not the one asked for.
    FILES["swapped.pt"] = FILES["beitv2_base_patch16_224_pt1k.pth"]
    try:
        with pytest.raises(EvlpError, match=r"is beitv2-unilm, not data2vec2-fairseq"):
            download_file(f"{server.url}/swapped.pt", tmp_path / "models" / "base_imagenet.pt",
                          verify=lambda part: check_download(part, "data2vec2-fairseq"))
    finally:
        del FILES["swapped.pt"]

    # A damaged record inside an otherwise complete zip: its CRC-32 gives it away.
    damaged = bytearray(FILES["base_imagenet.pt"])
    with zipfile.ZipFile(io.BytesIO(bytes(damaged))) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    damaged[start + 100] ^= 0xFF
    FILES["damaged.pt"] = bytes(damaged)
    try:
        with pytest.raises(EvlpError, match=r"CRC|damaged|corrupt"):
            download_file(f"{server.url}/damaged.pt", tmp_path / "models" / "base_imagenet.pt",
                          verify=lambda part: check_download(part, "data2vec2-fairseq"))
    finally:
        del FILES["damaged.pt"]
    assert list((tmp_path / "models").iterdir()) == []
