"""evlp serve: the search page's API, serving only indexed files, upload limits, and the page in a real browser."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.needs import need_module, need_path

need_module("fastapi", module_level=True)
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from evlp.api import load_model  # noqa: E402
from evlp.data.synthetic import COLOURS, generate_sample  # noqa: E402
from evlp.search import FileEntry, ImageIndex, build_index, search_text  # noqa: E402
from evlp.serve import create_app  # noqa: E402
from tests.api_support import TOY_EXPORT  # noqa: E402

LOCAL = "http://localhost"  # the page answers to local Host names only


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(loaded model, index, photos folder)``: one held-out picture per colour, indexed with the toy export."""
    tmp = tmp_path_factory.mktemp("serve")
    loaded = load_model(TOY_EXPORT)
    photos = tmp / "photos"
    photos.mkdir()
    seen, i = set(), 0
    while len(seen) < len(COLOURS):
        sample = generate_sample(i, split="val", image_size=loaded.image_size)
        if sample.meta["colour"] not in seen:
            seen.add(sample.meta["colour"])
            sample.image.save(photos / f"{sample.meta['colour']}.png")
        i += 1
    (tmp / "secret.png").write_bytes((photos / "red.png").read_bytes())
    build_index(photos, loaded, tmp / "index.safetensors", progress=False)
    return loaded, ImageIndex.load(tmp / "index.safetensors"), photos


def png_bytes(colour: str, photos) -> bytes:
    return (photos / f"{colour}.png").read_bytes()


def test_search_and_images(served):
    loaded, index, photos = served
    client = TestClient(create_app(loaded, index), base_url=LOCAL)
    page = client.get("/")
    assert page.status_code == 200 and "6 indexed images" in page.text

    body = client.get("/api/search", params={"q": "a large blue square in the centre", "top": 3}).json()
    expected = search_text(index, loaded, ["a large blue square in the centre"], top=3)[0]
    assert [(r["path"], r["score"]) for r in body["results"]] == [(p, round(s, 4)) for p, s in expected]
    assert body["results"][0]["path"] == "blue.png"
    first = client.get(f"/image/{body['results'][0]['row']}")
    assert first.status_code == 200 and first.content == png_bytes("blue", photos)

    for bad in ("/image/6", "/image/-1", "/image/..%2F..%2Fetc%2Fpasswd", "/image/%2E%2E/secret.png",
                "/photos/red.png"):
        assert client.get(bad).status_code in (404, 422), bad
    assert client.get("/api/search", params={"q": ""}).status_code == 422


def test_a_tampered_index_cannot_reach_other_files(served):
    loaded, index, photos = served
    tampered = ImageIndex.load(photos.parent / "index.safetensors")
    tampered.files[0].path = "../secret.png"
    client = TestClient(create_app(loaded, tampered), base_url=LOCAL)
    assert client.get("/image/0").status_code == 404
    assert client.get("/image/1").status_code == 200


def test_classify_upload(served):
    loaded, index, photos = served
    client = TestClient(create_app(loaded, index, max_upload_bytes=50_000), base_url=LOCAL)
    reply = client.post("/api/classify", files={"file": ("x.png", png_bytes("green", photos), "image/png")},
                        data={"classes": "red, green, blue, green, "})
    assert reply.status_code == 200
    labels = reply.json()["labels"]
    assert [item["label"] for item in labels][0] == "green" and len(labels) == 3
    assert sum(item["prob"] for item in labels) == pytest.approx(1, abs=1e-3)

    not_image = client.post("/api/classify", files={"file": ("x.png", b"GIF89a nope", "image/png")},
                            data={"classes": "red"})
    assert not_image.status_code == 400 and "not a readable image" in not_image.text
    big = io.BytesIO()
    Image.effect_noise((300, 300), 64).save(big, format="PNG")
    assert len(big.getvalue()) > 50_000
    too_big = client.post("/api/classify", files={"file": ("x.png", big.getvalue(), "image/png")},
                          data={"classes": "red"})
    assert too_big.status_code == 413
    no_classes = client.post("/api/classify", files={"file": ("x.png", png_bytes("red", photos), "image/png")},
                             data={"classes": " , "})
    assert no_classes.status_code == 400


def test_page_in_a_browser(served):
    chromium = str(need_path(shutil.which("chromium") or "/usr/bin/chromium",
                             "apt-get install -y chromium (./dev test installs it)"))
    playwright = need_module("playwright.sync_api")
    import uvicorn

    loaded, index, photos = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(loaded, index), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#query", "two small yellow stars")
            page.click("#search-form button")
            page.wait_for_selector("#grid figure")
            assert page.locator("#grid figcaption").first.inner_text().endswith("yellow.png")
            # The first result's picture is actually served and decoded by the browser.
            page.wait_for_function("document.querySelector('#grid img').naturalWidth > 0", timeout=10_000)
            page.set_input_files("#file", str(photos / "purple.png"))
            page.fill("#classes", "purple, orange")
            page.click("#classify-form button")
            page.wait_for_selector("#labels li")
            assert page.locator("#labels li").first.inner_text().startswith("purple")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- a real `evlp serve` process, attacked over HTTP -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def evlp_serve(index_path, *extra: str):
    """``(port, process)`` of ``evlp serve --index index_path`` started as a command, until it answers."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "evlp.cli", "serve", "--index", str(index_path), "--model",
                                str(TOY_EXPORT), "--device", "cpu", "--port", str(port), *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(f"evlp serve exited {process.returncode}: {process.stdout.read()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "evlp serve did not start"
                time.sleep(0.1)
        yield port, process
    finally:
        process.terminate()
        process.wait(timeout=30)


def ask(port: int, path: str, host: str | None) -> tuple[int, bytes]:
    """A GET with the given Host header (None: no Host header at all), as a rebinding page's browser sends it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.putrequest("GET", path, skip_host=True)
    if host is not None:
        connection.putheader("Host", host)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


def test_a_real_server_answers_only_to_local_names(served):
    """DNS rebinding: a hostile page whose name resolves to 127.0.0.1 makes the browser send its own Host."""
    _, index, photos = served
    with evlp_serve(photos.parent / "index.safetensors", "--allow-host", "photos.lan") as (port, _):
        query = "/api/search?q=a+red+square"
        for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST",
                     f"photos.lan:{port}"):
            status, body = ask(port, query, host)
            assert status == 200 and json.loads(body)["results"], host
        for host in ("attacker.example", f"attacker.example:{port}", f"localhost.attacker.example:{port}",
                     f"127.0.0.1.nip.io:{port}", f"photos.lan.attacker.example:{port}", "", None,
                     f"[::1]x:{port}", f"localhost:{port}@attacker.example"):
            for path in (query, "/", "/image/0"):
                status, body = ask(port, path, host)
                # (uvicorn itself answers 400 to an HTTP/1.1 request without a Host header)
                assert status == (400 if host is None else 421), (host, path)
                assert b"results" not in body and b"PNG" not in body, (host, path)

        # A 422 does not echo a 60,000-character query back.
        status, body = ask(port, "/api/search?q=" + "x" * 60_000, "localhost")
        assert status == 422 and len(body) < 1000 and b"xxxxxxxxxx" not in body


def test_a_crafted_index_cannot_serve_system_files(served, tmp_path):
    """An index is data: one whose root is / and whose rows name /etc/passwd must not turn the page into a file
    server, and a file changed since indexing is not served either."""
    import torch

    loaded, index, photos = served
    passwd = Path("/etc/passwd")
    st = passwd.stat()
    crafted = ImageIndex(Path("/"), index.model, [FileEntry("etc/passwd", st.st_size, st.st_mtime_ns)],
                         torch.nn.functional.normalize(torch.ones(1, index.embeddings.shape[1]), dim=-1))
    crafted.save(tmp_path / "crafted.safetensors")
    result = subprocess.run([sys.executable, "-m", "evlp.cli", "serve", "--index",
                             str(tmp_path / "crafted.safetensors"), "--model", str(TOY_EXPORT), "--port",
                             str(_free_port())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "'etc/passwd'" in result.stderr and "not an image" in result.stderr

    # A row whose file changed since indexing (here: replaced by other bytes) is not served.
    copied = tmp_path / "photos"
    shutil.copytree(photos, copied)
    build_index(copied, loaded, tmp_path / "index.safetensors", progress=False)
    (copied / "red.png").write_bytes(b"#!/bin/sh\n" * 10)
    rows = {f.path: i for i, f in enumerate(ImageIndex.load(tmp_path / "index.safetensors").files)}
    with evlp_serve(tmp_path / "index.safetensors") as (port, _):
        assert ask(port, f"/image/{rows['blue.png']}", "localhost")[0] == 200
        assert ask(port, f"/image/{rows['red.png']}", "localhost")[0] == 404
