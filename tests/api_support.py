"""Shared by the API, export and search tests: one toy checkpoint per session, the `evlp` command with the API
commands, and a fake Hugging Face Hub on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from evlp.train.checkpoint import list_checkpoints

# A trained toy model committed as an export (see fixtures/toy_export/MAKE.md): the session's own 3-step model
# cannot tell images apart, which is all that search-quality tests need.
TOY_EXPORT = Path(__file__).parent / "fixtures" / "toy_export"


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """``(checkpoint path, base_dir)`` of a 3-step quickstart run at toy size, with its run folder and results."""
    from evlp.train.recipe import run_pretraining
    from tests.test_train import tiny_cfg

    base = tmp_path_factory.mktemp("toy_run")
    run_pretraining(tiny_cfg(base, "trainer.max_steps=3", "trainer.max_epochs=-1",
                             "trainer.checkpoint_every_n_steps=3"))
    return list_checkpoints(base / "models" / "quickstart")[-1][1], base


class FakeHub:
    """The endpoints ``HfApi.create_repo`` + ``upload_folder`` call: create, README metadata validation, preupload
    (answering "regular", inline base64, for every file) and commit. Records the created repos, the metadata of
    validated cards, the files of each commit and every request.
    """

    def __init__(self):
        self.repos: list[dict] = []
        self.card_metadata: list[dict] = []
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                hub.requests.append(("POST", path, self.headers.get("Authorization")))
                parts = path.strip("/").split("/")  # api, models, ns, name, preupload|commit, revision
                if path == "/api/repos/create":
                    request = json.loads(body)
                    hub.repos.append(request)
                    self._reply(200, {"url": f"{hub.endpoint}/{request['organization']}/{request['name']}"})
                elif path == "/api/validate-yaml":  # the hub checks a model card's YAML front matter
                    content = json.loads(body)["content"]
                    try:
                        metadata = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else {}
                    except yaml.YAMLError as e:
                        self._reply(400, {"errors": [{"message": str(e)}]})
                        return
                    hub.card_metadata.append(metadata)
                    self._reply(200, {"warnings": []})
                elif len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                for f in files]})
                elif len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(line["value"] for line in lines if line["key"] == "header")
                    files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                             for line in lines if line["key"] == "file"}
                    hub.commits.append({"repo": f"{parts[2]}/{parts[3]}", "revision": parts[5],
                                        "summary": header.get("summary"), "files": files})
                    oid = f"{len(hub.commits):040x}"
                    self._reply(200, {"commitUrl": f"{hub.endpoint}/{parts[2]}/{parts[3]}/commit/{oid}",
                                      "commitOid": oid})
                else:
                    self._reply(404, {"error": f"fake hub: no route for POST {path}"})

            def do_GET(self):
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                self._reply(404, {"error": f"fake hub: no route for GET {self.path}"})

            do_PUT = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
