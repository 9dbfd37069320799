"""``evlp serve``: a small local web page over an image index (``pip install evlp[serve]``).

    evlp index ~/Photos --model my-model && evlp serve          # then open http://127.0.0.1:8000

* a text box: the best-matching indexed images as a grid, with their cosine scores;
* an image upload and a comma-separated list of classes: the zero-shot probability of each class.

Only files recorded in the index are ever served, looked up by row number, checked to lie inside the indexed
folder and to be unchanged since they were indexed (size and mtime), so no request path can reach any other file;
``ImageIndex.load`` refuses an index whose rows are not image files below its folder. Uploads are capped at
``max_upload_bytes`` and must decode as an image. Validation errors never echo the request back.

It listens on 127.0.0.1 by default and answers only requests whose ``Host`` is ``localhost``, ``127.0.0.1`` or
``[::1]`` (any port), the address it was told to listen on, or a name passed with ``--allow-host``; anything else
gets 421. This stops DNS rebinding: a hostile web page whose name resolves to 127.0.0.1 would otherwise let the
visitor's browser query the model and read the indexed photos. There is no authentication, so expose the page to a
network deliberately (``--host 0.0.0.0 --allow-host my-machine.lan``).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures, whose types are imported inside
# create_app (FastAPI is an optional extra).
import io
import os
import re
import threading
from pathlib import Path

from evlp.api import DEFAULT_TEMPLATES, LoadedModel, class_probabilities, load_model
from evlp.errors import EvlpError
from evlp.search import FileEntry, ImageIndex, is_indexable, search_text

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_PIXELS = 50_000_000  # larger images are refused before decoding (PIL's bomb check warns only at 89M)
MAX_CLASSES = 200
MAX_TOP = 200
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::", "[::]"})
_HOST = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)(?::\d{1,5})?")


def host_name(header: str | None) -> str | None:
    """The name of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), lower-cased; None when malformed."""
    match = _HOST.fullmatch(header or "")
    return match.group(1).lower() if match else None


def allowed_hosts(listen: str = "127.0.0.1", extra=()) -> frozenset[str]:
    """The Host names the page answers to: the loopback names, the address it listens on (unless a wildcard) and
    the names the user allowed explicitly."""
    names = {*LOCAL_HOSTS, *(name.strip().lower() for name in extra)}
    if listen not in WILDCARD_ADDRESSES:
        names.add(f"[{listen}]" if ":" in listen and not listen.startswith("[") else listen.lower())
    return frozenset(names)


def create_app(loaded: LoadedModel, index: ImageIndex, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               hosts: frozenset[str] = allowed_hosts()):
    from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from PIL import Image

    app = FastAPI(title="evlp search", docs_url=None, redoc_url=None)
    root = index.root.resolve()
    row_of = {f.path: i for i, f in enumerate(index.files)}
    model_lock = threading.Lock()  # requests run in a thread pool; one forward pass at a time

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        # FastAPI's default echoes the offending input (a 60,000-character query comes back whole): say where and
        # what only.
        details = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:200]} for e in error.errors()[:5]]
        return JSONResponse({"detail": details}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("{{COUNT}}", str(len(index))).replace("{{MAX_MB}}", f"{max_upload_bytes / 2**20:g}")

    @app.get("/api/search")
    def search(q: str = Query(..., min_length=1, max_length=500), top: int = Query(24, ge=1, le=MAX_TOP)):
        with model_lock:
            hits = search_text(index, loaded, [q], top=top)[0]
        return {"results": [{"row": row_of[path], "path": path, "score": round(score, 4)} for path, score in hits]}

    @app.get("/image/{row}")
    def image(row: int):
        if not 0 <= row < len(index):
            raise HTTPException(404, "no such image")
        entry = index.files[row]
        path = (root / entry.path).resolve()
        # An index file is data: a row naming '../x' or a link out of the folder must not expose other files, and
        # a file is served only as it was indexed (the same size and mtime), not whatever took its name since.
        if not is_indexable(entry.path) or not path.is_relative_to(root) or not path.is_file():
            raise HTTPException(404, "no such image")
        st = path.stat()
        if not entry.same_file(FileEntry(entry.path, st.st_size, st.st_mtime_ns)):
            raise HTTPException(404, "this file changed since it was indexed: rerun evlp index")
        return FileResponse(path)

    @app.middleware("http")
    async def limit_uploads(request: Request, call_next):
        # Checked before the multipart body is parsed (and spooled to disk): the declared length bounds what the
        # server reads, and a body without one is refused.
        if request.url.path == "/api/classify" and request.method == "POST":
            declared = request.headers.get("content-length", "")
            if not declared.isdigit():
                return JSONResponse({"detail": "uploads need a Content-Length"}, status_code=411)
            if int(declared) > max_upload_bytes + 64 * 1024:  # the file plus the multipart envelope
                return JSONResponse({"detail": f"upload larger than {max_upload_bytes:,} bytes"}, status_code=413)
        return await call_next(request)

    @app.middleware("http")  # added last, so it runs first: nothing is read or computed for another name
    async def check_host(request: Request, call_next):
        if host_name(request.headers.get("host")) not in hosts:
            return JSONResponse({"detail": "this page answers to localhost only (evlp serve --allow-host NAME adds "
                                           "a name)"}, status_code=421)
        return await call_next(request)

    @app.post("/api/classify")
    def classify(file: UploadFile = File(...), classes: str = Form(..., max_length=20_000)):
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes:,} bytes")
        names = list(dict.fromkeys(c.strip() for c in classes.split(",") if c.strip()))
        if not names or len(names) > MAX_CLASSES or any(len(n) > 100 for n in names):
            raise HTTPException(400, f"give 1 to {MAX_CLASSES} comma-separated class names of at most 100 "
                                     f"characters")
        try:
            with Image.open(io.BytesIO(data)) as opened:
                if opened.width * opened.height > MAX_UPLOAD_PIXELS:
                    raise HTTPException(400, f"image larger than {MAX_UPLOAD_PIXELS:,} pixels")
                opened.load()
                picture = opened
        except HTTPException:
            raise
        except Exception:  # whatever the decoder says, it is not an image we can use
            raise HTTPException(400, "the upload is not a readable image") from None
        with model_lock:
            probs = class_probabilities(loaded.model, loaded.preprocess, loaded.tokenizer, [picture], names,
                                        DEFAULT_TEMPLATES)[0]
        order = probs.argsort(descending=True).tolist()
        return {"labels": [{"label": names[i], "prob": round(float(probs[i]), 4)} for i in order]}

    return app


def serve(index_path: str | os.PathLike, model: str | None = None, device: str = "cpu", host: str = "127.0.0.1",
          port: int = 8000, allow_hosts=()) -> None:
    """Load the index and its model (or ``model``) and serve the page until interrupted; ``allow_hosts`` are the
    Host names it answers to besides the loopback ones and ``host``."""
    try:
        import uvicorn
    except ImportError:
        raise EvlpError("evlp serve needs FastAPI and uvicorn: pip install 'evlp[serve]'") from None
    index = ImageIndex.load(index_path)
    loaded = load_model(model or index.model["path"], device)
    if not Path(index.root).is_dir():
        raise EvlpError(f"the indexed folder {index.root} does not exist any more; rebuild the index")
    print(f"serving {len(index)} images from {index.root} on http://{host}:{port}")
    uvicorn.run(create_app(loaded, index, hosts=allowed_hosts(host, allow_hosts)), host=host, port=port,
                log_level="warning")


# Plain HTML and JavaScript, no external resources; results are inserted with textContent (never as HTML), so a
# file name or class name cannot inject markup.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>evlp search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
 form { margin: .5rem 0 1rem; display: flex; gap: .5rem; flex-wrap: wrap; align-items: center; }
 input[type=text] { width: 28rem; max-width: 90vw; padding: .4rem; }
 #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: .75rem; }
 figure { margin: 0; } figure img { width: 100%; aspect-ratio: 1; object-fit: cover; background: #eee; }
 figcaption { font-size: .75rem; overflow-wrap: anywhere; } .error { color: #b00; }
 #labels li { font-variant-numeric: tabular-nums; }
</style></head>
<body>
<h1>evlp search</h1>
<p>{{COUNT}} indexed images.</p>
<form id="search-form">
 <input id="query" type="text" placeholder="a dog on a beach" required>
 <button type="submit">Search</button>
</form>
<div id="grid"></div>
<h2>Zero-shot labels for an image</h2>
<form id="classify-form">
 <input id="file" type="file" accept="image/*" required>
 <input id="classes" type="text" placeholder="dog, cat, car (comma-separated)" required>
 <button type="submit">Classify</button> <small>up to {{MAX_MB}} MB</small>
</form>
<ol id="labels"></ol>
<p id="error" class="error"></p>
<script>
const $ = (id) => document.getElementById(id);
function showError(message) { $("error").textContent = message || ""; }
async function reply(response) {
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail ? JSON.stringify(body.detail) : response.statusText);
  return body;
}
$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault(); showError();
  try {
    const body = await reply(await fetch("/api/search?top=24&q=" + encodeURIComponent($("query").value)));
    const grid = $("grid"); grid.replaceChildren();
    for (const hit of body.results) {
      const figure = document.createElement("figure"), img = document.createElement("img");
      const caption = document.createElement("figcaption");
      img.src = "/image/" + hit.row; img.alt = hit.path; img.loading = "lazy";
      caption.textContent = hit.score.toFixed(3) + "  " + hit.path;
      figure.append(img, caption); grid.append(figure);
    }
  } catch (e) { showError(e.message); }
});
$("classify-form").addEventListener("submit", async (event) => {
  event.preventDefault(); showError();
  const data = new FormData(); data.append("file", $("file").files[0]); data.append("classes", $("classes").value);
  try {
    const body = await reply(await fetch("/api/classify", {method: "POST", body: data}));
    const list = $("labels"); list.replaceChildren();
    for (const item of body.labels) {
      const li = document.createElement("li");
      li.textContent = item.label + ": " + (100 * item.prob).toFixed(1) + " %";
      list.append(li);
    }
  } catch (e) { showError(e.message); }
});
</script>
</body></html>
"""
